//! The retention sweeper: finished jobs older than the TTL are removed with their items,
//! checkpoints, results and event log, so the store does not grow without bound.
//!
//! Job ids are time-ordered, so a sweep walks jobs oldest first and stops at the first job
//! created after the cutoff: its cost is the number of expired jobs, not of all jobs.

use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::embedded::EventLog;
use crate::model::{JobState, now_ms};
use crate::store::Store;

/// Remove finished jobs that ended more than `ttl` ago; how many.
pub fn sweep(store: &Store, events: &EventLog, ttl: Duration) -> Result<usize> {
    let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
    let mut removed = 0;
    for (id, job) in store.job_entries() {
        // A record that cannot be read is failed (and rewritten) when the server starts.
        let Ok(job) = job else {
            tracing::warn!(job = %id, "retention: passing over a job record that cannot be read");
            continue;
        };
        if job.created_at > cutoff {
            break;
        }
        let expired =
            job.state != JobState::Running && job.finished_at.is_some_and(|t| t <= cutoff);
        if expired {
            events.delete(job.id)?;
            store.delete_job(job.id)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Sweep every `every` until `shutdown`.
pub fn spawn_sweeper(
    store: Store,
    events: EventLog,
    ttl: Duration,
    every: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let (store, events) = (store.clone(), events.clone());
            match tokio::task::spawn_blocking(move || sweep(&store, &events, ttl)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(removed)) => tracing::info!(removed, "retention: removed finished jobs"),
                Ok(Err(error)) => {
                    tracing::error!(error = %format!("{error:#}"), "retention sweep failed")
                }
                Err(error) => tracing::error!(%error, "retention sweep panicked"),
            }
        }
    })
}
