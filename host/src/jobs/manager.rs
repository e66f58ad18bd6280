//! Jobs submitted to a server: persisted, started in the background, cancellable, narrated in
//! their event log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{ItemHooks, StageUpdate, run_job};
use crate::events::{Event, EventLog};
use crate::pipeline::Pipeline;
use crate::store::{ItemStatus, JobRecord, JobState};

/// Per-job settings a client may give at submission.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobOptions {
    /// Items in flight for this job (default: the pipeline's `[run] concurrency`).
    pub concurrency: Option<usize>,
    /// Run the items one at a time (seed 000: a model server that cannot take bursts).
    #[serde(default)]
    pub sequential: bool,
    /// Characters of output or error kept in `item.finished` previews (default 3,000).
    pub preview_chars: Option<usize>,
    /// `items` (default): one event per finished item. `stages`: also one as each stage of
    /// each item starts and ends. One-item jobs always get `stages`.
    #[serde(default)]
    pub detail: Detail,
    /// Free-form labels kept with the job.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detail {
    #[default]
    Items,
    Stages,
}

const DEFAULT_PREVIEW_CHARS: usize = 3000;

/// What became of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was running; it stops now.
    Cancelling,
    /// The job had already ended in this state.
    Finished(JobState),
    Unknown,
}

pub struct JobManager {
    pipeline: Arc<Pipeline>,
    events: EventLog,
    running: Mutex<HashMap<Uuid, CancellationToken>>,
    tasks: Mutex<JoinSet<()>>,
}

impl JobManager {
    pub fn new(pipeline: Arc<Pipeline>, events: EventLog) -> Arc<Self> {
        Arc::new(Self {
            pipeline,
            events,
            running: Mutex::default(),
            tasks: Mutex::default(),
        })
    }

    /// Persist a job (its items, its record and its `job.started` event, flushed) and start it.
    /// When this returns the job survives a crash.
    pub async fn submit(
        self: &Arc<Self>,
        items: Vec<Vec<u8>>,
        options: JobOptions,
    ) -> Result<JobRecord> {
        let mut job = JobRecord::new(&self.pipeline.config.name);
        job.labels = options.labels.clone();
        self.events.append(
            job.id,
            &Event::JobStarted {
                total: items.len() as u64,
            },
        )?;
        let job = self
            .pipeline
            .store()
            .create_job(job, items.into_iter().map(Ok))
            .await?;
        let cancel = CancellationToken::new();
        self.running
            .lock()
            .expect("not poisoned")
            .insert(job.id, cancel.clone());
        let manager = self.clone();
        let started = job.clone();
        let mut tasks = self.tasks.lock().expect("not poisoned");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let id = started.id;
            if let Err(error) = manager.run(started, options, cancel).await {
                tracing::error!(job = %id, error = %format!("{error:#}"), "job failed");
                let _ = manager.events.append(
                    id,
                    &Event::JobFailed {
                        error: format!("{error:#}"),
                    },
                );
            }
            manager.running.lock().expect("not poisoned").remove(&id);
            manager.events.release(id);
        });
        Ok(job)
    }

    async fn run(
        &self,
        job: JobRecord,
        options: JobOptions,
        cancel: CancellationToken,
    ) -> Result<()> {
        let concurrency = if options.sequential {
            1
        } else {
            options
                .concurrency
                .unwrap_or(self.pipeline.config.run.concurrency)
        };
        let mut hooks = ItemHooks::default();
        if options.detail == Detail::Stages || job.total == 1 {
            let (events, id) = (self.events.clone(), job.id);
            hooks.stages = Some(Arc::new(move |update: StageUpdate| {
                let event = Event::ItemStage {
                    index: update.index,
                    stage: update.stage,
                    status: update.status.to_string(),
                    duration_ms: update.duration_ms,
                };
                if let Err(error) = events.append(id, &event) {
                    tracing::error!(job = %id, error = %format!("{error:#}"), "cannot append a stage event");
                }
            }));
        }
        let preview_chars = options.preview_chars.unwrap_or(DEFAULT_PREVIEW_CHARS);
        let events = self.events.clone();
        let id = job.id;
        let on_result = move |result: &crate::store::ItemResult| {
            let preview = match (&result.output, &result.error) {
                (Some(output), _) => {
                    crate::text::truncate(output.get(), preview_chars).into_owned()
                }
                (None, Some(error)) => {
                    crate::text::truncate(&error.message, preview_chars).into_owned()
                }
                (None, None) => String::new(),
            };
            if let Err(error) = events.append_item(
                id,
                result.index,
                result.status == ItemStatus::Succeeded,
                preview,
            ) {
                tracing::error!(job = %id, error = %format!("{error:#}"), "cannot append an item event");
            }
        };
        let outcome = run_job(
            self.pipeline.clone(),
            job,
            false,
            concurrency,
            cancel,
            hooks,
            on_result,
        )
        .await?;
        let job = &outcome.job;
        let end = match job.state {
            JobState::Cancelled => Event::JobCancelled {
                succeeded: job.succeeded,
                failed: job.failed,
                not_run: outcome.not_run,
                total: job.total,
            },
            _ => Event::JobCompleted {
                succeeded: job.succeeded,
                failed: job.failed,
                total: job.total,
            },
        };
        self.events.append(id, &end)?;
        self.pipeline.store().flush().await
    }

    /// Stop a running job: no new stage starts, running guests are interrupted.
    pub fn cancel(&self, id: Uuid) -> Result<CancelOutcome> {
        if let Some(token) = self.running.lock().expect("not poisoned").get(&id) {
            token.cancel();
            return Ok(CancelOutcome::Cancelling);
        }
        Ok(match self.pipeline.store().job(id)? {
            Some(job) => CancelOutcome::Finished(job.state),
            None => CancelOutcome::Unknown,
        })
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
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
