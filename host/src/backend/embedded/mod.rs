//! The embedded backend: one process, one sled store, the default mode.
//!
//! - [`manager`]: the [`JobManager`] that runs submitted jobs in tasks of this process, resumes
//!   them after a restart and reprocesses dead letters.
//! - [`events`]: each job's event log in sled, published once durable ([`EventLog`]).
//! - [`items`]: [`crate::backend::ItemStore`] on the sled store.
//! - [`retention`]: the sweeper that removes finished jobs.
//! - [`auto_reprocess`]: dead letters run again on a timer.

pub mod auto_reprocess;
mod events;
mod items;
mod manager;
pub mod retention;

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use uuid::Uuid;

pub use events::EventLog;
pub use manager::JobManager;

use crate::backend::{Events, JobBackend};
use crate::model::{
    CancelOutcome, Idempotency, ItemResult, JobOptions, JobRecord, JobState, Reprocess, Submitted,
};
use crate::store::{DeadLetter, Store};

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

    async fn results_from(&self, id: Uuid, skip: usize, limit: usize) -> Result<Vec<ItemResult>> {
        self.store
            .results(id, None)
            .skip(skip)
            .take(limit)
            .collect()
    }

    async fn dead_letters(
        &self,
        job: Option<Uuid>,
        stage: Option<&str>,
        after: Option<(Uuid, u64)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let mut letters = Vec::with_capacity(limit);
        for letter in self.store.dead_letters(job, after) {
            let letter = letter?;
            if stage.is_some_and(|stage| stage != letter.stage) {
                continue;
            }
            letters.push(letter);
            if letters.len() == limit {
                break;
            }
        }
        Ok(letters)
    }

    async fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>> {
        self.store.dead_letter(job, index)
    }

    async fn discard_dead_letter(&self, job: Uuid, index: u64) -> Result<bool> {
        self.store.remove_dead_letter(job, index)
    }

    async fn reprocess(&self, job: Uuid, indices: Option<Vec<u64>>) -> Result<Reprocess> {
        self.manager.reprocess(job, indices)
    }

    async fn unfinished_items(&self) -> Result<Option<u64>> {
        self.manager.unfinished_items().map(Some)
    }

    fn events(&self) -> Events {
        Arc::new(self.events.clone())
    }
}
