//! The embedded backend: one process, one sled store, the default mode.
//!
//! - [`manager`]: the [`JobManager`] that runs submitted jobs in tasks of this process, resumes
//!   them after a restart and reprocesses dead letters.
//! - [`events`]: each job's event log in sled, published once durable ([`EventLog`]).
//! - [`items`]: [`crate::backend::ItemStore`] on the sled store.
//! - [`effects`]: [`crate::backend::EffectQueue`] and [`crate::backend::Records`] on it.
//! - [`retention`]: the sweeper that removes finished jobs.

mod effects;
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

use crate::backend::{DeadLetterFilter, Events, JobBackend, JobFilter};
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

impl Embedded {
    /// `job` with what the store keeps apart from its record: a running job's counts (from
    /// its event log) and the LLM tokens its items used.
    fn live(&self, mut job: JobRecord) -> Result<JobRecord> {
        if job.state == JobState::Running {
            (job.succeeded, job.failed) = self.events.counts(job.id)?;
        }
        job.llm_tokens = self.store.llm_tokens(job.id)?;
        Ok(job)
    }
}

#[async_trait]
impl JobBackend for Embedded {
    async fn submit(
        &self,
        pipeline: &Arc<crate::pipeline::Pipeline>,
        items: Vec<Vec<u8>>,
        options: JobOptions,
        idempotency: Option<Idempotency>,
    ) -> Result<Submitted> {
        self.manager
            .submit(pipeline, items, options, idempotency)
            .await
    }

    async fn job(&self, id: Uuid) -> Result<Option<JobRecord>> {
        self.store.job(id)?.map(|job| self.live(job)).transpose()
    }

    async fn jobs(
        &self,
        before: Option<Uuid>,
        filter: &JobFilter,
        limit: usize,
    ) -> Result<Vec<JobRecord>> {
        let mut jobs = Vec::with_capacity(limit);
        for job in self.store.jobs_before(before) {
            let job = job?;
            if !filter.lets_through(&job) {
                continue;
            }
            jobs.push(self.live(job)?);
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
        filter: &DeadLetterFilter,
        after: Option<(Uuid, u64)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.store
            .dead_letters(filter.job, after)
            .filter(|letter| !letter.as_ref().is_ok_and(|l| !filter.lets_through(l)))
            .take(limit)
            .collect()
    }

    async fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>> {
        self.store.dead_letter(job, index)
    }

    async fn discard_dead_letter(&self, job: Uuid, index: u64) -> Result<bool> {
        self.store.remove_dead_letter(job, index)
    }

    async fn reprocess(&self, job: Uuid, indices: Option<Vec<u64>>) -> Result<Reprocess> {
        self.manager.reprocess(job, indices).await
    }

    async fn lead(&self, _task: &'static str, _ttl: std::time::Duration) -> Result<bool> {
        Ok(true)
    }

    async fn unfinished_items(&self) -> Result<Option<u64>> {
        self.manager.unfinished_items().map(Some)
    }

    fn events(&self) -> Events {
        Arc::new(self.events.clone())
    }
}
