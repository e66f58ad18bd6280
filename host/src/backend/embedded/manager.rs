//! Jobs submitted to a server: persisted, started in the background on the pipeline they name,
//! cancellable, narrated in their event log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::EventLog;
use crate::config::PipelineConfig;
use crate::events::{Counts, Entry, Event};
use crate::jobs::{
    ItemHooks, ItemLimits, ItemRef, RunSettings, StageUpdate, item_limits, run_item, run_job,
    runnable,
};
use crate::model::{
    CancelOutcome, DEFAULT_PREVIEW_CHARS, Detail, Idempotency, ItemResult, ItemStatus, JobOptions,
    JobRecord, JobState, Reprocess, Submitted,
};
use crate::pipeline::{Pipeline, Pipelines};
use crate::store::Store;

pub struct JobManager {
    pipelines: Arc<Pipelines>,
    store: Store,
    events: EventLog,
    running: Mutex<HashMap<Uuid, CancellationToken>>,
    tasks: Mutex<JoinSet<()>>,
}

impl JobManager {
    pub fn new(pipelines: Arc<Pipelines>, store: Store, events: EventLog) -> Arc<Self> {
        Arc::new(Self {
            pipelines,
            store,
            events,
            running: Mutex::default(),
            tasks: Mutex::default(),
        })
    }

    /// Persist a job (its items, its record and its `job.started` event, flushed) and start it.
    /// When this returns the job survives a crash. With an idempotency key that a job already
    /// has, nothing is written and that job is the answer ([`Submitted::Existing`]), or a
    /// conflict if its request differed.
    pub async fn submit(
        self: &Arc<Self>,
        pipeline: &Arc<Pipeline>,
        items: Vec<Vec<u8>>,
        options: JobOptions,
        idempotency: Option<Idempotency>,
    ) -> Result<Submitted> {
        let store = &self.store;
        let job = JobRecord::submitted(
            pipeline.name(),
            &pipeline.revision,
            options,
            idempotency.as_ref(),
        );
        if let Some(idempotency) = &idempotency
            && let Some(existing) = store
                .claim_idempotency_key(&idempotency.key, job.id)
                .await?
        {
            return Ok(idempotency.repeat_of(existing));
        }
        self.events.append(
            job.id,
            &Event::JobStarted {
                total: items.len() as u64,
            },
        )?;
        let job = store.create_job(job, items.into_iter().map(Ok)).await?;
        self.start(job.clone(), pipeline.clone(), false);
        crate::metrics::job(pipeline.name(), "submitted");
        Ok(Submitted::New(job))
    }

    /// Start every job the store says is running: after a restart (a crash, or a shutdown
    /// that did not wait for them) they go on from what was stored. A job that cannot run
    /// (see [`runnable`]) or whose record cannot be read fails with the reason, once: a
    /// restart never runs into it again.
    pub async fn resume_unfinished(self: &Arc<Self>) -> Result<usize> {
        let mut resumed = 0;
        let store = self.store.clone();
        for (id, job) in store.job_entries() {
            let job = match job {
                Ok(job) => job,
                Err(error) => {
                    let reason = format!("the stored job record cannot be read: {error:#}");
                    tracing::error!(job = %id, reason, "failing a job that cannot be read");
                    store.put_job(&JobRecord::unreadable(id, reason.clone()))?;
                    self.fail(id, &reason)?;
                    continue;
                }
            };
            if job.state != JobState::Running || self.is_running(job.id) {
                continue;
            }
            let pipeline = match runnable(&self.pipelines, &job).await {
                Ok(pipeline) => pipeline,
                Err(reason) => {
                    tracing::error!(job = %job.id, reason, "failing a job that cannot run");
                    self.fail(job.id, &reason)?;
                    continue;
                }
            };
            tracing::info!(job = %job.id, "resuming an unfinished job");
            self.start(job, pipeline, true);
            resumed += 1;
        }
        store.flush().await?;
        Ok(resumed)
    }

    /// End a job as `failed` with `reason`, its counts as far as it came, and log `job.failed`.
    fn fail(&self, id: Uuid, reason: &str) -> Result<()> {
        let store = &self.store;
        if let Some(mut job) = store.job(id)? {
            crate::metrics::job(&job.pipeline, "failed");
            (job.succeeded, job.failed) = self.events.counts(id)?;
            job.state = JobState::Failed;
            job.error = Some(reason.to_string());
            job.finished_at = Some(crate::model::now_ms());
            store.put_job(&job)?;
        }
        self.events.append(
            id,
            &Event::JobFailed {
                error: reason.to_string(),
            },
        )?;
        Ok(())
    }

    /// Run `job` on `pipeline` (the revision it was submitted with) in a task of its own.
    fn start(self: &Arc<Self>, job: JobRecord, pipeline: Arc<Pipeline>, resume: bool) {
        let cancel = CancellationToken::new();
        self.running
            .lock()
            .expect("not poisoned")
            .insert(job.id, cancel.clone());
        let manager = self.clone();
        let mut tasks = self.tasks.lock().expect("not poisoned");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            use futures::FutureExt;
            let id = job.id;
            // A panic in a job must end that job, not leave it `running` for the next start.
            let outcome = std::panic::AssertUnwindSafe(manager.run(job, pipeline, resume, cancel))
                .catch_unwind()
                .await;
            let error = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!("{error:#}")),
                Err(panic) => Some(format!(
                    "the job's task panicked: {}",
                    crate::text::panic_message(panic.as_ref())
                )),
            };
            if let Some(error) = error {
                tracing::error!(job = %id, error, "job failed");
                if let Err(e) = manager.fail(id, &error) {
                    tracing::error!(job = %id, error = %format!("{e:#}"), "cannot record a job's failure");
                }
                let _ = manager.store.flush().await;
            }
            manager.running.lock().expect("not poisoned").remove(&id);
            manager.events.release(id);
        });
    }

    async fn run(
        &self,
        job: JobRecord,
        pipeline: Arc<Pipeline>,
        resume: bool,
        cancel: CancellationToken,
    ) -> Result<()> {
        let options = job.options.clone();
        let (concurrency, limits) = run_settings(&pipeline.config, &options);
        let every_stage = options.detail == Detail::Stages || job.total == 1;
        let (events, id) = (self.events.clone(), job.id);
        let hooks = ItemHooks {
            stages: Some(Arc::new(move |update: StageUpdate| {
                if !update.is_logged(every_stage) {
                    return;
                }
                if let Err(error) = events.append(id, &update.into_event()) {
                    tracing::error!(job = %id, error = %format!("{error:#}"), "cannot append a stage event");
                }
            })),
            ..ItemHooks::default()
        };
        let preview_chars = options.preview_chars.unwrap_or(DEFAULT_PREVIEW_CHARS);
        if resume {
            self.log_unlogged_results(&job, preview_chars)?;
        }
        let events = self.events.clone();
        let on_result = move |result: &ItemResult| {
            if let Err(error) = events.append_item(
                id,
                result.index,
                result.status == ItemStatus::Succeeded,
                result.preview(preview_chars),
                false,
            ) {
                tracing::error!(job = %id, error = %format!("{error:#}"), "cannot append an item event");
            }
        };
        let outcome = run_job(
            pipeline,
            job,
            RunSettings {
                resume,
                concurrency,
                limits,
            },
            cancel,
            hooks,
            on_result,
        )
        .await?;
        let job = &outcome.job;
        crate::metrics::job(
            &job.pipeline,
            match job.state {
                JobState::Cancelled => "cancelled",
                _ => "completed",
            },
        );
        let end = Event::job_ended(job.state == JobState::Cancelled).with_counts(Counts {
            succeeded: job.succeeded,
            failed: job.failed,
            not_run: outcome.not_run,
            total: job.total,
        });
        self.events.append(id, &end)?;
        self.store.flush().await
    }

    /// A crash can fall between an item's result and its `item.finished` event: before a job
    /// resumes, log the events its stored results lack, so every result is in the log once.
    fn log_unlogged_results(&self, job: &JobRecord, preview_chars: usize) -> Result<()> {
        // One bit per item: 125 KB for a million items.
        let mut logged = vec![0u64; (job.total as usize).div_ceil(64)];
        for entry in self.events.read(job.id, 0, u64::MAX) {
            if let (
                _,
                Entry {
                    event: Event::ItemFinished { index, .. },
                    ..
                },
            ) = entry?
                && let Some(word) = logged.get_mut((index / 64) as usize)
            {
                *word |= 1 << (index % 64);
            }
        }
        for result in self.store.results(job.id, None) {
            let result = result?;
            let seen = logged
                .get((result.index / 64) as usize)
                .is_some_and(|word| word & (1 << (result.index % 64)) != 0);
            if !seen {
                self.events.append_item(
                    job.id,
                    result.index,
                    result.status == ItemStatus::Succeeded,
                    result.preview(preview_chars),
                    false,
                )?;
            }
        }
        Ok(())
    }

    /// Run dead letters of a finished job again, from their failed stage, reusing the outputs
    /// of the stages before it: those at `indices`, or all of the job's. Each gets a new result
    /// and an `item.finished` event, then the job a new `job.completed` with its new counts.
    pub async fn reprocess(
        self: &Arc<Self>,
        job_id: Uuid,
        indices: Option<Vec<u64>>,
    ) -> Result<Reprocess> {
        let store = self.store.clone();
        let Some(mut job) = store.job(job_id)? else {
            return Ok(Reprocess::UnknownJob);
        };
        if self.is_running(job_id) || job.state == JobState::Running {
            return Ok(Reprocess::Running);
        }
        let pipeline = match runnable(&self.pipelines, &job).await {
            Ok(pipeline) => pipeline,
            Err(reason) => return Ok(Reprocess::Unrunnable(reason)),
        };
        let letters: Vec<u64> = match indices {
            Some(indices) => {
                let mut found = Vec::with_capacity(indices.len());
                for index in indices {
                    if store.dead_letter(job_id, index)?.is_some() {
                        found.push(index);
                    }
                }
                found
            }
            None => store
                .dead_letters(Some(job_id), None)
                .map(|letter| letter.map(|l| l.index))
                .collect::<Result<_>>()?,
        };
        if letters.is_empty() {
            return Ok(Reprocess::Started(0));
        }
        let started = letters.len();
        job.state = JobState::Running;
        job.finished_at = None;
        store.put_job(&job)?;
        let cancel = CancellationToken::new();
        self.running
            .lock()
            .expect("not poisoned")
            .insert(job_id, cancel.clone());
        let manager = self.clone();
        let mut tasks = self.tasks.lock().expect("not poisoned");
        tasks.spawn(async move {
            if let Err(error) = manager.run_reprocess(&pipeline, job, letters, cancel).await {
                tracing::error!(job = %job_id, error = %format!("{error:#}"), "reprocessing failed");
            }
            manager.running.lock().expect("not poisoned").remove(&job_id);
            manager.events.release(job_id);
        });
        Ok(Reprocess::Started(started))
    }

    async fn run_reprocess(
        &self,
        pipeline: &Pipeline,
        mut job: JobRecord,
        letters: Vec<u64>,
        cancel: CancellationToken,
    ) -> Result<()> {
        use futures::StreamExt;
        let store = self.store.clone();
        let preview_chars = job.options.preview_chars.unwrap_or(DEFAULT_PREVIEW_CHARS);
        let (concurrency, limits) = run_settings(&pipeline.config, &job.options);
        let passed = std::sync::atomic::AtomicU64::new(0);
        let outcomes = futures::stream::iter(letters)
            .map(|index| {
                let (store, cancel, job, passed) = (&store, &cancel, &job, &passed);
                async move {
                    let Some(input) = store.item(job.id, index)? else {
                        return Ok(());
                    };
                    if cancel.is_cancelled() {
                        return Ok(());
                    }
                    let item = ItemRef {
                        job_id: job.id,
                        item_id: job.item_id(index),
                        index,
                    };
                    let hooks = ItemHooks::default();
                    let result =
                        run_item(pipeline, item, input, true, limits, cancel, &hooks).await?;
                    let succeeded = result.status == ItemStatus::Succeeded;
                    if succeeded {
                        passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.events.append_item(
                        job.id,
                        index,
                        succeeded,
                        result.preview(preview_chars),
                        true,
                    )?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect::<Vec<Result<()>>>()
            .await;
        let passed = passed.into_inner();
        job.succeeded += passed;
        job.failed = job.failed.saturating_sub(passed);
        job.state = JobState::Completed;
        job.finished_at = Some(crate::model::now_ms());
        store.put_job(&job)?;
        let end = Event::job_ended(false).with_counts(Counts {
            succeeded: job.succeeded,
            failed: job.failed,
            not_run: 0,
            total: job.total,
        });
        self.events.append(job.id, &end)?;
        store.flush().await?;
        outcomes.into_iter().collect()
    }

    /// Stop a running job: no new stage starts, running guests are interrupted.
    pub fn cancel(&self, id: Uuid) -> Result<CancelOutcome> {
        if let Some(token) = self.running.lock().expect("not poisoned").get(&id) {
            token.cancel();
            return Ok(CancelOutcome::Cancelling);
        }
        Ok(match self.store.job(id)? {
            Some(job) => CancelOutcome::Finished(job.state),
            None => CancelOutcome::Unknown,
        })
    }

    /// The node's store, where this manager's jobs live.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Items of running jobs that have not finished (waiting or in a stage): the queue depth.
    pub fn unfinished_items(&self) -> Result<u64> {
        let running: Vec<Uuid> = self
            .running
            .lock()
            .expect("not poisoned")
            .keys()
            .copied()
            .collect();
        let mut unfinished = 0;
        for id in running {
            if let Some(job) = self.store.job(id)? {
                let (succeeded, failed) = self.events.counts(id)?;
                unfinished += job.total.saturating_sub(succeeded + failed);
            }
        }
        Ok(unfinished)
    }

    pub fn is_running(&self, id: Uuid) -> bool {
        self.running.lock().expect("not poisoned").contains_key(&id)
    }

    /// Wait for running jobs to end, at most `deadline`; how many were still running.
    pub async fn wait(&self, deadline: Duration) -> usize {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("not poisoned"));
        let _ = tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.len()
    }
}

/// Items in flight and time limits for a job's `options` over its pipeline's settings.
fn run_settings(config: &PipelineConfig, options: &JobOptions) -> (usize, ItemLimits) {
    let concurrency = if options.sequential {
        1
    } else {
        options
            .concurrency
            .unwrap_or(config.run.concurrency)
            .min(config.limits.max_concurrency)
    };
    (concurrency, item_limits(config, options))
}
