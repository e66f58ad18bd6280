//! The work loop of a node in Redis mode.
//!
//! Items are entries of the `sh:work` stream, read through the consumer group `workers`
//! (`XREADGROUP ... >`), as many at a time as the node has free slots. An entry is acknowledged
//! (`XACK`, then `XDEL`: the stream holds only work not yet done) once its result is recorded,
//! never before, so an item of a node that dies stays pending in the group. Every node
//! reclaims entries pending longer than `reclaim_idle` (`XAUTOCLAIM`) and runs them again from
//! their checkpoints; a live node keeps the entries it still owns fresh (`XCLAIM ... JUSTID` in
//! the `REFRESH` script, which resets their idle time and never takes an entry back from a node
//! that reclaimed it) so that a slow item is not taken from it. An item run twice (a node thought
//! dead was only slow) is settled once: the `FINISH` script records the first result only.
//! An entry handed out more than [`MAX_RECLAIMS`] + 1 times fails as abandoned. An entry with
//! `r` is a reprocessed dead letter (`dead_letters.rs`): it runs from its checkpoints.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use sled::IVec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{Cluster, keys, keys::JobKeys, scripts};
use crate::events::{Entry, Event};
use crate::jobs::{ItemHooks, ItemRef, StageUpdate, run_item};
use crate::jobs::{item_limits, runnable};
use crate::model::{
    DEFAULT_PREVIEW_CHARS, Detail, ItemResult, ItemStatus, JobRecord, item_id, now_ms,
};
use crate::pipeline::Pipelines;

/// How a node takes work.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSettings {
    /// Items this node runs at once.
    pub slots: usize,
    /// An entry pending this long on another node is taken over: that node is taken for dead.
    pub reclaim_idle: Duration,
    /// On shutdown, how long items in flight get to finish (the rest are reclaimed by others).
    pub drain: Duration,
}

/// How long one `XREADGROUP` waits for work.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// Entries read at most at once.
const MAX_BATCH: usize = 64;

/// Entries reclaimed at most per round.
const RECLAIM_BATCH: usize = 32;

/// An item whose work was reclaimed more often than this (every node that ran it stopped)
/// fails as abandoned instead of taking down one node after another. Counted by Redis, as the
/// entry's deliveries.
pub const MAX_RECLAIMS: usize = 3;

struct Worker {
    cluster: Cluster,
    pipelines: Arc<Pipelines>,
    slots: Arc<Semaphore>,
    /// Ids of the entries this node is running, kept fresh by the heartbeat.
    in_flight: Mutex<HashSet<String>>,
    tasks: TaskTracker,
    settings: WorkerSettings,
}

/// Take and run items until `shutdown`, then give the items in flight `settings.drain`.
pub async fn run_worker(
    cluster: Cluster,
    pipelines: Arc<Pipelines>,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut reader = cluster.blocking_connection(READ_BLOCK).await?;
    let worker = Arc::new(Worker {
        cluster,
        pipelines,
        slots: Arc::new(Semaphore::new(settings.slots)),
        in_flight: Mutex::default(),
        tasks: TaskTracker::new(),
        settings,
    });
    tokio::spawn(worker.clone().heartbeat(shutdown.clone()));
    tokio::spawn(worker.clone().reclaim(shutdown.clone()));
    loop {
        let Some(permits) = worker.free_slots(&shutdown).await else {
            break;
        };
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(keys::GROUP)
            .arg(worker.cluster.node())
            .arg("COUNT")
            .arg(permits.len())
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys::WORK)
            .arg(">");
        let reply = tokio::select! {
            reply = read.query_async::<Option<StreamReadReply>>(&mut reader) => reply,
            () = shutdown.cancelled() => break,
        };
        let entries = match reply {
            Ok(reply) => reply.map(|r| r.keys).unwrap_or_default(),
            Err(error) => {
                tracing::warn!(error = %error, "cannot read work from Redis; retrying");
                if error.code() == Some("NOGROUP") {
                    // Redis restarted without its data: the group goes with the stream.
                    let _ = worker.cluster.create_groups().await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let entries = entries.into_iter().flat_map(|key| key.ids);
        for (entry, permit) in entries.zip(permits) {
            worker.start(entry, 1, permit);
        }
    }
    worker.tasks.close();
    if tokio::time::timeout(settings.drain, worker.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            still_running = worker.tasks.len(),
            "items still running at shutdown; other nodes will reclaim them"
        );
    }
    Ok(())
}

impl Worker {
    /// Wait for one free slot, then take every other free one (up to [`MAX_BATCH`]).
    async fn free_slots(&self, shutdown: &CancellationToken) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = tokio::select! {
            permit = self.slots.clone().acquire_owned() => permit.expect("never closed"),
            () = shutdown.cancelled() => return None,
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        Some(permits)
    }

    fn start(self: &Arc<Self>, entry: StreamId, deliveries: usize, permit: OwnedSemaphorePermit) {
        let worker = self.clone();
        self.tasks.spawn(async move {
            let id = entry.id.clone();
            worker
                .in_flight
                .lock()
                .expect("not poisoned")
                .insert(id.clone());
            match worker.run_entry(&entry, deliveries).await {
                Ok(()) => {
                    let acked = redis::pipe()
                        .cmd("XACK")
                        .arg(keys::WORK)
                        .arg(keys::GROUP)
                        .arg(&id)
                        .ignore()
                        .cmd("XDEL")
                        .arg(keys::WORK)
                        .arg(&id)
                        .ignore()
                        .query_async::<()>(&mut worker.cluster.conn())
                        .await;
                    if let Err(error) = acked {
                        // Still pending: it will be reclaimed, and settled once.
                        tracing::warn!(entry = %id, error = %error, "cannot acknowledge work");
                    }
                }
                // Left pending: another try comes with the reclaim.
                Err(error) => {
                    tracing::error!(entry = %id, error = %format!("{error:#}"), "cannot run a work entry");
                }
            }
            worker.in_flight.lock().expect("not poisoned").remove(&id);
            drop(permit);
        });
    }

    /// Run the item of one work entry, handed out `deliveries` times (1: fresh, more: reclaimed),
    /// and record its result; `Ok` means it may be acknowledged.
    async fn run_entry(&self, entry: &StreamId, deliveries: usize) -> Result<()> {
        // A reclaimed item, or a reprocessed dead letter (`r`), goes on from its checkpoints.
        let resume = deliveries > 1 || entry.contains_key("r");
        let job: Uuid = entry
            .get::<String>("j")
            .and_then(|j| j.parse().ok())
            .context("a work entry without a job")?;
        let index: u64 = entry.get("i").context("a work entry without an index")?;
        let cluster = &self.cluster;
        let keys = JobKeys::new(job);
        let (record, cancelled, input, settled): (Option<Vec<u8>>, bool, Option<Vec<u8>>, bool) =
            redis::pipe()
                .get(&keys.record)
                .exists(&keys.cancel)
                .hget(&keys.items, index)
                .sismember(&keys.settled, index)
                .query_async(&mut cluster.conn())
                .await
                .context("cannot read a work item from Redis")?;
        let Some(record) = record else {
            // The job is gone (expired or removed): nothing to do.
            return Ok(());
        };
        if settled {
            return Ok(());
        }
        let record: JobRecord =
            serde_json::from_slice(&record).context("corrupt job record in Redis")?;
        let running = Running::enter(cluster, job);
        let cancel = running.cancel.clone();
        if cancelled || cancel.is_cancelled() {
            cluster
                .run_settling_script::<i64>(&scripts::SKIP, job, &[index.to_string().as_bytes()])
                .await?;
            return Ok(());
        }
        if deliveries > MAX_RECLAIMS + 1 {
            tracing::error!(job = %job, index, deliveries, "item abandoned: every node that ran it stopped");
            let result = abandoned(job, index, deliveries - 1);
            return self.record(job, &result, &record).await;
        }
        let pipeline = match runnable(&self.pipelines, &record).await {
            Ok(pipeline) => pipeline,
            Err(reason) => {
                let result = ItemResult::not_run(job, index, "unrunnable", reason);
                return self.record(job, &result, &record).await;
            }
        };
        let Some(input) = input else {
            bail!("item {index} of job {job} is not in Redis");
        };
        let options = &record.options;
        let every_stage = options.detail == Detail::Stages || record.total == 1;
        let (events, mut logged) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let hooks = ItemHooks {
            stages: Some(Arc::new(move |update: StageUpdate| {
                if update.is_logged(every_stage) {
                    let _ = events.send(update.into_event());
                }
            })),
            ..ItemHooks::default()
        };
        let item = ItemRef {
            job_id: job,
            item_id: item_id(job, index),
            index,
        };
        let limits = item_limits(&pipeline.config, options);
        let run = async {
            let result = run_item(
                &pipeline,
                item,
                IVec::from(input),
                resume,
                limits,
                &cancel,
                &hooks,
            )
            .await;
            // Closes the stage-event channel: the logger below ends.
            drop(hooks);
            result
        };
        // Stage events are logged in order, and all before the item's `item.finished`.
        let log_stages = async {
            while let Some(event) = logged.recv().await {
                let json = serde_json::to_vec(&Entry {
                    at: now_ms(),
                    event,
                })?;
                cluster
                    .run_script::<u64>(&scripts::APPEND, job, &[&json])
                    .await?;
            }
            anyhow::Ok(())
        };
        let (result, logged) = tokio::join!(run, log_stages);
        if let Err(error) = logged {
            tracing::error!(job = %job, error = %format!("{error:#}"), "cannot log a stage event");
        }
        self.record(job, &result?, &record).await
    }

    /// Record an item's result, its `item.finished` event and the job's counts, once per item.
    async fn record(&self, job: Uuid, result: &ItemResult, record: &JobRecord) -> Result<()> {
        let index = result.index;
        let succeeded = result.status == ItemStatus::Succeeded;
        let chars = record
            .options
            .preview_chars
            .unwrap_or(DEFAULT_PREVIEW_CHARS);
        let event = Entry {
            at: now_ms(),
            event: Event::item_finished(index, succeeded, result.preview(chars)),
        };
        let counter = if succeeded { "succeeded" } else { "failed" };
        self.cluster
            .run_settling_script::<i64>(
                &scripts::FINISH,
                job,
                &[
                    index.to_string().as_bytes(),
                    &serde_json::to_vec(result)?,
                    counter.as_bytes(),
                    &serde_json::to_vec(&event)?,
                ],
            )
            .await?;
        Ok(())
    }

    /// How many times each of `entries` was handed out, this time included (Redis counts a
    /// delivery when an entry is read or claimed, so a node killed right after its claim counts).
    async fn deliveries(&self, entries: &[StreamId]) -> Result<Vec<usize>> {
        let mut query = redis::pipe();
        for entry in entries {
            query
                .cmd("XPENDING")
                .arg(keys::WORK)
                .arg(keys::GROUP)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1);
        }
        let replies: Vec<StreamPendingCountReply> = query
            .query_async(&mut self.cluster.conn())
            .await
            .context("cannot read delivery counts")?;
        Ok(replies
            .into_iter()
            .map(|reply| reply.ids.first().map_or(1, |id| id.times_delivered))
            .collect())
    }

    /// Keep this node's entries from looking abandoned: reset their idle time.
    async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.settings.reclaim_idle / 4;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let ids: Vec<String> = self
                .in_flight
                .lock()
                .expect("not poisoned")
                .iter()
                .cloned()
                .collect();
            if ids.is_empty() {
                continue;
            }
            let refreshed = self.cluster.refresh(keys::WORK, keys::GROUP, &ids).await;
            if let Err(error) = refreshed {
                tracing::warn!(error = %format!("{error:#}"), "cannot keep this node's work");
            }
        }
    }

    /// Take over entries pending longer than `reclaim_idle` on any node (a dead one).
    async fn reclaim(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.settings.reclaim_idle / 2;
        let mut cursor = "0-0".to_string();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let reply = redis::cmd("XAUTOCLAIM")
                .arg(keys::WORK)
                .arg(keys::GROUP)
                .arg(self.cluster.node())
                .arg(self.settings.reclaim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(RECLAIM_BATCH)
                .query_async::<StreamAutoClaimReply>(&mut self.cluster.conn())
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot reclaim work in Redis");
                    continue;
                }
            };
            cursor = reply.next_stream_id;
            if reply.claimed.is_empty() {
                continue;
            }
            tracing::warn!(
                entries = reply.claimed.len(),
                "reclaimed work a node left unfinished"
            );
            crate::metrics::items_reclaimed(reply.claimed.len() as u64);
            // Ours now: the heartbeat keeps them, and they wait for slots in line with new
            // work instead of after all of it.
            self.in_flight
                .lock()
                .expect("not poisoned")
                .extend(reply.claimed.iter().map(|entry| entry.id.clone()));
            let deliveries = match self.deliveries(&reply.claimed).await {
                Ok(deliveries) => deliveries,
                Err(error) => {
                    // Left to the heartbeat's care; the next round of some node takes them.
                    tracing::warn!(error = %format!("{error:#}"), "cannot count deliveries in Redis");
                    continue;
                }
            };
            for (entry, deliveries) in reply.claimed.into_iter().zip(deliveries) {
                let permit = tokio::select! {
                    permit = self.slots.clone().acquire_owned() => permit.expect("never closed"),
                    () = shutdown.cancelled() => return,
                };
                self.start(entry, deliveries, permit);
            }
        }
    }
}

/// The result of an item given up after `runs` runs that never finished.
fn abandoned(job: Uuid, index: u64, runs: usize) -> ItemResult {
    ItemResult::not_run(
        job,
        index,
        "abandoned",
        format!(
            "abandoned after {runs} runs that never finished: the nodes running it \
             stopped (or lost Redis) each time"
        ),
    )
}

/// An item of `job` running on this node, counted while it lives (cancel tokens are kept per
/// job while it has items here).
struct Running<'a> {
    cluster: &'a Cluster,
    job: Uuid,
    /// The job's cancel token on this node.
    cancel: CancellationToken,
}

impl<'a> Running<'a> {
    fn enter(cluster: &'a Cluster, job: Uuid) -> Self {
        let cancel = cluster.enter(job);
        Self {
            cluster,
            job,
            cancel,
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.cluster.leave(self.job);
    }
}
