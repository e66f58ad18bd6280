//! Runs emitted effects in the background, each at most once per (handler, key).
//!
//! The queue is the store's `effects_pending` tree, not a channel, so it survives a restart and
//! costs no memory per queued effect; `dispatch.emit` wakes the runner. One runner serves
//! every pipeline of the node: an effect runs on the handler of the pipeline that emitted it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::model::now_ms;
use crate::pipeline::{NodeResources, Pipelines};
use crate::runtime::bindings::types::Context;
use crate::store::{EffectRecord, EffectState, Store};

pub struct EffectRunner {
    store: Store,
    /// Woken by `dispatch.emit`.
    waiting: Arc<Notify>,
    pipelines: Arc<Pipelines>,
    in_flight: AtomicUsize,
    settled: Notify,
}

/// How long the runner sleeps when it finds the queue empty and nobody wakes it.
const IDLE_POLL: Duration = Duration::from_millis(500);

impl EffectRunner {
    /// Start running the effects of `pipelines`, the node's `effect_concurrency` at a time,
    /// until `shutdown`.
    pub fn spawn(
        resources: &NodeResources,
        pipelines: Arc<Pipelines>,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, JoinHandle<Result<()>>) {
        let concurrency = resources.sizing.effect_concurrency;
        let runner = Arc::new(Self {
            store: resources.store.clone(),
            waiting: resources.effects_waiting.clone(),
            pipelines,
            in_flight: AtomicUsize::new(0),
            settled: Notify::new(),
        });
        let task = tokio::spawn(runner.clone().run(concurrency, shutdown));
        (runner, task)
    }

    async fn run(self: Arc<Self>, concurrency: usize, shutdown: CancellationToken) -> Result<()> {
        let permits = Arc::new(Semaphore::new(concurrency));
        let store = self.store.clone();
        while !shutdown.is_cancelled() {
            let pending = store.pending_effects(concurrency * 4)?;
            let mut claimed = 0;
            for key in pending {
                let permit = permits.clone().acquire_owned().await.expect("never closed");
                // Counted before the claim, so that `wait_idle` never sees an effect that is
                // neither pending nor in flight.
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                let Some(record) = store.claim_effect(&key)? else {
                    self.in_flight.fetch_sub(1, Ordering::SeqCst);
                    continue;
                };
                claimed += 1;
                let runner = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    // The claim must be durable before the effect can happen: after a crash,
                    // a claimed effect is found `running` and never run again.
                    match runner.store.flush().await {
                        Ok(()) => runner.execute(record, shutdown).await,
                        Err(error) => {
                            tracing::error!(handler = %record.handler, key = %record.key, error = %format!("{error:#}"), "cannot make an effect's claim durable; not running it");
                        }
                    }
                    runner.in_flight.fetch_sub(1, Ordering::SeqCst);
                    runner.settled.notify_waiters();
                    drop(permit);
                });
            }
            // Nothing to claim (none pending, or only records still being written): wait for
            // the next emit instead of scanning again at once.
            if claimed == 0 {
                self.settled.notify_waiters();
                tokio::select! {
                    () = self.waiting.notified() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                    () = shutdown.cancelled() => {}
                }
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
        if let Err(error) = self.store.finish_effect(&record) {
            tracing::error!(handler = %record.handler, key = %record.key, error = %format!("{error:#}"), "cannot store an effect's outcome");
        }
    }

    /// Wait until no effect is queued or running.
    pub async fn wait_idle(&self) {
        loop {
            let settled = self.settled.notified();
            if !self.store.has_pending_effects() && self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            self.waiting.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(50), settled).await;
        }
    }
}
