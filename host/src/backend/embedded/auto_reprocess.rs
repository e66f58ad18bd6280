//! Seed 002's replay: every so often, dead letters whose failure may pass (a provider outage,
//! a timeout) are run again; fatal ones wait for a person, and so does a letter that has been
//! run again `max_rounds` times without passing (a failure that only looked retryable must not
//! be replayed forever).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::JobManager;
use crate::model::Reprocess;

/// Reprocess the retryable dead letters of every finished job that have been reprocessed fewer
/// than `max_rounds` times, once; how many were started.
pub async fn reprocess_retryable(jobs: &Arc<JobManager>, max_rounds: u32) -> Result<usize> {
    let mut by_job: BTreeMap<Uuid, Vec<u64>> = BTreeMap::new();
    for letter in jobs.store().dead_letters(None, None) {
        let letter = letter?;
        if letter.error.retryable && letter.reprocessed < max_rounds {
            by_job.entry(letter.job_id).or_default().push(letter.index);
        }
    }
    let mut started = 0;
    for (job, indices) in by_job {
        if let Reprocess::Started(n) = jobs.reprocess(job, Some(indices)).await? {
            started += n;
        }
    }
    Ok(started)
}

/// Run [`reprocess_retryable`] every `interval` until `stop`.
pub fn spawn(
    jobs: Arc<JobManager>,
    interval: Duration,
    max_rounds: u32,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            match reprocess_retryable(&jobs, max_rounds).await {
                Ok(0) => {}
                Ok(started) => tracing::info!(started, "reprocessing retryable dead letters"),
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "automatic reprocessing failed")
                }
            }
        }
    })
}
