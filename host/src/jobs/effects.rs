//! Runs emitted effects in the background, each at most once per (handler, key).
//!
//! The queue is the backend's ([`EffectQueue`]): the store's `effects_pending` tree in embedded
//! mode (it survives a restart and costs no memory per queued effect), a stream shared by every
//! node in Redis mode. One runner serves every pipeline of the node: an effect runs on the
//! handlers of the revision that emitted it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::EffectQueue;
use crate::model::now_ms;
use crate::pipeline::{NodeResources, Pipelines};
use crate::runtime::bindings::types::Context;
use crate::store::{EffectRecord, EffectState};

pub struct EffectRunner {
    queue: Arc<dyn EffectQueue>,
    pipelines: Arc<Pipelines>,
    /// Notified when an effect ends or a `take` found none, for [`Self::wait_idle`].
    settled: Notify,
}

/// How long the runner waits after the queue failed to answer.
const RETRY_AFTER: Duration = Duration::from_millis(500);

impl EffectRunner {
    /// Start running the effects of the node's queue, the node's `effect_concurrency` at a
    /// time, until `shutdown`.
    pub fn spawn(
        resources: &NodeResources,
        pipelines: Arc<Pipelines>,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, JoinHandle<Result<()>>) {
        let concurrency = resources.sizing.effect_concurrency;
        let runner = Arc::new(Self {
            queue: resources.effects.clone(),
            pipelines,
            settled: Notify::new(),
        });
        let task = tokio::spawn(runner.clone().run(concurrency, shutdown));
        (runner, task)
    }

    async fn run(self: Arc<Self>, concurrency: usize, shutdown: CancellationToken) -> Result<()> {
        let permits = Arc::new(Semaphore::new(concurrency));
        loop {
            // One free slot at least, then every other one.
            let first = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                () = shutdown.cancelled() => break,
            };
            let mut slots = vec![first];
            while let Ok(permit) = permits.clone().try_acquire_owned() {
                slots.push(permit);
            }
            // An empty answer means `take` waited a while: ask again.
            let taken = match self.queue.take(slots.len(), &shutdown).await {
                Ok(taken) => taken,
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "cannot take effects to run; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_AFTER) => {}
                        () = shutdown.cancelled() => {}
                    }
                    Vec::new()
                }
            };
            if taken.is_empty() {
                self.settled.notify_waiters();
            }
            for (effect, slot) in taken.into_iter().zip(slots) {
                let runner = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    runner.execute(effect, shutdown).await;
                    runner.settled.notify_waiters();
                    drop(slot);
                });
            }
        }
        Ok(())
    }

    async fn execute(&self, mut record: EffectRecord, shutdown: CancellationToken) {
        // The handlers of the revision the emitting stage ran on, like its `dispatch.call`s.
        let pipeline = self
            .pipelines
            .find(&record.pipeline, &record.revision)
            .await;
        let handler = pipeline
            .as_ref()
            .map(|p| (p, p.caps.handlers.get(&record.handler)));
        let outcome = match handler {
            Err(reason) => Err(format!("the effect cannot run: {reason}")),
            Ok((pipeline, None)) => Err(format!(
                "no handler `{}` in pipeline `{}`",
                record.handler,
                pipeline.name()
            )),
            Ok((pipeline, Some(handler))) => {
                let context = Context {
                    job_id: record.job_id.to_string(),
                    item_id: record.item_id.to_string(),
                    item_index: record.item_index,
                    attempt: 1,
                    stage: record.stage.clone(),
                };
                handler
                    .handle(
                        pipeline.caps.clone(),
                        context,
                        Some(&record.key),
                        &record.payload,
                        shutdown,
                    )
                    .await
                    .map(|(output, _)| output)
                    .map_err(|failure| failure.to_string())
            }
        };
        match outcome {
            Ok(output) => (record.state, record.output) = (EffectState::Done, Some(output)),
            Err(error) => {
                tracing::warn!(handler = %record.handler, key = %record.key, %error, "effect failed");
                (record.state, record.error) = (EffectState::Failed, Some(error));
            }
        }
        record.finished_at = Some(now_ms());
        crate::metrics::effect_finished(&record.pipeline, &record.handler, record.state.as_str());
        if let Err(error) = self.queue.finish(&record).await {
            tracing::error!(handler = %record.handler, key = %record.key, error = %format!("{error:#}"), "cannot store an effect's outcome");
        }
    }

    /// Wait until no effect is queued or running.
    pub async fn wait_idle(&self) {
        loop {
            let settled = self.settled.notified();
            if self.queue.is_empty().await.unwrap_or(false) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), settled).await;
        }
    }
}
