//! kv namespaces for operators: what is loaded, and reloading one after its file changed
//! (`serve` also reloads on its own when it sees the file change).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};

use super::openapi::KvList;
use super::{ApiError, App, PipelineQuery, pipeline};
use crate::capabilities::{NamespaceInfo, ReloadError};

/// `GET /v1/kv`: each namespace's file, entry count, content digest and load time.
#[utoipa::path(get, path = "/v1/kv", tag = "operations", security((), ("api_token" = []), ("admin_token" = [])), params(PipelineQuery),
    responses((status = 200, description = "kv namespaces", body = super::openapi::KvList), (status = 400, description = "bad query", body = super::openapi::ErrorBody), (status = 404, description = "no such pipeline", body = super::openapi::ErrorBody), (status = 422, description = "several pipelines and none named", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    query: Result<Query<PipelineQuery>, QueryRejection>,
) -> Result<Json<KvList>, ApiError> {
    let Query(query) = query?;
    Ok(Json(KvList {
        namespaces: pipeline(&app, query.pipeline.as_deref())?.caps.kv.list(),
    }))
}

/// `POST /v1/kv/{namespace}/reload` (admin): read the file again; a file that does not parse is
/// a 422 and the old entries stay in use.
#[utoipa::path(post, path = "/v1/kv/{namespace}/reload", tag = "operations", security(("admin_token" = [])), params(("namespace" = String, Path, description = "kv namespace"), PipelineQuery),
    responses((status = 200, description = "reloaded", body = crate::capabilities::NamespaceInfo), (status = 400, description = "bad query", body = super::openapi::ErrorBody), (status = 404, description = "no such namespace or pipeline", body = super::openapi::ErrorBody), (status = 422, description = "the file does not parse (the old entries stay), or several pipelines and none named", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn reload(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    query: Result<Query<PipelineQuery>, QueryRejection>,
) -> Result<Json<NamespaceInfo>, ApiError> {
    let Query(query) = query?;
    let pipeline = pipeline(&app, query.pipeline.as_deref())?;
    match app.kv_reloads.reload(&pipeline, &name).await {
        Ok(info) => Ok(Json(info)),
        Err(error @ ReloadError::Unknown(_)) => Err(ApiError::NotFound(error.to_string())),
        Err(error @ ReloadError::Invalid(_)) => Err(ApiError::Unprocessable(format!(
            "{error}; the old entries stay in use"
        ))),
        Err(ReloadError::Host(error)) => Err(ApiError::Internal(error)),
    }
}
