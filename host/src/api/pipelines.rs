//! The pipelines a server serves: each with its revision, its stages (versions, canaries),
//! handlers and kv namespaces; deploying one (a tar bundle) and deleting one need the admin
//! token.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;

use super::openapi::{PipelineDeployed, PipelineInfo, PipelineList};
use super::stages::stage_list;
use super::{ApiError, App, pipeline};
use crate::backend::JobFilter;
use crate::deploy::DeployError;
use crate::limits::MAX_NAME;
use crate::model::JobState;
use crate::pipeline::Pipeline;

fn info(pipeline: &Pipeline, deployed: &BTreeMap<String, String>) -> PipelineInfo {
    PipelineInfo {
        name: pipeline.name().to_string(),
        revision: pipeline.revision.clone(),
        deployed: deployed.get(pipeline.name()) == Some(&pipeline.revision),
        stages: stage_list(pipeline),
        handlers: pipeline.caps.handlers.keys().cloned().collect(),
        kv: pipeline.caps.kv.list(),
    }
}

/// Which pipeline deploys made current, by name.
fn deployed(app: &App) -> Result<BTreeMap<String, String>, ApiError> {
    Ok(app.deployer.deployed()?)
}

/// `GET /v1/pipelines`: every pipeline, by name.
#[utoipa::path(get, path = "/v1/pipelines", tag = "pipelines", security((), ("api_token" = []), ("admin_token" = [])),
    responses((status = 200, description = "the pipelines, by name", body = super::openapi::PipelineList), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn list(State(app): State<Arc<App>>) -> Result<Json<PipelineList>, ApiError> {
    let deployed = deployed(&app)?;
    Ok(Json(PipelineList {
        pipelines: app
            .pipelines
            .all()
            .iter()
            .map(|p| info(p, &deployed))
            .collect(),
    }))
}

/// `GET /v1/pipelines/{pipeline}`.
#[utoipa::path(get, path = "/v1/pipelines/{pipeline}", tag = "pipelines", security((), ("api_token" = []), ("admin_token" = [])),
    params(("pipeline" = String, Path, description = "pipeline name")),
    responses((status = 200, description = "the pipeline", body = super::openapi::PipelineInfo), (status = 404, description = "no such pipeline", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn show(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<PipelineInfo>, ApiError> {
    let pipeline = pipeline(&app, Some(&name))?;
    Ok(Json(info(&pipeline, &deployed(&app)?)))
}

impl From<DeployError> for ApiError {
    fn from(error: DeployError) -> Self {
        match error {
            DeployError::Invalid(_) => ApiError::Unprocessable(error.to_string()),
            DeployError::Unknown(_) => ApiError::NotFound(error.to_string()),
            DeployError::Running(_) => ApiError::Conflict(error.to_string()),
            DeployError::Host(error) => ApiError::Internal(error),
        }
    }
}

/// `PUT /v1/pipelines/{pipeline}` with a tar body (`pipeline.toml` at its root and the files
/// it names): everything is checked and compiled first, then new jobs get the new revision;
/// running jobs finish on theirs. A refused bundle changes nothing.
#[utoipa::path(put, path = "/v1/pipelines/{pipeline}", tag = "pipelines", security(("admin_token" = [])),
    params(("pipeline" = String, Path, description = "pipeline name (the pipeline file's `name`)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "a tar archive (`application/x-tar` or `application/octet-stream`): `pipeline.toml` at its root and the components and kv files it names, at the paths it names them by"),
    responses((status = 200, description = "deployed: new jobs get this revision", body = super::openapi::PipelineDeployed), (status = 400, description = "empty body", body = super::openapi::ErrorBody), (status = 413, description = "too large", body = super::openapi::ErrorBody), (status = 415, description = "not a tar archive", body = super::openapi::ErrorBody), (status = 422, description = "the bundle, the pipeline file, a component or a kv file is not valid (nothing changed)", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn deploy(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<PipelineDeployed>, ApiError> {
    crate::limits::in_range("length of `pipeline`", name.len(), 1, MAX_NAME)?;
    let deployer = &app.deployer;
    if let Some(kind) = headers.get(axum::http::header::CONTENT_TYPE)
        && !kind.to_str().is_ok_and(|kind| {
            kind.starts_with("application/x-tar") || kind.starts_with("application/octet-stream")
        })
    {
        return Err(ApiError::UnsupportedMedia(
            "a deploy's body is a tar archive (`application/x-tar`)".into(),
        ));
    }
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "the body must be a tar archive of `pipeline.toml` and the files it names".into(),
        ));
    }
    let deployed = deployer.deploy(&name, &body).await?;
    Ok(Json(PipelineDeployed {
        pipeline: info(&deployed.pipeline, &deployer.deployed()?),
        replaced: deployed.replaced,
        unchanged: deployed.unchanged,
    }))
}

/// `DELETE /v1/pipelines/{pipeline}`: stop serving it (409 while it has running jobs). Its
/// finished jobs stay readable. A pipeline from a file of the command line is served again at
/// the next start (embedded mode; in Redis mode the cluster's deletion holds until a deploy).
#[utoipa::path(delete, path = "/v1/pipelines/{pipeline}", tag = "pipelines", security(("admin_token" = [])),
    params(("pipeline" = String, Path, description = "pipeline name")),
    responses((status = 204, description = "deleted"), (status = 404, description = "no such pipeline", body = super::openapi::ErrorBody), (status = 409, description = "the pipeline has running jobs", body = super::openapi::ErrorBody), (status = 422, description = "name too long", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn delete(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    crate::limits::in_range("length of `pipeline`", name.len(), 1, MAX_NAME)?;
    let deployer = &app.deployer;
    let running = JobFilter {
        state: Some(JobState::Running),
        pipeline: Some(name.clone()),
    };
    deployer
        .remove(&name, async || {
            Ok(!app.backend.jobs(None, &running, 1).await?.is_empty())
        })
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
