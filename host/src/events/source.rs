//! What a view of a job's log needs from the log, apart from where the log lives: the
//! embedded [`EventLog`] in sled, or a Redis stream per job (`crate::cluster`).

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use super::{Entry, EventLog};

#[async_trait]
pub trait EventSource: Send + Sync {
    /// A receiver that changes when `job` gets new readable events; its value is the last
    /// readable number, which readers must not read past.
    fn watch(&self, job: Uuid) -> Result<watch::Receiver<u64>>;

    /// Up to `limit` events numbered above `after` and up to `upto`, in order.
    async fn read(
        &self,
        job: Uuid,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Entry)>>;

    /// The number of `job`'s last event if that event ends the job.
    async fn ended_at(&self, job: Uuid) -> Result<Option<u64>>;

    /// The last view of a finished job went away: its wake-up channel may go.
    fn release(&self, job: Uuid);
}

#[async_trait]
impl EventSource for EventLog {
    fn watch(&self, job: Uuid) -> Result<watch::Receiver<u64>> {
        EventLog::watch(self, job)
    }

    async fn read(
        &self,
        job: Uuid,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Entry)>> {
        EventLog::read(self, job, after, upto).take(limit).collect()
    }

    async fn ended_at(&self, job: Uuid) -> Result<Option<u64>> {
        EventLog::ended_at(self, job)
    }

    fn release(&self, job: Uuid) {
        EventLog::release(self, job)
    }
}

/// A shared event source.
pub type Events = Arc<dyn EventSource>;
