//! A job's items through the pipeline, `concurrency` at a time.
//!
//! Items are read lazily from the store and a task is spawned only when a permit is free, so
//! memory holds the items in flight, never the job. Items that already have a result are
//! skipped, which makes running a job again the way to resume it.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::item::{ItemRef, run_item};
use crate::capabilities::ProgressSink;
use crate::pipeline::Pipeline;
use crate::store::{ItemResult, JobRecord, JobState, now_ms};

/// How a job ended.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub job: JobRecord,
    /// Items that got no result because the job was cancelled first.
    pub not_run: u64,
}

/// Run every item of `job` that has no result yet; `on_result` sees each new result.
/// `resume` says the job ran before, so stage outputs of unfinished items may be stored.
pub async fn run_job(
    pipeline: Arc<Pipeline>,
    mut job: JobRecord,
    resume: bool,
    concurrency: usize,
    cancel: CancellationToken,
    progress: Option<ProgressSink>,
    on_result: impl Fn(&ItemResult),
) -> Result<JobOutcome> {
    let store = pipeline.store().clone();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut running: JoinSet<Result<ItemResult>> = JoinSet::new();
    let mut not_run = 0;
    let record = |job: &mut JobRecord, result: &ItemResult| {
        job.count(result.status);
        on_result(result);
    };
    // Counts of a resumed job start from what is stored.
    (job.succeeded, job.failed) = (0, 0);
    if resume {
        for result in store.results(job.id, None) {
            job.count(result?.status);
        }
    }
    for entry in store.items(job.id) {
        let (index, input) = entry?;
        if resume && store.result(job.id, index)?.is_some() {
            continue;
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("never closed"),
            () = cancel.cancelled() => { not_run += 1; continue; }
        };
        let item = ItemRef {
            job_id: job.id,
            item_id: job.item_id(index),
            index,
        };
        let (pipeline, cancel, progress) = (pipeline.clone(), cancel.clone(), progress.clone());
        running.spawn(async move {
            let result = run_item(&pipeline, item, input, resume, &cancel, progress).await;
            drop(permit);
            result
        });
        while let Some(done) = running.try_join_next() {
            record(&mut job, &done.context("an item task panicked")??);
        }
    }
    while let Some(done) = running.join_next().await {
        record(&mut job, &done.context("an item task panicked")??);
    }
    job.state = if cancel.is_cancelled() {
        JobState::Cancelled
    } else {
        JobState::Completed
    };
    job.finished_at = Some(now_ms());
    store.put_job(&job)?;
    store.flush().await?;
    Ok(JobOutcome { job, not_run })
}
