//! Prometheus metrics, served at `GET /metrics`. Every name is here, with what it counts; call
//! sites use the small functions below, so a metric cannot be spelled two ways.
//!
//! Recording goes through the `metrics` facade: without an installed recorder (`stagehand run`,
//! the in-process tests) it costs a few atomic loads and records nothing.

use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds, from 1 ms to 2 minutes: stages and LLM calls span that range.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 120.0,
];

/// Install the process-wide recorder; the handle renders the text exposition format.
pub fn install() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &DURATION_BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")
}

/// One try of a stage ended: `outcome` is `succeeded` or the failure kind (`timeout`,
/// `cpu_budget`, `trap`, ...). Wall-clock and guest CPU time per stage.
pub fn stage_try(pipeline: &str, stage: &str, outcome: &str, duration: Duration, cpu: Duration) {
    let labels = [
        ("pipeline", pipeline.to_string()),
        ("stage", stage.to_string()),
        ("outcome", outcome.to_string()),
    ];
    counter!("stagehand_stage_tries_total", &labels).increment(1);
    let labels = [
        ("pipeline", pipeline.to_string()),
        ("stage", stage.to_string()),
    ];
    histogram!("stagehand_stage_duration_seconds", &labels).record(duration.as_secs_f64());
    histogram!("stagehand_stage_cpu_seconds", &labels).record(cpu.as_secs_f64());
}

/// An item ended (`succeeded` or `failed`).
pub fn item_finished(pipeline: &str, status: &str) {
    counter!("stagehand_items_total", "pipeline" => pipeline.to_string(), "status" => status.to_string()).increment(1);
}

/// Items being run through their stages right now; the guard counts one while it lives.
pub fn item_in_flight() -> InFlight {
    gauge!("stagehand_items_in_flight").increment(1.0);
    InFlight("stagehand_items_in_flight")
}

/// SSE streams open right now.
pub fn sse_subscriber() -> InFlight {
    gauge!("stagehand_sse_subscribers").increment(1.0);
    InFlight("stagehand_sse_subscribers")
}

/// LLM requests waiting for the provider's limits (the queue in front of the provider).
pub fn llm_waiting() -> InFlight {
    gauge!("stagehand_llm_waiting_requests").increment(1.0);
    InFlight("stagehand_llm_waiting_requests")
}

/// Stage instances alive right now (each holds a `[run] max_stage_calls` slot).
pub fn stage_instance_running() -> InFlight {
    gauge!("stagehand_stage_instances_running").increment(1.0);
    InFlight("stagehand_stage_instances_running")
}

/// `[run] memory_budget_mib`, in bytes: what items in flight may be charged at once.
pub fn memory_budget(bytes: f64) {
    gauge!("stagehand_items_memory_budget_bytes").set(bytes);
}

/// What the items in flight are charged against the memory budget, moved by `delta` bytes.
pub fn memory_charged(delta: f64) {
    gauge!("stagehand_items_memory_charged_bytes").increment(delta);
}

/// Items waiting for room in the memory budget before they start, right now.
pub fn item_waiting_for_memory() -> InFlight {
    gauge!("stagehand_items_waiting_for_memory").increment(1.0);
    InFlight("stagehand_items_waiting_for_memory")
}

/// Stage tries waiting on a host call without an instance (evicted), right now.
pub fn stage_call_waiting() -> InFlight {
    gauge!("stagehand_stage_calls_waiting").increment(1.0);
    InFlight("stagehand_stage_calls_waiting")
}

/// A stage run gave up its instance because a host call kept it waiting past
/// `[run] evict_after_ms`; it resumes by replay when the answer is in.
pub fn stage_evicted(pipeline: &str, stage: &str) {
    counter!("stagehand_stage_evictions_total", "pipeline" => pipeline.to_string(), "stage" => stage.to_string()).increment(1);
}

/// An outbound HTTP request of a stage (or `handler:NAME`) ended: `host` is the allowlist
/// entry it went to (`none` when it was refused before any), `outcome` a status class (`2xx`)
/// or `denied`, `too_large`, `timeout`, `connect_error`, `error`.
pub fn http_request(
    pipeline: &str,
    stage: &str,
    host: &str,
    outcome: &'static str,
    latency: Duration,
    response_bytes: usize,
) {
    let labels = [
        ("pipeline", pipeline.to_string()),
        ("stage", stage.to_string()),
        ("host", host.to_string()),
    ];
    let mut counted = labels.to_vec();
    counted.push(("outcome", outcome.to_string()));
    counter!("stagehand_outbound_requests_total", &counted).increment(1);
    histogram!("stagehand_outbound_request_duration_seconds", &labels)
        .record(latency.as_secs_f64());
    counter!("stagehand_outbound_response_bytes_total", &labels).increment(response_bytes as u64);
}

/// A stage try took `answers` host call answers from its journal (kept by an earlier try or
/// before a restart) instead of asking again.
pub fn journal_answers_reused(pipeline: &str, stage: &str, answers: u32) {
    if answers > 0 {
        counter!("stagehand_journal_answers_reused_total", "pipeline" => pipeline.to_string(), "stage" => stage.to_string())
            .increment(u64::from(answers));
    }
}

/// The embedded store made what was written durable (one sled flush: a write and a sync).
pub fn store_flushed() {
    counter!("stagehand_store_flushes_total").increment(1);
}

/// Decrements its gauge when dropped, however the scope ends.
pub struct InFlight(&'static str);

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(self.0).decrement(1.0);
    }
}

/// An LLM request ended: `outcome` is `ok`, `rate_limited`, `unavailable`, `rejected` or
/// `bad_response`; tokens as the provider reported them.
pub fn llm_request(call: &crate::model::LlmCall, latency: Duration) {
    let (provider, model) = (call.provider.clone(), call.model.clone());
    counter!("stagehand_llm_requests_total", "provider" => provider.clone(), "model" => model.clone(), "outcome" => call.outcome.clone())
        .increment(1);
    histogram!("stagehand_llm_request_duration_seconds", "provider" => provider.clone(), "model" => model.clone())
        .record(latency.as_secs_f64());
    if let Some(finish) = &call.finish_reason {
        // An estimate is counted apart, so that a dashboard can tell it from a report.
        let estimated = if call.usage_estimated {
            "true"
        } else {
            "false"
        };
        counter!("stagehand_llm_tokens_total", "provider" => provider.clone(), "model" => model.clone(), "kind" => "prompt", "estimated" => estimated)
            .increment(call.prompt_tokens.into());
        counter!("stagehand_llm_tokens_total", "provider" => provider.clone(), "model" => model.clone(), "kind" => "completion", "estimated" => estimated)
            .increment(call.completion_tokens.into());
        counter!("stagehand_llm_finish_reasons_total", "provider" => provider, "model" => model, "reason" => finish.clone())
            .increment(1);
    }
}

/// A stage's LLM call left `provider` for the next one of its route.
pub fn llm_failover(provider: &str) {
    counter!("stagehand_llm_failovers_total", "provider" => provider.to_string()).increment(1);
}

/// Items of running jobs not finished yet, set when metrics are scraped (in Redis mode, the
/// cluster's: the length of the work stream).
pub fn items_unfinished(count: u64) {
    gauge!("stagehand_items_unfinished").set(count as f64);
}

/// An item became a dead letter at `stage`.
pub fn dead_letter(pipeline: &str, stage: &str) {
    counter!("stagehand_dead_letters_total", "pipeline" => pipeline.to_string(), "stage" => stage.to_string()).increment(1);
}

/// An operator changed a stage's versions: `swap`, `canary`, `promote`, `rollback` or
/// `canary_dropped`; `synced`: another node of the cluster did, and this one followed.
pub fn stage_change(pipeline: &str, stage: &str, change: &'static str) {
    counter!("stagehand_stage_changes_total", "pipeline" => pipeline.to_string(), "stage" => stage.to_string(), "change" => change)
        .increment(1);
}

/// An operator changed the pipelines a node serves: `deploy` or `delete`; `synced`: another
/// node of the cluster did, and this one followed; `refused`: this one could not (see its log).
pub fn pipeline_change(pipeline: &str, change: &'static str) {
    counter!("stagehand_pipeline_changes_total", "pipeline" => pipeline.to_string(), "change" => change)
        .increment(1);
}

/// A kv namespace's entries were swapped: `reload` (its file, on this node), or `synced`
/// (content another node of the cluster reloaded).
pub fn kv_reload(pipeline: &str, namespace: &str, change: &'static str) {
    counter!("stagehand_kv_reloads_total", "pipeline" => pipeline.to_string(), "namespace" => namespace.to_string(), "change" => change)
        .increment(1);
}

/// A watched file changed and what it now holds was refused (`kind`: `stage` or `kv`), so the
/// old version or entries stay in use.
pub fn watched_change_refused(kind: &'static str, name: &str) {
    counter!("stagehand_watched_changes_refused_total", "kind" => kind, "name" => name.to_string())
        .increment(1);
}

/// Jobs by what became of them: `submitted`, `completed`, `cancelled`, `failed`.
pub fn job(pipeline: &str, event: &'static str) {
    counter!("stagehand_jobs_total", "pipeline" => pipeline.to_string(), "event" => event)
        .increment(1);
}

/// Redis mode: work entries this node took over from a node that stopped answering.
pub fn items_reclaimed(entries: u64) {
    counter!("stagehand_items_reclaimed_total").increment(entries);
}

/// A try of `stage` (a stage, or a handler's name) went past `budget` (`llm_calls`, `emits`,
/// `max_tokens`, ...) and failed with kind `budget`.
pub fn budget_exceeded(pipeline: &str, stage: &str, budget: &'static str) {
    counter!("stagehand_budget_exceeded_total", "pipeline" => pipeline.to_string(), "stage" => stage.to_string(), "budget" => budget)
        .increment(1);
}

/// A guest's `log.write` line was dropped: its try had used its log budget.
pub fn guest_log_dropped(pipeline: &str, stage: &str) {
    counter!("stagehand_guest_log_dropped_total", "pipeline" => pipeline.to_string(), "stage" => stage.to_string()).increment(1);
}

/// An HTTP handler panicked; the request was answered with a 500.
pub fn handler_panic() {
    counter!("stagehand_http_panics_total").increment(1);
}

/// An effect ended: `outcome` is `done`, `failed`, or `interrupted` (its runner stopped while it
/// ran; it is not run again).
pub fn effect_finished(pipeline: &str, handler: &str, outcome: &'static str) {
    counter!("stagehand_effects_total", "pipeline" => pipeline.to_string(), "handler" => handler.to_string(), "outcome" => outcome)
        .increment(1);
}
