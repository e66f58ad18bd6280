//! Stage versions for operators: list, hot swap, roll back. Changes need the admin token.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::{ApiError, App};
use crate::runtime::{CacheOutcome, StageComponent};
use crate::versions::InstallError;

fn version(v: &StageComponent) -> Value {
    json!({ "digest": v.meta.digest, "loaded_in_ms": v.meta.load_time.as_secs_f64() * 1e3 })
}

/// `GET /v1/stages`: each stage's current version and the ones it can roll back to.
pub async fn list(State(app): State<Arc<App>>) -> Json<Value> {
    let stages: Vec<Value> = app
        .jobs
        .pipeline()
        .stages
        .iter()
        .map(|stage| {
            let previous: Vec<Value> = stage.previous().iter().rev().map(|v| version(v)).collect();
            json!({
                "name": stage.config.name,
                "current": version(&stage.current()),
                "previous": previous,
            })
        })
        .collect();
    Json(json!({ "stages": stages }))
}

impl From<InstallError> for ApiError {
    fn from(error: InstallError) -> Self {
        match error {
            InstallError::UnknownStage(_) => ApiError::NotFound(error.to_string()),
            InstallError::Invalid(_) => ApiError::Unprocessable(error.to_string()),
            InstallError::Host(error) => ApiError::Internal(error),
        }
    }
}

/// `PUT /v1/stages/{name}` with a `.wasm` body: validated against the `stage` world and
/// compiled, then new entries of the stage use it; items in the stage finish on the old one.
pub async fn install(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    super::auth::admin(&app, &headers)?;
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "the body must be the stage's .wasm component".into(),
        ));
    }
    let installed = app
        .versions
        .install(app.jobs.pipeline(), &name, body.to_vec())
        .await?;
    tracing::info!(stage = %name, digest = %installed.version.meta.digest, replaced = %installed.replaced, "stage swapped");
    Ok(Json(json!({
        "name": name,
        "current": version(&installed.version),
        // A cached compile (this exact .wasm was seen before) is a hit; else the compile time.
        "compile_ms": match installed.version.meta.cache {
            CacheOutcome::Hit => None,
            CacheOutcome::Compiled(took) => Some(took.as_secs_f64() * 1e3),
        },
        "replaced": installed.replaced,
    })))
}

/// `POST /v1/stages/{name}/rollback`: back to the version before the current one.
pub async fn rollback(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    super::auth::admin(&app, &headers)?;
    match app.versions.rollback(app.jobs.pipeline(), &name)? {
        Some(back) => Ok(Json(json!({ "name": name, "current": version(&back) }))),
        None => Err(ApiError::Conflict(format!(
            "stage `{name}` has no earlier version to roll back to"
        ))),
    }
}
