//! The HTTP API (axum): submit jobs, follow them over SSE, read results, cancel.
//!
//! | route                              | what                                              |
//! |------------------------------------|---------------------------------------------------|
//! | `GET /`                            | the dashboard (see [`dashboard`])                 |
//! | `GET /openapi.json`                | the OpenAPI 3 document (see [`openapi`])          |
//! | `GET /v1/pipelines`                | the pipelines served: stages, handlers, kv        |
//! | `GET /v1/pipelines/{pipeline}`     | one of them                                       |
//! | `PUT /v1/pipelines/{pipeline}`     | deploy a tar bundle (admin)                       |
//! | `DELETE /v1/pipelines/{pipeline}`  | stop serving it; 409 while jobs run (admin)       |
//! | `POST /v1/pipelines/{pipeline}/jobs`| submit a job of that pipeline                     |
//! | `POST /v1/pipelines/{pipeline}/scans`| a scan on that pipeline                           |
//! | `POST /v1/jobs`                    | submit `{"items": [...], "options": {...}, "pipeline": ...}` -> 202 |
//! | `GET /v1/jobs`                     | newest first; `?state=&pipeline=&before=&limit=`  |
//! | `POST /v1/scans`                   | one item (seed 001's scan) -> 202 with `task_id`  |
//! | `GET /v1/jobs/{id}`                | state and counts                                  |
//! | `GET /v1/jobs/{id}/events`         | SSE: the job's log, resumable with Last-Event-ID  |
//! | `GET /v1/jobs/{id}/results`        | `?after=&limit=` (keyset) or `?page=&page_size=`  |
//! | `GET /v1/jobs/{id}/stages`         | time per stage over the finished items             |
//! | `POST /v1/jobs/{id}/cancel`        | idempotent                                        |
//! | `GET /v1/jobs/{id}/watch`          | a page that follows the job live (EventSource)    |
//! | `POST /v1/jobs/{id}/reprocess`     | admin: run dead letters again: `{"indices": [...]}` or all |
//! | `GET /v1/dead-letters`             | `?job=&pipeline=&stage=&after=&limit=`            |
//! | `GET /v1/dead-letters/{job}/{i}`   | one, with the failed stage's input                |
//! | `DELETE /v1/dead-letters/{job}/{i}`| admin: discard                                           |
//! | `POST /v1/dead-letters/{job}/{i}/reprocess` | admin: run one again                            |
//! | `GET /v1/stages`                   | current and previous versions of each stage       |
//! | `PUT /v1/stages/{name}`            | admin: hot swap to the `.wasm` in the body; `?canary=P` for P % of items |
//! | `POST /v1/stages/{name}/rollback`  | admin: end a canary, else back to the previous one |
//! | `POST /v1/stages/{name}/promote`   | admin: the canary becomes current                 |
//! | `GET /metrics`                     | Prometheus metrics (see [`crate::metrics`])        |
//! | `GET /v1/kv`                       | kv namespaces: file, entries, digest, load time   |
//! | `POST /v1/kv/{namespace}/reload`   | admin: read the namespace's file again            |
//!
//! A route about one pipeline (jobs, scans, stages, kv) takes its name in the path or as
//! `?pipeline=` (`"pipeline"` in a job's body); it may leave it out when the server serves
//! one pipeline, and gets a 422 naming them when it serves several.
//!
//! Every job route goes through [`crate::backend::JobBackend`]; in Redis mode
//! ([`crate::backend::redis`]) they answer for every node's jobs; the operators' routes
//! (deploys, stages, kv reloads) change every node (see [`crate::follow`]).

pub mod auth;
mod dashboard;
mod dead_letters;
mod error;
mod events;
mod images;
mod jobs;
mod kv;
mod openapi;
mod pipelines;
mod stages;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::ApiError;

use crate::limits::{MAX_NAME, MAX_PAGE};

use crate::backend::JobBackend;
use crate::events::TokenHub;
use crate::pipeline::{Pipeline, PipelineLookup, Pipelines};
use crate::versions::StageVersions;

/// What the handlers share.
pub struct App {
    /// The pipelines this server serves, by name.
    pub pipelines: Arc<Pipelines>,
    /// Where streamed LLM answers are published as they arrive (`?tokens=true` followers).
    pub live_tokens: TokenHub,
    /// Where jobs live: [`crate::backend::embedded::Embedded`], or Redis shared by several nodes.
    pub backend: Arc<dyn JobBackend>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Largest image an item may carry, decoded.
    pub max_image_bytes: usize,
    /// Renders `/metrics`; `None` when no recorder is installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Stage versions installed while serving.
    pub versions: StageVersions,
    /// Deploys and removes pipelines (in Redis mode, on every node).
    pub deployer: Arc<crate::deploy::Deployer>,
    /// Reloads kv namespaces (in Redis mode, on every node).
    pub kv_reloads: crate::kv_reloads::KvReloads,
    /// Bearer tokens of the admin routes and of the rest (see [`auth`]).
    pub tokens: auth::Tokens,
    /// How often an idle event stream gets a keep-alive comment.
    pub sse_keep_alive: std::time::Duration,
}

pub fn router(app: Arc<App>) -> Router {
    let limit = app.max_body_bytes;
    let admin = OpenApiRouter::new()
        .routes(routes!(stages::install))
        .routes(routes!(stages::rollback))
        .routes(routes!(stages::promote))
        .routes(routes!(kv::reload))
        .routes(routes!(pipelines::deploy, pipelines::delete))
        .routes(routes!(dead_letters::reprocess))
        .routes(routes!(dead_letters::discard))
        .routes(routes!(dead_letters::reprocess_one))
        .route_layer(from_fn_with_state(app.clone(), auth::require_admin_token));
    let (api, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::scan))
        .routes(routes!(jobs::submit_to_pipeline))
        .routes(routes!(jobs::scan_on_pipeline))
        .routes(routes!(pipelines::list))
        .routes(routes!(pipelines::show))
        .routes(routes!(jobs::status))
        .routes(routes!(jobs::results))
        .routes(routes!(jobs::stage_times))
        .routes(routes!(jobs::cancel))
        .routes(routes!(events::stream))
        .routes(routes!(watch_page))
        .routes(routes!(dead_letters::list))
        .routes(routes!(dead_letters::inspect))
        .routes(routes!(stages::list))
        .routes(routes!(kv::list))
        .routes(routes!(metrics))
        // Admin routes need the API token too when there is one (the admin token passes both).
        .merge(admin)
        .route_layer(from_fn_with_state(app.clone(), auth::require_api_token))
        .split_for_parts();
    let document = axum::body::Bytes::from(
        document
            .to_pretty_json()
            .expect("the OpenAPI document serialises"),
    );
    // Public: the dashboard's files and the API's description hold no data.
    let public = Router::new()
        .route("/", get(dashboard::page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/app.css", get(dashboard::stylesheet))
        .route("/openapi.json", get(openapi::document))
        .layer(axum::Extension(document));
    let routes = api
        .merge(public)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(limit));
    panic_guard(routes).with_state(app)
}

/// A bug in a handler is a 500 with a JSON body and a logged error, never a dropped connection.
fn panic_guard<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router.layer(tower_http::catch_panic::CatchPanicLayer::custom(
        error::panicked,
    ))
}

/// Prometheus text exposition of [`crate::metrics`].
#[utoipa::path(get, path = "/metrics", tag = "operations",
    security((), ("api_token" = []), ("admin_token" = [])),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
              (status = 401, description = "missing or wrong token", body = openapi::ErrorBody),
              (status = 404, description = "metrics are off", body = openapi::ErrorBody)))]
async fn metrics(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let handle = app
        .metrics
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("metrics are off".into()))?;
    if let Some(unfinished) = app.backend.unfinished_items().await? {
        crate::metrics::items_unfinished(unfinished);
    }
    // Histograms are drained into their buckets on upkeep; once per scrape is often enough.
    handle.run_upkeep();
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

/// A self-contained page (no CDN) that follows one job with `EventSource`.
#[utoipa::path(get, path = "/v1/jobs/{id}/watch", tag = "jobs",
    security((), ("api_token" = []), ("admin_token" = [])),
    params(("id" = uuid::Uuid, Path, description = "job id")),
    responses((status = 200, description = "an HTML page", content_type = "text/html", body = String),
              (status = 404, description = "not a job id", body = openapi::ErrorBody),
              (status = 401, description = "missing or wrong token", body = openapi::ErrorBody)))]
async fn watch_page(
    axum::extract::Path(raw): axum::extract::Path<String>,
) -> Result<axum::response::Html<&'static str>, ApiError> {
    job_id(&raw)?;
    Ok(axum::response::Html(include_str!("assets/watch.html")))
}

/// A page size from a query (`default` when absent), or a 422 that says the range.
fn page_limit(limit: Option<usize>, default: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    crate::limits::in_range("limit", limit, 1, MAX_PAGE)?;
    Ok(limit)
}

/// The pipeline a request names (`None`: the only one), or a 404 for an unknown name and a
/// 422 when it names none and there are several.
fn pipeline(app: &App, name: Option<&str>) -> Result<Arc<Pipeline>, ApiError> {
    if let Some(name) = name {
        crate::limits::in_range("length of `pipeline`", name.len(), 1, MAX_NAME)?;
    }
    app.pipelines.resolve(name).map_err(|error| match error {
        PipelineLookup::Unknown { .. } => ApiError::NotFound(error.to_string()),
        PipelineLookup::Unnamed { .. } => ApiError::Unprocessable(error.to_string()),
    })
}

/// `?pipeline=NAME` of a route about one pipeline.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PipelineQuery {
    /// The pipeline (optional when the server serves one).
    #[param(max_length = 64)]
    pipeline: Option<String>,
}

/// A job id from a path segment, or a 404 that says why.
fn job_id(raw: &str) -> Result<uuid::Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound(format!("no job `{raw}` (job ids are UUIDs)")))
}

#[cfg(test)]
mod tests {
    use axum::routing::get;

    async fn boom() -> &'static str {
        panic!("a bug")
    }

    /// A handler that panics answers 500 with the usual JSON error, and the server goes on.
    #[tokio::test]
    async fn a_panicking_handler_is_a_json_500() {
        let router = super::panic_guard(
            axum::Router::new()
                .route("/boom", get(boom))
                .route("/fine", get(|| async { "fine" })),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let http = reqwest::Client::new();
        let boom = http
            .get(format!("http://{address}/boom"))
            .send()
            .await
            .unwrap();
        assert_eq!(boom.status(), 500);
        let body: serde_json::Value = boom.json().await.unwrap();
        assert_eq!(body["error"]["code"], "internal");
        let fine = http
            .get(format!("http://{address}/fine"))
            .send()
            .await
            .unwrap();
        assert_eq!(fine.text().await.unwrap(), "fine");
    }
}
