//! `GET /openapi.json`: the OpenAPI 3 document, generated from the handlers' `#[utoipa::path]`
//! annotations and registered together with the routes (`utoipa_axum::routes!`), so a route
//! cannot exist without being documented, nor be documented without existing.
//!
//! The bodies handlers build with `json!` are described here by the shapes below; a schema test
//! (`cargo xtask schemathesis`, part of `cargo xtask test`) checks the server against them.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use uuid::Uuid;

use crate::model::{ItemResult, JobRecord, JobState};
use crate::store::DeadLetter;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Stagehand",
        description = "Multi-step LLM pipelines of WebAssembly stages: submit jobs, follow them \
                       over SSE, read results, cancel, manage dead letters and stage versions."
    ),
    modifiers(&BearerTokens),
    tags(
        (name = "jobs", description = "Submit, follow, page through and cancel jobs"),
        (name = "dead letters", description = "Items that failed for good, to inspect or run again"),
        (name = "pipelines", description = "The pipelines a server serves"),
        (name = "stages", description = "Stage versions: hot swap, canary, rollback"),
        (name = "operations", description = "kv namespaces and metrics"),
    )
)]
pub struct ApiDoc;

/// Two bearer schemes: `api_token` (`--api-token`, every route when set) and `admin_token`
/// (`--admin-token`, the admin routes; it passes wherever the API token does).
struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["api_token", "admin_token"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The document, serialised once at start-up; `Bytes` clones share it.
pub async fn document(
    axum::Extension(openapi): axum::Extension<axum::body::Bytes>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi,
    )
        .into_response()
}

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `bad_request`, `not_found`, `invalid`, `conflict`, `unauthorized`, `forbidden`,
    /// `too_large`, `unsupported_media_type` or `internal`.
    pub code: &'static str,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: &'static str, message: String) -> Self {
        Self {
            error: ErrorDetail { code, message },
        }
    }
}

/// Where to follow a job.
#[derive(Serialize, ToSchema)]
pub struct JobLinks {
    pub job_id: Uuid,
    pub status_url: String,
    pub events_url: String,
    pub results_url: String,
}

impl JobLinks {
    pub fn new(id: Uuid) -> Self {
        JobLinks {
            job_id: id,
            status_url: format!("/v1/jobs/{id}"),
            events_url: format!("/v1/jobs/{id}/events"),
            results_url: format!("/v1/jobs/{id}/results"),
        }
    }
}

/// A scan's answer: the job's links, plus seed 001's `task_id` and `status`.
#[derive(Serialize, ToSchema)]
pub struct ScanAccepted {
    #[serde(flatten)]
    pub links: JobLinks,
    pub task_id: Uuid,
    /// Always `processing`.
    pub status: &'static str,
}

/// A submission: `items` are any JSON values (the first stage's input).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmissionBody {
    /// At most `[limits] max_items` (1,000,000), each at most `[limits] max_item_kib` (16 MiB)
    /// and 64 levels deep.
    #[schema(value_type = Vec<serde_json::Value>, min_items = 1, max_items = 1000000)]
    pub items: Vec<serde_json::Value>,
    pub options: Option<crate::model::JobOptions>,
    /// Or the `Idempotency-Key` header.
    #[schema(min_length = 1, max_length = 256)]
    pub idempotency_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobRecord>,
    /// Pass as `before` for the next page; `null` on the last.
    pub next_before: Option<Uuid>,
}

/// A job's record with its live counts, duration, the stage versions new entries get, links.
#[derive(Serialize, ToSchema)]
pub struct JobStatus {
    #[serde(flatten)]
    pub job: JobRecord,
    pub duration_ms: u64,
    /// The job's LLM token budget (its `max_tokens`, else the pipeline's), if it has one;
    /// `llm_tokens` is what it has used.
    pub max_tokens: Option<u64>,
    pub stage_versions: Vec<StageDigest>,
    pub links: JobLinks,
}

#[derive(Serialize, ToSchema)]
pub struct StageDigest {
    pub stage: String,
    pub digest: String,
}

/// A page of results. Handlers serialise it as it is, so stored outputs go out as the JSON
/// text they are, never parsed into a value on the way (which once made a deep output panic).
#[derive(Serialize, ToSchema)]
pub struct ResultsPage {
    pub job_id: Uuid,
    pub results: Vec<ItemResult>,
    /// Keyset paging: pass as `after`; `null` on the last page (and with `page`).
    pub next_after: Option<u64>,
    /// With `page`/`page_size` (seed 000's paging).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct StageTimes {
    pub job_id: Uuid,
    /// Finished items read.
    pub items: u64,
    pub stages: Vec<super::jobs::StageTime>,
}

/// `202` while it runs (`cancelling`), `200` with the final state after.
#[derive(Serialize, ToSchema)]
pub struct CancelAnswer {
    pub job_id: Uuid,
    pub state: CancelState,
}

/// `cancelling`, or the state the job had ended in.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelState {
    Cancelling,
    Running,
    Completed,
    Cancelled,
    Failed,
}

impl From<JobState> for CancelState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Running => CancelState::Running,
            JobState::Completed => CancelState::Completed,
            JobState::Cancelled => CancelState::Cancelled,
            JobState::Failed => CancelState::Failed,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetter>,
    /// `JOB/INDEX`: pass as `after`; `null` on the last page.
    pub next_after: Option<String>,
}

/// A dead letter and `input`, the envelope the failed stage got.
#[derive(Serialize, ToSchema)]
pub struct DeadLetterDetail {
    #[serde(flatten)]
    pub letter: DeadLetter,
    #[schema(value_type = Option<Object>)]
    pub input: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Serialize, ToSchema)]
pub struct ReprocessAnswer {
    pub job_id: Uuid,
    pub reprocessing: u64,
    pub events_url: String,
}

/// Optional body of a job's reprocess: the items, or all dead letters when absent.
#[derive(Serialize, ToSchema)]
pub struct ReprocessBody {
    #[schema(max_items = 1000)]
    pub indices: Option<Vec<u64>>,
}

#[derive(Serialize, ToSchema)]
pub struct Version {
    /// sha256 of the component.
    pub digest: String,
    pub loaded_in_ms: f64,
    /// For a canary: its share of the items, in %.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
}

#[derive(Serialize, ToSchema)]
pub struct StageVersions {
    pub name: String,
    pub current: Version,
    pub canary: Option<Version>,
    /// Newest first.
    pub previous: Vec<Version>,
}

#[derive(Serialize, ToSchema)]
pub struct StageList {
    pub stages: Vec<StageVersions>,
}

/// A pipeline the server serves: its stages in order with their versions, its handlers, its kv
/// namespaces.
#[derive(Serialize, ToSchema)]
pub struct PipelineInfo {
    pub name: String,
    /// sha256 over the pipeline file and every file it names: the same files, the same
    /// revision, on any node.
    pub revision: String,
    /// Jobs get this revision; `false`: a file of the command line.
    pub deployed: bool,
    #[serde(flatten)]
    pub stages: StageList,
    /// Handler names (`dispatch.call` and `dispatch.emit` targets).
    pub handlers: Vec<String>,
    pub kv: Vec<crate::capabilities::NamespaceInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct PipelineList {
    pub pipelines: Vec<PipelineInfo>,
}

/// What a deploy did.
#[derive(Serialize, ToSchema)]
pub struct PipelineDeployed {
    #[serde(flatten)]
    pub pipeline: PipelineInfo,
    /// The revision it replaced; absent for a new pipeline, or when `unchanged`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
    /// The pipeline already served these files: it goes on as it was (hot-swapped stage
    /// versions included), now recorded as deployed.
    pub unchanged: bool,
}

/// The result of a stage change: the version items get now, and what the change did.
#[derive(Serialize, ToSchema)]
pub struct StageChange {
    pub name: String,
    pub current: Version,
    /// After a canary upload: the version on trial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Version>,
    /// After a rollback that ended a trial: the canary dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_dropped: Option<Version>,
    /// After an upload: the compile time; `null` when this exact component was compiled before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile_ms: Option<f64>,
    /// After an upload: the digest it replaced (for a canary: the current one, unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
}

impl StageChange {
    /// `current` is what stage `name` runs now; nothing else changed.
    pub fn new(name: String, current: Version) -> Self {
        Self {
            name,
            current,
            canary: None,
            canary_dropped: None,
            compile_ms: None,
            replaced: None,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct KvList {
    pub namespaces: Vec<crate::capabilities::NamespaceInfo>,
}
