//! One item through the pipeline's stages.
//!
//! Each stage gets the envelope `{"item": ..., "stages": {"<name>": <output>, ...}}` built by
//! concatenating stored JSON (nothing is parsed on the way).
//!
//! Checkpoints: a stage that took at least `[run] checkpoint_after_ms` (an LLM call, say) has
//! its output written to the store before the next stage starts, so a crash or a resume does
//! not pay for it twice; a stage quicker than that is cheaper to run again than to write. When
//! an item fails, every output it has is checkpointed, so reprocessing starts at the failed
//! stage. When it succeeds, its result holds every stage's output and its checkpoints go.
//!
//! Journals: a stage's host call answers are kept in the store while the stage runs
//! (`capabilities/journal.rs`), so that its next try, a restart or a reprocess does not ask
//! the LLM again for what it answered; a stage's journal goes once its output is kept (a
//! checkpoint or the result). A failed stage's journal stays for a reprocess.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::value::RawValue;
use sled::IVec;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::capabilities::{Durable, Journal, ProgressSink};
use crate::config::RetryPolicy;
use crate::model::{Attempt, ItemError, ItemResult, ItemStatus, StageRun, now_ms};
use crate::pipeline::Pipeline;
use crate::runtime::bindings::types::Context;
use crate::runtime::{Call, Failure, FailureKind};
use crate::store::DeadLetter;

/// Where an item's live progress goes, besides its result.
#[derive(Clone, Default)]
pub struct ItemHooks {
    /// The guest's `progress.report` calls.
    pub progress: Option<ProgressSink>,
    /// Each stage starting and ending.
    pub stages: Option<StageSink>,
}

/// A stage starting (`duration_ms` is `None`), ending, or failing a try that will be retried.
#[derive(Debug, Clone)]
pub struct StageUpdate {
    pub index: u64,
    pub stage: String,
    /// `running`, `succeeded`, `failed` or `retrying`.
    pub status: &'static str,
    /// The try this update is about: 1, 2, ...
    pub attempt: u32,
    pub duration_ms: Option<f64>,
    /// Why a try failed (`retrying` and `failed`).
    pub error: Option<String>,
    /// For `retrying`: how long until the next try.
    pub retry_in_ms: Option<u64>,
}

impl StageUpdate {
    /// Whether a job's log tells this update: every one with `every_stage` (the job asked for
    /// `detail: "stages"`, or has one item), else retries only, the story of a slow or failed
    /// item.
    pub fn is_logged(&self, every_stage: bool) -> bool {
        every_stage || self.status == "retrying"
    }

    /// The `item.stage` event telling it.
    pub fn into_event(self) -> crate::events::Event {
        crate::events::Event::ItemStage {
            index: self.index,
            stage: self.stage,
            status: self.status.to_string(),
            attempt: self.attempt,
            duration_ms: self.duration_ms,
            error: self.error,
            retry_in_ms: self.retry_in_ms,
        }
    }
}

pub type StageSink = Arc<dyn Fn(StageUpdate) + Send + Sync>;

/// What identifies an item for a run.
#[derive(Debug, Clone, Copy)]
pub struct ItemRef {
    pub job_id: Uuid,
    pub item_id: Uuid,
    pub index: u64,
}

/// Limits a job may set over the pipeline's.
#[derive(Debug, Clone, Copy, Default)]
pub struct ItemLimits {
    /// Every stage try's wall-clock limit, instead of the stage's own.
    pub stage_timeout: Option<Duration>,
    /// The whole item's, retries and back-off included.
    pub item_timeout: Option<Duration>,
    /// LLM tokens the whole job may use.
    pub max_tokens: Option<u64>,
}

/// Run `item` through every stage and store its result. `resume` looks for stage outputs
/// stored by an earlier, interrupted run and reuses them. A stage that fails in a way that may
/// pass (see [`Failure::retryable`]) is tried again, up to its `max_attempts`, after an
/// exponential back-off with jitter, or after the provider's `Retry-After` if that is longer.
// Log lines of the item (the host's, and the guest's `log.write`) carry its ids.
#[tracing::instrument(name = "item", skip_all, fields(job = %item.job_id, item = %item.item_id, index = item.index))]
pub async fn run_item(
    pipeline: &Pipeline,
    item: ItemRef,
    input: IVec,
    resume: bool,
    limits: ItemLimits,
    cancel: &CancellationToken,
    hooks: &ItemHooks,
) -> Result<ItemResult> {
    let tell = |stage: &str,
                status,
                attempt,
                duration_ms,
                error: Option<&Failure>,
                retry_in: Option<Duration>| {
        if let Some(sink) = &hooks.stages {
            sink(StageUpdate {
                index: item.index,
                stage: stage.to_string(),
                status,
                attempt,
                duration_ms,
                error: error.map(ToString::to_string),
                retry_in_ms: retry_in.map(|d| d.as_millis() as u64),
            });
        }
    };
    // Past the node's memory budget an item waits here, before it holds anything else; a
    // cancel ends the wait, and the first stage sees the cancel.
    let _memory = tokio::select! {
        charge = pipeline.memory.admit(input.len()) => Some(charge),
        () = cancel.cancelled() => None,
    };
    let _in_flight = crate::metrics::item_in_flight();
    let store = pipeline.items();
    let checkpoint_after = Duration::from_millis(pipeline.config.run.checkpoint_after_ms);
    // The whole item, retries and back-off included, ends by this time.
    let item_deadline = limits
        .item_timeout
        .map(|limit| (tokio::time::Instant::now() + limit, limit));
    let mut outputs: Vec<(&str, Vec<u8>)> = Vec::with_capacity(pipeline.stages.len());
    let mut checkpointed: Vec<&str> = Vec::new();
    // Stages that succeeded with a journal in the store, to remove once their output is kept.
    let mut journaled: Vec<(&str, usize)> = Vec::new();
    let mut runs = Vec::with_capacity(pipeline.stages.len());
    let last = pipeline.stages.len() - 1;
    for (position, stage) in pipeline.stages.iter().enumerate() {
        let name = stage.config.name.as_str();
        if resume
            && position < last
            && let Some(output) = store.stage_output(item.job_id, item.index, name).await?
        {
            runs.push(StageRun {
                stage: name.into(),
                digest: String::new(),
                attempt: 0,
                duration_ms: 0.0,
                cpu_ms: 0.0,
                reused: true,
                llm: Vec::new(),
                runs: 0,
                answers_reused: 0,
                config_digest: String::new(),
            });
            outputs.push((name, output));
            checkpointed.push(name);
            continue;
        }
        let envelope = envelope(&input, &outputs);
        let durable = Durable {
            items: pipeline.caps.items.clone(),
            job: item.job_id,
            index: item.index,
            stage: name.to_string(),
        };
        // A fresh item has no journal yet: only a resumed one reads the store for it.
        let mut journal = if resume {
            Journal::load(durable).await?
        } else {
            Journal::durable(durable)
        };
        let policy = stage.config.retry;
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut attempt = 1;
        let outcome = loop {
            let mut stage_limits = stage.config.limits;
            if let Some(timeout) = limits.stage_timeout {
                stage_limits.timeout = timeout;
            }
            // The item's deadline shortens the try; reaching it is the item's timeout.
            let mut item_limit = None;
            if let Some((deadline, limit)) = item_deadline {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left < stage_limits.timeout {
                    stage_limits.timeout = left;
                    item_limit = Some(limit);
                }
            }
            let (tried, used, component) = if stage_limits.timeout.is_zero() {
                (
                    Err(Failure::Timeout(item_limit.unwrap_or_default())),
                    None,
                    None,
                )
            } else {
                let _permit = stage.enter().await;
                let component = stage.version_for(item.item_id);
                let context = Context {
                    job_id: item.job_id.to_string(),
                    item_id: item.item_id.to_string(),
                    item_index: item.index,
                    attempt,
                    stage: name.to_string(),
                };
                let call = Call {
                    cancel: cancel.clone(),
                    progress: hooks.progress.clone(),
                    job_max_tokens: limits.max_tokens,
                    journal: std::mem::take(&mut journal),
                    ..pipeline.stage_call(context, stage_limits)
                };
                tell(name, "running", attempt, None, None, None);
                let (tried, used) = component
                    .run(call, &envelope)
                    .instrument(tracing::info_span!("stage", stage = name, attempt))
                    .await;
                let outcome = match &tried {
                    Ok(_) => "succeeded",
                    Err(failure) => failure.kind().as_str(),
                };
                crate::metrics::stage_try(pipeline.name(), name, outcome, used.duration, used.cpu);
                crate::metrics::journal_answers_reused(
                    pipeline.name(),
                    name,
                    used.journal.reused(),
                );
                (tried, Some(used), Some(component))
            };
            let mut used = used;
            let failure = match tried {
                Ok(output) => {
                    break Ok((output, used.expect("it ran"), component.expect("it ran")));
                }
                Err(Failure::Timeout(_)) if item_limit.is_some() => {
                    Failure::Timeout(item_limit.expect("checked"))
                }
                Err(failure) => failure,
            };
            // The next try (or a reprocess) starts from this one's answers, less those that
            // made it fail.
            if let Some(used) = &mut used {
                let tried = std::mem::take(&mut used.journal);
                journal = tried.next_try(matches!(failure, Failure::Retryable(_)));
            }
            attempts.push(Attempt {
                attempt,
                kind: failure.kind().as_str().into(),
                message: failure.to_string(),
                at: now_ms(),
                cpu_ms: used.as_ref().map(|used| used.cpu.as_secs_f64() * 1e3),
                llm: used.map(|used| used.llm).unwrap_or_default(),
            });
            let retry_in = (failure.retryable() && attempt < policy.max_attempts)
                .then(|| next_try_delay(pipeline, name, &policy, item, attempt + 1));
            let in_time = |wait: Duration| {
                item_deadline
                    .is_none_or(|(deadline, _)| tokio::time::Instant::now() + wait < deadline)
            };
            match retry_in {
                Some(wait) if in_time(wait) && !cancel.is_cancelled() => {
                    tell(name, "retrying", attempt, None, Some(&failure), Some(wait));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = cancel.cancelled() => break Err(Failure::Cancelled),
                    }
                    attempt += 1;
                }
                _ => break Err(failure),
            }
        };
        match outcome {
            Ok((output, stats, component)) => {
                let duration_ms = stats.duration.as_secs_f64() * 1000.0;
                tell(name, "succeeded", attempt, Some(duration_ms), None, None);
                runs.push(StageRun {
                    stage: name.into(),
                    digest: component.meta.digest.clone(),
                    attempt,
                    duration_ms,
                    cpu_ms: stats.cpu.as_secs_f64() * 1000.0,
                    reused: false,
                    llm: stats.llm,
                    runs: stats.runs,
                    answers_reused: stats.journal.reused(),
                    config_digest: stage.config.settings.digest.clone(),
                });
                let held = stats.journal.store_len();
                if position < last && stats.duration >= checkpoint_after {
                    store
                        .put_stage_outputs(item.job_id, item.index, &[(name, output.as_bytes())])
                        .await?;
                    checkpointed.push(name);
                    if held > 0 {
                        store
                            .remove_journal(item.job_id, item.index, name, held)
                            .await?;
                    }
                } else if held > 0 {
                    journaled.push((name, held));
                }
                outputs.push((name, output.into_bytes()));
            }
            Err(failure) => {
                // Kept for a reprocess, without the answers a retry would not reuse.
                journal.flush().await?;
                tell(name, "failed", attempt, None, Some(&failure), None);
                let error = ItemError {
                    stage: name.into(),
                    kind: failure.kind().as_str().into(),
                    message: format!("stage `{name}`: {failure}"),
                    retryable: failure.retryable(),
                    attempts,
                };
                let unsaved: Vec<(&str, &[u8])> = outputs
                    .iter()
                    .filter(|(n, _)| !checkpointed.contains(n))
                    .map(|(n, o)| (*n, o.as_slice()))
                    .collect();
                store
                    .put_stage_outputs(item.job_id, item.index, &unsaved)
                    .await?;
                remove_journals(store, item, &journaled).await?;
                if failure.kind() != FailureKind::Cancelled {
                    crate::metrics::dead_letter(pipeline.name(), name);
                    let earlier = store.dead_letter(item.job_id, item.index).await?;
                    store
                        .put_dead_letter(&DeadLetter {
                            pipeline: pipeline.name().into(),
                            job_id: item.job_id,
                            index: item.index,
                            item_id: item.item_id,
                            stage: name.into(),
                            error: error.clone(),
                            created_at: earlier.as_ref().map_or_else(now_ms, |l| l.created_at),
                            reprocessed: earlier.map_or(0, |l| l.reprocessed + u32::from(resume)),
                        })
                        .await?;
                }
                return finish(pipeline, item, ItemStatus::Failed, None, Some(error), runs).await;
            }
        }
    }
    // The runtime checked that every output is JSON, so this is JSON too.
    let output = RawValue::from_string(stage_map(&outputs))?;
    let result = finish(
        pipeline,
        item,
        ItemStatus::Succeeded,
        Some(output),
        None,
        runs,
    )
    .await?;
    if !checkpointed.is_empty() {
        store
            .remove_stage_outputs(item.job_id, item.index, &checkpointed)
            .await?;
    }
    remove_journals(store, item, &journaled).await?;
    if resume {
        // A reprocessed dead letter that passed now.
        store.remove_dead_letter(item.job_id, item.index).await?;
    }
    Ok(result)
}

/// Drop the journals of stages whose output is now kept.
async fn remove_journals(
    store: &dyn crate::backend::ItemStore,
    item: ItemRef,
    stages: &[(&str, usize)],
) -> Result<()> {
    for &(stage, held) in stages {
        store
            .remove_journal(item.job_id, item.index, stage, held)
            .await?;
    }
    Ok(())
}

/// The wait before try `next` of a stage: the policy's back-off, jittered by the item's id
/// (items failing together spread out, and a rerun waits the same), or the provider's
/// `Retry-After` when that is longer.
fn next_try_delay(
    pipeline: &Pipeline,
    stage: &str,
    policy: &RetryPolicy,
    item: ItemRef,
    next: u32,
) -> Duration {
    let bits = Uuid::new_v5(&item.item_id, &next.to_be_bytes()).as_u128() as u64;
    let spread = (bits >> 11) as f64 / (1u64 << 53) as f64;
    let backoff = policy.delay(next, spread);
    pipeline
        .caps
        .llm
        .paused_for(stage)
        .map_or(backoff, |pause| pause.max(backoff))
}

async fn finish(
    pipeline: &Pipeline,
    item: ItemRef,
    status: ItemStatus,
    output: Option<Box<RawValue>>,
    error: Option<ItemError>,
    stages: Vec<StageRun>,
) -> Result<ItemResult> {
    let result = ItemResult {
        index: item.index,
        item_id: item.item_id,
        status,
        output,
        error,
        stages,
        finished_at: now_ms(),
        revision: pipeline.revision.clone(),
    };
    pipeline.items().put_result(item.job_id, &result).await?;
    crate::metrics::item_finished(
        pipeline.name(),
        match result.status {
            ItemStatus::Succeeded => "succeeded",
            ItemStatus::Failed => "failed",
        },
    );
    Ok(result)
}

/// What stage `stage` of an item gets: the item and the stored outputs of the stages before
/// it (a failed item checkpoints them), as the envelope. `None` if the item is gone.
pub async fn stage_input(
    pipeline: &Pipeline,
    item: ItemRef,
    stage: &str,
) -> Result<Option<String>> {
    let store = pipeline.items();
    let Some(input) = store.item(item.job_id, item.index).await? else {
        return Ok(None);
    };
    let mut outputs = Vec::new();
    for earlier in pipeline.stages.iter().map(|s| s.config.name.as_str()) {
        if earlier == stage {
            break;
        }
        if let Some(output) = store.stage_output(item.job_id, item.index, earlier).await? {
            outputs.push((earlier, output));
        }
    }
    Ok(Some(envelope(&input, &outputs)))
}

/// `{"item":<input>,"stages":{"<name>":<output>,...}}`.
fn envelope(input: &[u8], outputs: &[(&str, Vec<u8>)]) -> String {
    let stages = stage_map(outputs);
    let mut envelope = String::with_capacity(input.len() + stages.len() + 20);
    envelope.push_str("{\"item\":");
    envelope.push_str(&String::from_utf8_lossy(input));
    envelope.push_str(",\"stages\":");
    envelope.push_str(&stages);
    envelope.push('}');
    envelope
}

/// `{"<name>":<output>,...}`. Stage names are checked by the config to need no escaping, and
/// outputs are JSON already, so this concatenates instead of parsing.
fn stage_map(outputs: &[(&str, Vec<u8>)]) -> String {
    let mut map = String::with_capacity(
        outputs
            .iter()
            .map(|(n, o)| n.len() + o.len() + 4)
            .sum::<usize>()
            + 2,
    );
    map.push('{');
    for (i, (name, output)) in outputs.iter().enumerate() {
        if i > 0 {
            map.push(',');
        }
        map.push('"');
        map.push_str(name);
        map.push_str("\":");
        map.push_str(&String::from_utf8_lossy(output));
    }
    map.push('}');
    map
}

#[cfg(test)]
mod tests {
    use super::envelope;

    #[test]
    fn envelope_is_json_with_outputs_in_order() {
        let text = envelope(
            br#"{"a":1}"#,
            &[
                ("vision", br#"{"c":"x"}"#.to_vec()),
                ("rule", b"[1]".to_vec()),
            ],
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["item"]["a"], 1);
        assert_eq!(value["stages"]["vision"]["c"], "x");
        assert_eq!(value["stages"]["rule"][0], 1);
        let keys: Vec<_> = value["stages"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys.len(), 2);
        assert_eq!(envelope(b"null", &[]), r#"{"item":null,"stages":{}}"#);
    }
}
