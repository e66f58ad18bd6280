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

use std::sync::Arc;

use anyhow::Result;
use serde_json::value::RawValue;
use sled::IVec;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::capabilities::ProgressSink;
use crate::pipeline::Pipeline;
use crate::runtime::Call;
use crate::runtime::bindings::types::Context;
use crate::store::{ItemError, ItemResult, ItemStatus, StageRun, now_ms};

/// Where an item's live progress goes, besides its result.
#[derive(Clone, Default)]
pub struct ItemHooks {
    /// The guest's `progress.report` calls.
    pub progress: Option<ProgressSink>,
    /// Each stage starting and ending.
    pub stages: Option<StageSink>,
}

/// A stage starting (`duration_ms` is `None`) or ending for an item.
#[derive(Debug, Clone)]
pub struct StageUpdate {
    pub index: u64,
    pub stage: String,
    /// `running`, `succeeded` or `failed`.
    pub status: &'static str,
    pub duration_ms: Option<f64>,
}

pub type StageSink = Arc<dyn Fn(StageUpdate) + Send + Sync>;

/// What identifies an item for a run.
#[derive(Debug, Clone, Copy)]
pub struct ItemRef {
    pub job_id: Uuid,
    pub item_id: Uuid,
    pub index: u64,
}

/// Run `item` through every stage and store its result. `resume` looks for stage outputs
/// stored by an earlier, interrupted run and reuses them.
pub async fn run_item(
    pipeline: &Pipeline,
    item: ItemRef,
    input: IVec,
    resume: bool,
    cancel: &CancellationToken,
    hooks: &ItemHooks,
) -> Result<ItemResult> {
    let tell = |stage: &str, status, duration_ms| {
        if let Some(sink) = &hooks.stages {
            sink(StageUpdate {
                index: item.index,
                stage: stage.to_string(),
                status,
                duration_ms,
            });
        }
    };
    let store = pipeline.store();
    let checkpoint_after =
        std::time::Duration::from_millis(pipeline.config.run.checkpoint_after_ms);
    let mut outputs: Vec<(&str, Vec<u8>)> = Vec::with_capacity(pipeline.stages.len());
    let mut checkpointed: Vec<&str> = Vec::new();
    let mut runs = Vec::with_capacity(pipeline.stages.len());
    let last = pipeline.stages.len() - 1;
    for (position, stage) in pipeline.stages.iter().enumerate() {
        let name = stage.config.name.as_str();
        if resume
            && position < last
            && let Some(output) = store.stage_output(item.job_id, item.index, name)?
        {
            runs.push(StageRun {
                stage: name.into(),
                digest: String::new(),
                attempt: 0,
                duration_ms: 0.0,
                cpu_ms: 0.0,
                reused: true,
            });
            outputs.push((name, output.to_vec()));
            checkpointed.push(name);
            continue;
        }
        let envelope = envelope(&input, &outputs);
        let _permit = stage.enter().await;
        let component = stage.current();
        let call = Call {
            caps: Arc::clone(&pipeline.caps),
            context: Context {
                job_id: item.job_id.to_string(),
                item_id: item.item_id.to_string(),
                item_index: item.index,
                attempt: 1,
                stage: name.to_string(),
            },
            limits: stage.config.limits,
            cancel: cancel.clone(),
            progress: hooks.progress.clone(),
        };
        tell(name, "running", None);
        match component.run(call, &envelope).await {
            Ok((output, stats)) => {
                tell(
                    name,
                    "succeeded",
                    Some(stats.duration.as_secs_f64() * 1000.0),
                );
                runs.push(StageRun {
                    stage: name.into(),
                    digest: component.meta.digest.clone(),
                    attempt: 1,
                    duration_ms: stats.duration.as_secs_f64() * 1000.0,
                    cpu_ms: stats.cpu.as_secs_f64() * 1000.0,
                    reused: false,
                });
                if position < last && stats.duration >= checkpoint_after {
                    store.put_stage_outputs(
                        item.job_id,
                        item.index,
                        [(name, output.as_bytes())],
                    )?;
                    checkpointed.push(name);
                }
                outputs.push((name, output.into_bytes()));
            }
            Err(failure) => {
                tell(name, "failed", None);
                let error = ItemError {
                    stage: name.into(),
                    kind: failure.kind().as_str().into(),
                    message: format!("stage `{name}`: {failure}"),
                    retryable: failure.retryable(),
                };
                let unsaved = outputs.iter().filter(|(n, _)| !checkpointed.contains(n));
                store.put_stage_outputs(
                    item.job_id,
                    item.index,
                    unsaved.map(|(n, o)| (*n, o.as_slice())),
                )?;
                return finish(pipeline, item, ItemStatus::Failed, None, Some(error), runs);
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
    )?;
    if !checkpointed.is_empty() {
        store.remove_stage_outputs(item.job_id, item.index, checkpointed)?;
    }
    Ok(result)
}

fn finish(
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
    };
    pipeline.store().put_result(item.job_id, &result)?;
    Ok(result)
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
