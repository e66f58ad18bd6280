//! A job and its items as every layer records them: states, results, stage runs, errors.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{Idempotency, JobOptions};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    /// Every item has a result (some may have failed).
    Completed,
    Cancelled,
    /// The job could not run (options past the limits, a pipeline not served here, a store
    /// error): `error` says why. Its items are not run again.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    pub id: Uuid,
    pub pipeline: String,
    /// The pipeline's revision when the job was submitted: the job runs on it to the end.
    /// Empty in records written before revisions.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    pub state: JobState,
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// What the client asked for, kept so that a job resumed after a restart runs the same way.
    #[serde(default, deserialize_with = "super::JobOptions::lenient")]
    pub options: super::JobOptions,
    /// Why a `failed` job could not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// LLM tokens (prompt and completion) the job's items have used so far.
    #[serde(default)]
    pub llm_tokens: u64,
    /// The client's key for this submission, and a digest of its body: the same key with
    /// another body is a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_digest: String,
}

impl JobRecord {
    /// The record of a new job of `pipeline` in `revision` as submitted: options, labels,
    /// idempotency key.
    pub fn submitted(
        pipeline: &str,
        revision: &str,
        options: JobOptions,
        idempotency: Option<&Idempotency>,
    ) -> Self {
        let mut job = Self::new(pipeline);
        job.revision = revision.to_string();
        if let Some(idempotency) = idempotency {
            job.idempotency_key = Some(idempotency.key.clone());
            job.request_digest = idempotency.request_digest.clone();
        }
        job.labels = options.labels.clone();
        job.options = options;
        job
    }

    pub fn new(pipeline: &str) -> Self {
        Self {
            // Time-ordered, so the jobs tree lists jobs in creation order.
            id: Uuid::now_v7(),
            pipeline: pipeline.to_string(),
            revision: String::new(),
            state: JobState::Running,
            total: 0,
            succeeded: 0,
            failed: 0,
            created_at: now_ms(),
            finished_at: None,
            labels: Default::default(),
            options: Default::default(),
            error: None,
            llm_tokens: 0,
            idempotency_key: None,
            request_digest: String::new(),
        }
    }

    /// The record that replaces one that cannot be read: a failed job saying why.
    pub fn unreadable(id: Uuid, reason: String) -> Self {
        let created_at = id.get_timestamp().map_or(0, |t| {
            let (secs, nanos) = t.to_unix();
            secs * 1000 + u64::from(nanos / 1_000_000)
        });
        Self {
            id,
            state: JobState::Failed,
            error: Some(reason),
            created_at,
            finished_at: Some(now_ms()),
            ..Self::new("")
        }
    }

    /// Count one more finished item.
    pub fn count(&mut self, status: ItemStatus) {
        match status {
            ItemStatus::Succeeded => self.succeeded += 1,
            ItemStatus::Failed => self.failed += 1,
        }
    }

    /// An item's id: the same job and index always give the same id.
    pub fn item_id(&self, index: u64) -> Uuid {
        item_id(self.id, index)
    }
}

/// The id of item `index` of job `job`: a UUID v5 in the job's namespace.
pub fn item_id(job: Uuid, index: u64) -> Uuid {
    Uuid::new_v5(&job, &index.to_be_bytes())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    Succeeded,
    Failed,
}

/// Why an item failed: which stage, what kind of failure, and the message.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemError {
    pub stage: String,
    pub kind: String,
    pub message: String,
    pub retryable: bool,
    /// Every try of the failed stage, the last one included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

/// One failed try of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    pub attempt: u32,
    pub kind: String,
    pub message: String,
    /// When it failed, ms since the Unix epoch.
    pub at: u64,
    /// Guest CPU this try used (absent if it never started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<f64>,
    /// The LLM requests this try made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub llm: Vec<LlmCall>,
}

/// One request to an LLM provider during a try: which provider (with failover, each one
/// tried is a request of its own), what came of it, and what it used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LlmCall {
    pub provider: String,
    /// The model as the provider was asked for it.
    pub model: String,
    /// `ok`, `rate_limited`, `unavailable`, `rejected` or `bad_response`.
    pub outcome: String,
    /// Why the model stopped (`stop`, `length`, `content_filter`...), for an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
    /// The provider reported no usage: the tokens are the host's estimate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage_estimated: bool,
}

/// One stage's run for an item, as recorded in its result.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StageRun {
    pub stage: String,
    /// sha256 of the component version that ran.
    pub digest: String,
    pub attempt: u32,
    pub duration_ms: f64,
    /// Time the guest itself ran: the duration less time spent waiting on host calls.
    pub cpu_ms: f64,
    /// The output was found in the store (a resumed item) and not computed again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
    /// The LLM requests of the try that succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub llm: Vec<LlmCall>,
    /// Runs of the try that succeeded, when more than one: it waited without its instance
    /// (`[run] evict_after_ms`) and ran again from its start.
    #[serde(default, skip_serializing_if = "at_most_one")]
    pub runs: u32,
    /// Host call answers the try took from the stage's journal, kept by an earlier try or
    /// before a restart, instead of asking again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub answers_reused: u32,
    /// sha256 of the stage's `[stage.config]` settings it ran with (none: it has none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_digest: String,
}

fn at_most_one(n: &u32) -> bool {
    *n <= 1
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemResult {
    pub index: u64,
    pub item_id: Uuid,
    pub status: ItemStatus,
    /// The pipeline revision the item ran on (empty: it ran no stage, or was recorded before
    /// revisions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    /// Every stage's output by stage name, in pipeline order, for a succeeded item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ItemError>,
    pub stages: Vec<StageRun>,
    pub finished_at: u64,
}

impl ItemResult {
    /// The start of the output or error, at most `chars` characters, for `item.finished`.
    pub fn preview(&self, chars: usize) -> String {
        match (&self.output, &self.error) {
            (Some(output), _) => crate::text::truncate(output.get(), chars).into_owned(),
            (None, Some(error)) => crate::text::truncate(&error.message, chars).into_owned(),
            (None, None) => String::new(),
        }
    }

    /// A stored result as any reader may show it. One that cannot be read (written by another
    /// version, or damaged), or whose output nests deeper than readers take (stored before
    /// outputs were bounded), becomes a failed entry of kind `unreadable` that says why, so
    /// the rest of its page is still served.
    pub fn read(job: Uuid, index: u64, bytes: &[u8]) -> Self {
        let result = match serde_json::from_slice::<ItemResult>(bytes) {
            Ok(result) => result,
            Err(error) => {
                return Self::unreadable(job, index, format!("it cannot be read: {error}"));
            }
        };
        // The output is every stage's output in one object: one level more than a stage's.
        let limit = crate::limits::MAX_JSON_DEPTH + 1;
        if let Some(output) = &result.output {
            let depth = crate::limits::json_depth(output.get().as_bytes());
            if depth > limit {
                return Self::unreadable(
                    job,
                    index,
                    format!("its output nests {depth} levels deep, over the limit of {limit}"),
                );
            }
        }
        result
    }

    fn unreadable(job: Uuid, index: u64, why: String) -> Self {
        let message = format!("the stored result of item {index} is not shown: {why}");
        Self {
            finished_at: 0,
            ..Self::not_run(job, index, "unreadable", message)
        }
    }

    /// The failed result of an item that ran no stage (not runnable, abandoned...): `kind` and
    /// `message` say why; not retryable.
    pub fn not_run(job: Uuid, index: u64, kind: &str, message: String) -> Self {
        Self {
            index,
            item_id: item_id(job, index),
            status: ItemStatus::Failed,
            output: None,
            error: Some(ItemError {
                stage: String::new(),
                kind: kind.into(),
                message,
                retryable: false,
                attempts: Vec::new(),
            }),
            stages: Vec::new(),
            finished_at: now_ms(),
            revision: String::new(),
        }
    }
}
