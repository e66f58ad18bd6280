//! Stage versions for operators: list, hot swap (at once, or as a canary for a share of the
//! items), promote a canary, roll back; of the pipeline `?pipeline=` names (or the only one).
//! Changes need the admin token.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::Deserialize;

use super::openapi::{StageChange, StageList, StageVersions, Version};
use super::{ApiError, App, PipelineQuery, pipeline};
use crate::pipeline::Pipeline;
use crate::runtime::{CacheOutcome, StageComponent};
use crate::versions::{InstallError, Rollback};

fn version(v: &StageComponent) -> Version {
    Version {
        digest: v.meta.digest.clone(),
        loaded_in_ms: v.meta.load_time.as_secs_f64() * 1e3,
        percent: None,
    }
}

/// `GET /v1/stages`: each stage's current version and the ones it can roll back to.
#[utoipa::path(get, path = "/v1/stages", tag = "stages", security((), ("api_token" = []), ("admin_token" = [])), params(PipelineQuery),
    responses((status = 200, description = "each stage's versions", body = super::openapi::StageList), (status = 400, description = "bad query", body = super::openapi::ErrorBody), (status = 404, description = "no such pipeline", body = super::openapi::ErrorBody), (status = 422, description = "several pipelines and none named", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    query: Result<Query<PipelineQuery>, QueryRejection>,
) -> Result<Json<StageList>, ApiError> {
    let Query(query) = query?;
    let pipeline = pipeline(&app, query.pipeline.as_deref())?;
    Ok(Json(stage_list(&pipeline)))
}

/// Each stage of `pipeline` with its versions.
pub(super) fn stage_list(pipeline: &Pipeline) -> StageList {
    let stages = pipeline
        .stages
        .iter()
        .map(|stage| StageVersions {
            name: stage.config.name.clone(),
            current: version(&stage.current()),
            canary: stage.canary().map(|c| Version {
                percent: Some(c.percent),
                ..version(&c.version)
            }),
            previous: stage.previous().iter().rev().map(|v| version(v)).collect(),
        })
        .collect();
    StageList { stages }
}

impl From<InstallError> for ApiError {
    fn from(error: InstallError) -> Self {
        match error {
            InstallError::UnknownStage { .. } => ApiError::NotFound(error.to_string()),
            InstallError::Invalid(_) => ApiError::Unprocessable(error.to_string()),
            InstallError::Conflict(_) => ApiError::Conflict(error.to_string()),
            InstallError::Host(error) => ApiError::Internal(error),
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InstallQuery {
    /// The pipeline (optional when the server serves one).
    #[param(max_length = 64)]
    pipeline: Option<String>,
    /// Put the version on trial for this share (1 to 99 %) of the items instead.
    #[param(minimum = 1, maximum = 99)]
    canary: Option<u8>,
}

/// `PUT /v1/stages/{name}` with a `.wasm` body: validated against the `stage` world and
/// compiled, then new entries of the stage use it (or, with `?canary=P`, P % of them); items in
/// the stage finish on the version they entered with.
#[utoipa::path(put, path = "/v1/stages/{name}", tag = "stages", security(("admin_token" = [])),
    params(("name" = String, Path, description = "stage name"), InstallQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the component (`application/wasm` too; any type is read as the bytes)"),
    responses((status = 409, description = "another node changed the stage first (Redis mode); nothing changed", body = super::openapi::ErrorBody), (status = 200, description = "installed", body = super::openapi::StageChange), (status = 400, description = "empty body", body = super::openapi::ErrorBody), (status = 404, description = "no such stage or pipeline", body = super::openapi::ErrorBody), (status = 413, description = "too large", body = super::openapi::ErrorBody), (status = 422, description = "not a valid stage component, a bad canary share, or several pipelines and none named", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn install(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    query: Result<Query<InstallQuery>, QueryRejection>,
    body: Bytes,
) -> Result<Json<StageChange>, ApiError> {
    let Query(InstallQuery {
        pipeline: named,
        canary,
    }) = query?;
    let pipeline = pipeline(&app, named.as_deref())?;
    if canary.is_some_and(|p| !(1..=99).contains(&p)) {
        return Err(ApiError::Unprocessable(
            "`canary` is a share of the items in %, from 1 to 99".into(),
        ));
    }
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "the body must be the stage's .wasm component".into(),
        ));
    }
    let installed = app
        .versions
        .install(&pipeline, &name, body.to_vec(), canary)
        .await?;
    let new = version(&installed.version);
    let (current, canary) = match canary {
        Some(percent) => {
            tracing::info!(stage = %name, digest = %installed.version.meta.digest, percent, "canary on trial");
            let stage = pipeline.stage(&name).expect("installed, so known");
            let trial = Version {
                percent: Some(percent),
                ..new
            };
            (version(&stage.current()), Some(trial))
        }
        None => {
            tracing::info!(stage = %name, digest = %installed.version.meta.digest, replaced = %installed.replaced, "stage swapped");
            (new, None)
        }
    };
    Ok(Json(StageChange {
        name,
        current,
        canary,
        canary_dropped: None,
        // A cached compile (this exact .wasm was seen before) is a hit; else the compile time.
        compile_ms: match installed.version.meta.cache {
            CacheOutcome::Hit => None,
            CacheOutcome::Compiled(took) => Some(took.as_secs_f64() * 1e3),
        },
        replaced: Some(installed.replaced),
    }))
}

/// `POST /v1/stages/{name}/rollback`: end the canary trial if there is one, else back to the
/// version before the current one.
#[utoipa::path(post, path = "/v1/stages/{name}/rollback", tag = "stages", security(("admin_token" = [])), params(("name" = String, Path, description = "stage name"), PipelineQuery),
    responses((status = 409, description = "another node changed the stage first (Redis mode); nothing changed", body = super::openapi::ErrorBody), (status = 200, description = "rolled back or canary dropped", body = super::openapi::StageChange), (status = 400, description = "bad query", body = super::openapi::ErrorBody), (status = 422, description = "several pipelines and none named", body = super::openapi::ErrorBody), (status = 404, description = "no such stage or pipeline", body = super::openapi::ErrorBody), (status = 409, description = "nothing to roll back to", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn rollback(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    query: Result<Query<PipelineQuery>, QueryRejection>,
) -> Result<Json<StageChange>, ApiError> {
    let Query(query) = query?;
    let pipeline = pipeline(&app, query.pipeline.as_deref())?;
    let current = || version(&pipeline.stage(&name).expect("known").current());
    match app.versions.rollback(&pipeline, &name).await? {
        Rollback::CanaryDropped(dropped) => Ok(Json(StageChange {
            canary_dropped: Some(version(&dropped)),
            ..StageChange::new(name.clone(), current())
        })),
        Rollback::Back(back) => Ok(Json(StageChange::new(name, version(&back)))),
        Rollback::Nothing => Err(ApiError::Conflict(format!(
            "stage `{name}` has no canary and no earlier version to roll back to"
        ))),
    }
}

/// `POST /v1/stages/{name}/promote`: the canary becomes the version every item gets.
#[utoipa::path(post, path = "/v1/stages/{name}/promote", tag = "stages", security(("admin_token" = [])), params(("name" = String, Path, description = "stage name"), PipelineQuery),
    responses((status = 409, description = "another node changed the stage first (Redis mode); nothing changed", body = super::openapi::ErrorBody), (status = 200, description = "promoted", body = super::openapi::StageChange), (status = 400, description = "bad query", body = super::openapi::ErrorBody), (status = 422, description = "several pipelines and none named", body = super::openapi::ErrorBody), (status = 404, description = "no such stage or pipeline", body = super::openapi::ErrorBody), (status = 409, description = "no canary", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn promote(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    query: Result<Query<PipelineQuery>, QueryRejection>,
) -> Result<Json<StageChange>, ApiError> {
    let Query(query) = query?;
    let pipeline = pipeline(&app, query.pipeline.as_deref())?;
    match app.versions.promote(&pipeline, &name).await? {
        Some(promoted) => Ok(Json(StageChange::new(name, version(&promoted)))),
        None => Err(ApiError::Conflict(format!(
            "stage `{name}` has no canary to promote"
        ))),
    }
}
