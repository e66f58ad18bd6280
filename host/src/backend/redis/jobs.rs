//! Jobs in Redis as the HTTP API sees them: any node accepts a job, answers for it, and
//! cancels it, whichever nodes run its items.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use redis::AsyncCommands;
use uuid::Uuid;

use super::{Cluster, keys, keys::JobKeys, scripts};
use crate::backend::{DeadLetterFilter, Events, JobBackend, JobFilter};
use crate::events::{Entry, Event};
use crate::model::{
    CancelOutcome, Idempotency, ItemResult, JobOptions, JobRecord, JobState, Reprocess, Submitted,
    now_ms,
};
use crate::store::DeadLetter;

/// Items per `HSET` of a submission.
const ITEMS_PER_COMMAND: usize = 1000;

/// A submission of more items than this writes them first, a command at a time (Redis serves
/// other clients between them), then the job in one transaction; smaller ones write all in
/// that transaction.
const ITEMS_IN_TRANSACTION: usize = 10_000;

/// How long the items of a submission in progress are kept if it never ends (its node died).
const UNFINISHED_SUBMISSION: Duration = Duration::from_secs(3600);

/// Items of one job queued or running at once when it sets no `concurrency`: enough to keep
/// every slot of a large cluster busy, few enough that a submission adds a bounded number of
/// work entries (see `scripts.rs`, *Feeding*).
pub const MAX_WINDOW: u64 = 4096;

/// Items of a job queued or running at once, cluster-wide: its `sequential` or `concurrency`
/// (as in embedded mode), else [`MAX_WINDOW`]. Without `concurrency` the pipeline's
/// `[run] concurrency` does not bound a job here: it sizes each node's `--slots`.
fn window(pipeline: &crate::pipeline::Pipeline, options: &JobOptions) -> u64 {
    match (options.sequential, options.concurrency) {
        (true, _) => 1,
        (false, Some(concurrency)) => {
            concurrency.min(pipeline.config.limits.max_concurrency) as u64
        }
        (false, None) => MAX_WINDOW,
    }
}

/// How long an idempotency claim without a job is taken for a submission in progress.
const CLAIM_GRACE: Duration = Duration::from_secs(5);

impl Cluster {
    /// Claim `key` for job `id`: `None` when the claim is ours, else the job that has it.
    async fn claim_idempotency_key(&self, key: &str, id: Uuid) -> Result<Option<JobRecord>> {
        let mut conn = self.conn();
        let name = keys::idempotency(key);
        let ttl = self.inner.retention.as_secs().max(1);
        loop {
            let claimed: Option<String> = redis::cmd("SET")
                .arg(&name)
                .arg(id.to_string())
                .arg("NX")
                .arg("EX")
                .arg(ttl)
                .query_async(&mut conn)
                .await?;
            if claimed.is_some() {
                return Ok(None);
            }
            let Some(holder) = conn.get::<_, Option<String>>(&name).await? else {
                continue;
            };
            let holder: Uuid = holder.parse().context("corrupt idempotency key in Redis")?;
            let deadline = tokio::time::Instant::now() + CLAIM_GRACE;
            while tokio::time::Instant::now() < deadline {
                if let Some(job) = self.job_record(holder).await? {
                    return Ok(Some(job));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The holder's submission never finished (its node died): take the key over.
            conn.set_ex::<_, _, ()>(&name, id.to_string(), ttl).await?;
            return Ok(None);
        }
    }

    /// A job with its counts and state from Redis.
    pub(super) async fn job_record(&self, id: Uuid) -> Result<Option<JobRecord>> {
        let keys = JobKeys::new(id);
        let (record, counts): (Option<Vec<u8>>, HashMap<String, String>) = redis::pipe()
            .get(&keys.record)
            .hgetall(&keys.counts)
            .query_async(&mut self.conn())
            .await
            .context("cannot read a job from Redis")?;
        let Some(record) = record else {
            return Ok(None);
        };
        let mut job: JobRecord =
            serde_json::from_slice(&record).context("corrupt job record in Redis")?;
        let number = |field: &str| counts.get(field).and_then(|v| v.parse::<u64>().ok());
        job.succeeded = number("succeeded").unwrap_or(0);
        job.failed = number("failed").unwrap_or(0);
        job.finished_at = number("finished_at");
        job.llm_tokens = number("llm_tokens").unwrap_or(0);
        if let Some(state) = counts.get("state") {
            job.state = serde_json::from_value(serde_json::Value::String(state.clone()))
                .context("corrupt job state in Redis")?;
        }
        Ok(Some(job))
    }

    /// Up to `limit` results from score `min` on (`(N` is "above N"), skipping `skip`, in
    /// index order.
    async fn results_page(
        &self,
        id: Uuid,
        min: &str,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<ItemResult>> {
        let keys = JobKeys::new(id);
        let mut conn = self.conn();
        let indexes: Vec<u64> = redis::cmd("ZRANGE")
            .arg(&keys.order)
            .arg(min)
            .arg("+inf")
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(skip)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .context("cannot page results in Redis")?;
        if indexes.is_empty() {
            return Ok(Vec::new());
        }
        let results: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(&keys.results)
            .arg(&indexes)
            .query_async(&mut conn)
            .await
            .context("cannot read results from Redis")?;
        Ok(indexes
            .into_iter()
            .zip(results)
            .filter_map(|(index, json)| Some(ItemResult::read(id, index, &json?)))
            .collect())
    }
}

#[async_trait]
impl JobBackend for Cluster {
    async fn submit(
        &self,
        pipeline: &Arc<crate::pipeline::Pipeline>,
        items: Vec<Vec<u8>>,
        options: JobOptions,
        idempotency: Option<Idempotency>,
    ) -> Result<Submitted> {
        let mut job = JobRecord::submitted(
            pipeline.name(),
            &pipeline.revision,
            options,
            idempotency.as_ref(),
        );
        if let Some(idempotency) = &idempotency
            && let Some(existing) = self.claim_idempotency_key(&idempotency.key, job.id).await?
        {
            return Ok(idempotency.repeat_of(existing));
        }
        job.total = items.len() as u64;
        let id = job.id;
        let keys = JobKeys::new(id);
        let started = serde_json::to_vec(&Entry {
            at: now_ms(),
            event: Event::JobStarted { total: job.total },
        })?;
        let chunked = items.len() > ITEMS_IN_TRANSACTION;
        let hset = |chunk_number: usize, chunk: &[Vec<u8>]| {
            let first = chunk_number * ITEMS_PER_COMMAND;
            let mut hset = redis::cmd("HSET");
            hset.arg(&keys.items);
            for (offset, item) in chunk.iter().enumerate() {
                hset.arg(first + offset).arg(item.as_slice());
            }
            hset
        };
        if chunked {
            // Nothing refers to the items yet: no worker, no reader sees them before the
            // transaction below, and they expire if it never comes.
            let mut conn = self.conn();
            for (chunk_number, chunk) in items.chunks(ITEMS_PER_COMMAND).enumerate() {
                redis::pipe()
                    .add_command(hset(chunk_number, chunk))
                    .ignore()
                    .expire(&keys.items, UNFINISHED_SUBMISSION.as_secs() as i64)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
                    .context("cannot store the job's items in Redis")?;
            }
        }
        // One transaction: a job is in Redis with all its items and its first work entries,
        // or not at all.
        let mut tx = redis::pipe();
        tx.atomic()
            .set(&keys.record, serde_json::to_vec(&job)?)
            .ignore()
            .cmd("HSET")
            .arg(&keys.counts)
            .arg(&[("total", job.total), ("seq", 1), ("succeeded", 0)])
            .arg(&[("failed", 0), ("not_run", 0), ("queued", 0)])
            .arg(("window", window(pipeline, &job.options)))
            .arg(("state", "running"))
            .ignore()
            .cmd("XADD")
            .arg(&keys.events)
            .arg("1-0")
            .arg("e")
            .arg(started)
            .ignore();
        match chunked {
            true => {
                tx.persist(&keys.items).ignore();
            }
            false => {
                for (chunk_number, chunk) in items.chunks(ITEMS_PER_COMMAND).enumerate() {
                    tx.add_command(hset(chunk_number, chunk)).ignore();
                }
            }
        }
        let id_text = id.to_string();
        tx.incr(keys::UNQUEUED, job.total).ignore();
        let job_keys = keys.all();
        tx.cmd("EVAL")
            .arg(scripts::FEED_CODE.as_str())
            .arg(job_keys.len() + keys::FEED_KEYS.len())
            .arg(&job_keys[..])
            .arg(&keys::FEED_KEYS[..])
            .arg(&id_text)
            .arg(now_ms())
            .arg(self.inner.retention.as_secs().max(1))
            .ignore();
        tx.zadd(keys::JOBS, &id_text, 0).ignore();
        tx.query_async::<()>(&mut self.conn())
            .await
            .context("cannot store the job in Redis")?;
        crate::metrics::job(pipeline.name(), "submitted");
        Ok(Submitted::New(job))
    }

    async fn job(&self, id: Uuid) -> Result<Option<JobRecord>> {
        self.job_record(id).await
    }

    async fn jobs(
        &self,
        before: Option<Uuid>,
        filter: &JobFilter,
        limit: usize,
    ) -> Result<Vec<JobRecord>> {
        let mut conn = self.conn();
        let mut jobs = Vec::with_capacity(limit);
        let mut max = before.map_or_else(|| "+".to_string(), |id| format!("({id}"));
        loop {
            let ids: Vec<String> = redis::cmd("ZRANGE")
                .arg(keys::JOBS)
                .arg(&max)
                .arg("-")
                .arg("BYLEX")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(limit.max(50))
                .query_async(&mut conn)
                .await
                .context("cannot list jobs in Redis")?;
            let Some(last) = ids.last() else {
                return Ok(jobs);
            };
            max = format!("({last}");
            for id in &ids {
                let Some(job) = self.job_record(id.parse()?).await? else {
                    // Expired after its retention: forget it in the list too.
                    conn.zrem::<_, _, ()>(keys::JOBS, id).await?;
                    continue;
                };
                if !filter.lets_through(&job) {
                    continue;
                }
                jobs.push(job);
                if jobs.len() == limit {
                    return Ok(jobs);
                }
            }
        }
    }

    async fn results(&self, id: Uuid, after: Option<u64>, limit: usize) -> Result<Vec<ItemResult>> {
        let min = after.map_or_else(|| "-inf".to_string(), |after| format!("({after}"));
        self.results_page(id, &min, 0, limit).await
    }

    async fn results_from(&self, id: Uuid, skip: usize, limit: usize) -> Result<Vec<ItemResult>> {
        self.results_page(id, "-inf", skip, limit).await
    }

    async fn cancel(&self, id: Uuid) -> Result<CancelOutcome> {
        let Some(job) = self.job_record(id).await? else {
            return Ok(CancelOutcome::Unknown);
        };
        if job.state != JobState::Running {
            return Ok(CancelOutcome::Finished(job.state));
        }
        let keys = JobKeys::new(id);
        // The flag is the truth every node checks; the message makes them check at once.
        redis::pipe()
            .set_ex(&keys.cancel, 1, self.inner.retention.as_secs().max(1))
            .ignore()
            .publish(keys::CANCEL_CHANNEL, id.to_string())
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .context("cannot cancel in Redis")?;
        self.cancel_here(id);
        Ok(CancelOutcome::Cancelling)
    }

    async fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: Option<(Uuid, u64)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.list_dead_letters(filter, after, limit).await
    }

    async fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>> {
        crate::backend::ItemStore::dead_letter(self, job, index).await
    }

    async fn discard_dead_letter(&self, job: Uuid, index: u64) -> Result<bool> {
        self.discard_letter(job, index).await
    }

    async fn reprocess(&self, job: Uuid, indices: Option<Vec<u64>>) -> Result<Reprocess> {
        self.reprocess_letters(job, indices).await
    }

    async fn lead(&self, task: &'static str, ttl: Duration) -> Result<bool> {
        self.hold_lease(task, ttl).await
    }

    async fn unfinished_items(&self) -> Result<Option<u64>> {
        // An entry leaves the work stream (`XDEL`) only once its item is settled: its length
        // is the cluster's items queued or running, whichever node holds them; the others
        // wait for their job's window.
        let (queued, unqueued): (u64, Option<u64>) = redis::pipe()
            .xlen(keys::WORK)
            .get(keys::UNQUEUED)
            .query_async(&mut self.conn())
            .await
            .context("cannot read the work stream's length from Redis")?;
        Ok(Some(queued + unqueued.unwrap_or(0)))
    }

    fn events(&self) -> Events {
        Arc::new(self.clone())
    }
}
