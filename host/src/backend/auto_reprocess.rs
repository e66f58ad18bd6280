//! Seed 002's replay: every so often, dead letters whose failure may pass (a provider outage,
//! a timeout) are run again; fatal ones wait for a person, and so does a letter that has been
//! run again `max_rounds` times without passing (a failure that only looked retryable must not
//! be replayed forever).
//!
//! It runs over [`JobBackend`], so over either backend; in Redis mode every node that was asked
//! to runs the timer, and only the holder of the `reprocess` lease does the work (a second pass
//! would be harmless, as reprocessing a running job is refused, but it would scan for nothing).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{DeadLetterFilter, JobBackend};
use crate::limits::MAX_PAGE;
use crate::model::Reprocess;

/// The lease's name in Redis mode.
const TASK: &str = "reprocess";

/// Reprocess the retryable dead letters of every finished job that have been reprocessed fewer
/// than `max_rounds` times, once; how many were started.
pub async fn reprocess_retryable(jobs: &dyn JobBackend, max_rounds: u32) -> Result<usize> {
    let mut by_job: BTreeMap<Uuid, Vec<u64>> = BTreeMap::new();
    let filter = DeadLetterFilter::default();
    let mut after = None;
    loop {
        let page = jobs.dead_letters(&filter, after, MAX_PAGE).await?;
        for letter in &page {
            if letter.error.retryable && letter.reprocessed < max_rounds {
                by_job.entry(letter.job_id).or_default().push(letter.index);
            }
        }
        match page.last() {
            Some(last) if page.len() == MAX_PAGE => after = Some((last.job_id, last.index)),
            _ => break,
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

/// Run [`reprocess_retryable`] every `interval` until `stop`, while this node leads.
pub fn spawn(
    jobs: Arc<dyn JobBackend>,
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
            // Held across three intervals: a leader that stops is replaced within them.
            let pass = async {
                if !jobs.lead(TASK, interval * 3).await? {
                    return Ok(0);
                }
                reprocess_retryable(jobs.as_ref(), max_rounds).await
            };
            match pass.await {
                Ok(0) => {}
                Ok(started) => tracing::info!(started, "reprocessing retryable dead letters"),
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "automatic reprocessing failed")
                }
            }
        }
    })
}
