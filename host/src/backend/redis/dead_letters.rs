//! Dead letters shared by every node: each letter in its job's hash `sh:{job}:dead` (written by
//! whichever node ran the item, [`crate::backend::ItemStore`]) and in the index `sh:dead`, so
//! that any node lists, reads, discards and reprocesses any of them; and the lease that lets
//! one node at a time run automatic reprocessing.
//!
//! Reprocessing queues the letters' items on the shared work stream again (script
//! [`scripts::REPROCESS`]): any node runs them from their checkpoints, and the job settles
//! again by the same `FINISH` script as its first run, with a new `job.completed`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use redis::AsyncCommands;
use uuid::Uuid;

use super::{Cluster, keys, scripts};
use crate::backend::DeadLetterFilter;
use crate::jobs::runnable;
use crate::model::{JobState, Reprocess};
use crate::store::DeadLetter;

/// Index members read at once by a listing.
const LIST_BATCH: usize = 200;

impl Cluster {
    /// Up to `limit` dead letters after `after` that `filter` lets through, in (job, index)
    /// order.
    pub(super) async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: Option<(Uuid, u64)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let mut conn = self.conn();
        let mut min = match (after, filter.job) {
            (Some((job, index)), _) => format!("({}", keys::dead_letter(job, index)),
            (None, Some(job)) => format!("[{job}/"),
            (None, None) => "-".to_string(),
        };
        // `~` sorts after every digit: the end of one job's members.
        let max = filter
            .job
            .map_or_else(|| "+".to_string(), |job| format!("[{job}/~"));
        let mut letters = Vec::with_capacity(limit.min(LIST_BATCH));
        loop {
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(keys::DEAD_LETTERS)
                .arg(&min)
                .arg(&max)
                .arg("BYLEX")
                .arg("LIMIT")
                .arg(0)
                .arg(LIST_BATCH.max(limit))
                .query_async(&mut conn)
                .await
                .context("cannot list dead letters in Redis")?;
            let Some(last) = members.last() else {
                return Ok(letters);
            };
            min = format!("({last}");
            let places: Vec<(Uuid, u64)> = members
                .iter()
                .filter_map(|member| keys::parse_dead_letter(member))
                .collect();
            let mut read = redis::pipe();
            for &(job, index) in &places {
                read.hget(keys::JobKeys::new(job).dead_letters, index);
            }
            let found: Vec<Option<Vec<u8>>> = read
                .query_async(&mut conn)
                .await
                .context("cannot read dead letters from Redis")?;
            for ((job, index), json) in places.into_iter().zip(found) {
                let Some(json) = json else {
                    // Its job expired after its retention: forget it in the index too.
                    conn.zrem::<_, _, ()>(keys::DEAD_LETTERS, keys::dead_letter(job, index))
                        .await?;
                    continue;
                };
                let letter: DeadLetter =
                    serde_json::from_slice(&json).context("corrupt dead letter in Redis")?;
                if filter.lets_through(&letter) {
                    letters.push(letter);
                    if letters.len() == limit {
                        return Ok(letters);
                    }
                }
            }
        }
    }

    /// Give up on a dead letter; whether there was one.
    pub(super) async fn discard_letter(&self, job: Uuid, index: u64) -> Result<bool> {
        let (removed, _): (u64, u64) = redis::pipe()
            .atomic()
            .hdel(keys::JobKeys::new(job).dead_letters, index)
            .zrem(keys::DEAD_LETTERS, keys::dead_letter(job, index))
            .query_async(&mut self.conn())
            .await
            .context("cannot discard a dead letter in Redis")?;
        Ok(removed > 0)
    }

    /// Queue dead letters of a finished job on the work stream again: those at `indices`, or
    /// all of the job's.
    pub(super) async fn reprocess_letters(
        &self,
        job: Uuid,
        indices: Option<Vec<u64>>,
    ) -> Result<Reprocess> {
        let Some(record) = self.job_record(job).await? else {
            return Ok(Reprocess::UnknownJob);
        };
        if record.state == JobState::Running {
            return Ok(Reprocess::Running);
        }
        // Refused here rather than failed by every node that takes the items.
        let Some(pipelines) = self.inner.pipelines.get() else {
            bail!("this node serves no pipelines yet");
        };
        if let Err(reason) = runnable(pipelines, &record).await {
            return Ok(Reprocess::Unrunnable(reason));
        }
        let indices: Vec<String> = match indices {
            Some(indices) if indices.is_empty() => return Ok(Reprocess::Started(0)),
            Some(indices) => indices.iter().map(u64::to_string).collect(),
            None => vec!["*".to_string()],
        };
        let args: Vec<&[u8]> = indices.iter().map(|index| index.as_bytes()).collect();
        let queued: i64 = self
            .run_script_with(&scripts::REPROCESS, job, &[keys::WORK], &args)
            .await
            .context("cannot queue dead letters again in Redis")?;
        Ok(match queued {
            -2 => Reprocess::UnknownJob,
            -1 => Reprocess::Running,
            n => Reprocess::Started(n as usize),
        })
    }

    /// Whether this node holds the lease of `task` for the next `ttl` (taken if free, kept if
    /// held).
    pub(super) async fn hold_lease(&self, task: &str, ttl: Duration) -> Result<bool> {
        let held: i64 = scripts::LEASE
            .key(keys::lease(task))
            .arg(self.node())
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await
            .with_context(|| format!("cannot take the `{task}` lease in Redis"))?;
        Ok(held == 1)
    }
}
