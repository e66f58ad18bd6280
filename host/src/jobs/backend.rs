//! What the HTTP API asks of jobs, apart from where they live: [`Embedded`] (sled, this
//! process runs them) or Redis, where every node sees every job (`crate::cluster`).

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use uuid::Uuid;

use super::JobManager;
use crate::events::{EventLog, Events};
use crate::model::{CancelOutcome, Idempotency, JobOptions, Submitted};
use crate::model::{ItemResult, JobRecord, JobState};
use crate::store::Store;

#[async_trait]
pub trait JobBackend: Send + Sync {
    /// Persist a job and queue its items; when this returns the job survives a crash.
    async fn submit(
        &self,
        items: Vec<Vec<u8>>,
        options: JobOptions,
        idempotency: Option<Idempotency>,
    ) -> Result<Submitted>;

    /// A job with its counts up to now.
    async fn job(&self, id: Uuid) -> Result<Option<JobRecord>>;

    /// Up to `limit` jobs created before `before` (all, for `None`), newest first, in `state`
    /// if given.
    async fn jobs(
        &self,
        before: Option<Uuid>,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<Vec<JobRecord>>;

    /// Up to `limit` results with an index above `after` (all, for `None`), in index order.
    async fn results(&self, id: Uuid, after: Option<u64>, limit: usize) -> Result<Vec<ItemResult>>;

    /// Stop a job wherever its items run.
    async fn cancel(&self, id: Uuid) -> Result<CancelOutcome>;

    /// The jobs' event logs.
    fn events(&self) -> Events;
}

/// One process, one sled store: the default mode.
pub struct Embedded {
    pub manager: Arc<JobManager>,
    pub store: Store,
    pub events: EventLog,
}

#[async_trait]
impl JobBackend for Embedded {
    async fn submit(
        &self,
        items: Vec<Vec<u8>>,
        options: JobOptions,
        idempotency: Option<Idempotency>,
    ) -> Result<Submitted> {
        self.manager.submit(items, options, idempotency).await
    }

    async fn job(&self, id: Uuid) -> Result<Option<JobRecord>> {
        let Some(mut job) = self.store.job(id)? else {
            return Ok(None);
        };
        if job.state == JobState::Running {
            (job.succeeded, job.failed) = self.events.counts(id)?;
        }
        job.llm_tokens = self.store.llm_tokens(id)?;
        Ok(Some(job))
    }

    async fn jobs(
        &self,
        before: Option<Uuid>,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<Vec<JobRecord>> {
        let mut jobs = Vec::with_capacity(limit);
        for job in self.store.jobs_before(before) {
            let mut job = job?;
            if state.is_some_and(|state| state != job.state) {
                continue;
            }
            if job.state == JobState::Running {
                (job.succeeded, job.failed) = self.events.counts(job.id)?;
            }
            job.llm_tokens = self.store.llm_tokens(job.id)?;
            jobs.push(job);
            if jobs.len() == limit {
                break;
            }
        }
        Ok(jobs)
    }

    async fn results(&self, id: Uuid, after: Option<u64>, limit: usize) -> Result<Vec<ItemResult>> {
        self.store.results(id, after).take(limit).collect()
    }

    async fn cancel(&self, id: Uuid) -> Result<CancelOutcome> {
        self.manager.cancel(id)
    }

    fn events(&self) -> Events {
        Arc::new(self.events.clone())
    }
}
