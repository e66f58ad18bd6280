//! Seed 002's replay: every so often, dead letters whose failure may pass (a provider outage,
//! a timeout) are run again; fatal ones wait for a person.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{JobManager, Reprocess};

/// Reprocess the retryable dead letters of every finished job, once; how many were started.
pub fn reprocess_retryable(jobs: &Arc<JobManager>) -> Result<usize> {
    let mut by_job: BTreeMap<Uuid, Vec<u64>> = BTreeMap::new();
    for letter in jobs.pipeline().store().dead_letters(None, None) {
        let letter = letter?;
        if letter.error.retryable {
            by_job.entry(letter.job_id).or_default().push(letter.index);
        }
    }
    let mut started = 0;
    for (job, indices) in by_job {
        if let Reprocess::Started(n) = jobs.reprocess(job, Some(indices))? {
            started += n;
        }
    }
    Ok(started)
}

/// Run [`reprocess_retryable`] every `interval` until `stop`.
pub fn spawn(jobs: Arc<JobManager>, interval: Duration, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            match reprocess_retryable(&jobs) {
                Ok(0) => {}
                Ok(started) => tracing::info!(started, "reprocessing retryable dead letters"),
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "automatic reprocessing failed")
                }
            }
        }
    })
}
