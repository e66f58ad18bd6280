//! A job's items through the pipeline, `concurrency` at a time.
//!
//! `concurrency` workers share one lazy iterator over the job's items in the store; each takes
//! the next item, runs it, and takes another. Memory holds the items in flight, never the job,
//! and no task is spawned per item (on two cores, per-item spawns and their cross-thread
//! wake-ups cost more than a pass-through stage). Items that already have a result are
//! skipped, which makes running a job again the way to resume it.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::item::{ItemHooks, ItemLimits, ItemRef, run_item};
use crate::model::{ItemResult, JobRecord, JobState, item_id, now_ms};
use crate::pipeline::Pipeline;

/// How a job ended.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub job: JobRecord,
    /// Items that got no result because the job was cancelled first.
    pub not_run: u64,
}

/// What the workers share: the items still to take, and the job's counts.
struct Progress<I> {
    items: I,
    job: JobRecord,
    not_run: u64,
}

/// How to run a job's items.
#[derive(Debug, Clone, Copy)]
pub struct RunSettings {
    /// The job ran before, so results and checkpoints may be stored already.
    pub resume: bool,
    /// Items in flight.
    pub concurrency: usize,
    pub limits: ItemLimits,
}

impl RunSettings {
    /// A first run with `concurrency` items in flight and the pipeline's limits.
    pub fn fresh(concurrency: usize) -> Self {
        Self {
            resume: false,
            concurrency,
            limits: ItemLimits::default(),
        }
    }
}

/// Run every item of `job` that has no result yet; `on_result` sees each new result.
pub async fn run_job(
    pipeline: Arc<Pipeline>,
    mut job: JobRecord,
    RunSettings {
        resume,
        concurrency,
        limits,
    }: RunSettings,
    cancel: CancellationToken,
    hooks: ItemHooks,
    on_result: impl Fn(&ItemResult) + Send + Sync + 'static,
) -> Result<JobOutcome> {
    let store = pipeline.store().clone();
    // Counts of a resumed job start from what is stored.
    (job.succeeded, job.failed) = (0, 0);
    if resume {
        for result in store.results(job.id, None) {
            job.count(result?.status);
        }
    }
    let shared = Arc::new(Mutex::new(Progress {
        items: store.items(job.id),
        job: job.clone(),
        not_run: 0,
    }));
    let on_result = Arc::new(on_result);
    let job_id = job.id;
    let mut workers: JoinSet<Result<()>> = JoinSet::new();
    // Never more workers than items: a job's `concurrency` is a cap, not a number of tasks.
    let workers_wanted =
        concurrency.clamp(1, usize::try_from(job.total).unwrap_or(usize::MAX).max(1));
    for _ in 0..workers_wanted {
        let (pipeline, shared, cancel, hooks, on_result) = (
            pipeline.clone(),
            shared.clone(),
            cancel.clone(),
            hooks.clone(),
            on_result.clone(),
        );
        workers.spawn(async move {
            loop {
                let next = {
                    let mut shared = shared.lock().expect("no worker panics holding the lock");
                    let next = shared.items.next();
                    if next.is_some() && cancel.is_cancelled() {
                        shared.not_run += 1;
                        continue;
                    }
                    next
                };
                let Some(entry) = next else { return Ok(()) };
                let (index, input) = entry?;
                let store = pipeline.store();
                if resume && store.result(job_id, index)?.is_some() {
                    continue;
                }
                let item = ItemRef {
                    job_id,
                    item_id: item_id(job_id, index),
                    index,
                };
                let result =
                    run_item(&pipeline, item, input, resume, limits, &cancel, &hooks).await?;
                shared
                    .lock()
                    .expect("no worker panics holding the lock")
                    .job
                    .count(result.status);
                on_result(&result);
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("a job worker panicked")??;
    }

    let Progress {
        job: mut finished,
        not_run,
        ..
    } = Arc::try_unwrap(shared)
        .ok()
        .expect("every worker has finished")
        .into_inner()
        .expect("not poisoned");
    finished.state = if cancel.is_cancelled() {
        JobState::Cancelled
    } else {
        JobState::Completed
    };
    finished.finished_at = Some(now_ms());
    store.put_job(&finished)?;
    store.flush().await?;
    Ok(JobOutcome {
        job: finished,
        not_run,
    })
}
