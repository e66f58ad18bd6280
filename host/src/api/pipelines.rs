//! The pipelines a server serves: each with its stages (versions, canaries), handlers and kv
//! namespaces.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};

use super::openapi::{PipelineInfo, PipelineList};
use super::stages::stage_list;
use super::{ApiError, App, pipeline};
use crate::pipeline::Pipeline;

fn info(pipeline: &Pipeline) -> PipelineInfo {
    PipelineInfo {
        name: pipeline.name().to_string(),
        stages: stage_list(pipeline),
        handlers: pipeline.caps.handlers.keys().cloned().collect(),
        kv: pipeline.caps.kv.list(),
    }
}

/// `GET /v1/pipelines`: every pipeline, by name.
#[utoipa::path(get, path = "/v1/pipelines", tag = "pipelines", security((), ("api_token" = []), ("admin_token" = [])),
    responses((status = 200, description = "the pipelines, by name", body = super::openapi::PipelineList), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn list(State(app): State<Arc<App>>) -> Json<PipelineList> {
    Json(PipelineList {
        pipelines: app.pipelines.all().iter().map(|p| info(p)).collect(),
    })
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
    Ok(Json(info(&pipeline)))
}
