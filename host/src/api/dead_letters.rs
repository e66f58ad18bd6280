//! Dead letters: list, inspect, reprocess and discard items whose failed stage ran out of tries.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::openapi::{DeadLetterDetail, DeadLetterList, ReprocessAnswer};
use super::{ApiError, App, job_id, page_limit};
use crate::backend::DeadLetterFilter;
use crate::limits::{MAX_NAME, in_range};

use crate::jobs::{ItemRef, stage_input};
use crate::model::{Reprocess, item_id};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    job: Option<Uuid>,
    /// Dead letters of this pipeline's jobs only.
    #[param(max_length = 64)]
    pipeline: Option<String>,
    #[param(max_length = 64)]
    stage: Option<String>,
    /// Keyset: the `next_after` of the previous page (`JOB/INDEX`).
    #[param(max_length = 64)]
    after: Option<String>,
    /// Dead letters per page (100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

fn cursor(raw: &str) -> Result<(Uuid, u64), ApiError> {
    raw.split_once('/')
        .and_then(|(job, index)| Some((job.parse().ok()?, index.parse().ok()?)))
        .ok_or_else(|| ApiError::BadRequest(format!("`after` must be JOB/INDEX, not {raw:?}")))
}

/// `GET /v1/dead-letters?job=&pipeline=&stage=&after=&limit=`, in (job, index) order.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead letters", security((), ("api_token" = []), ("admin_token" = [])), params(ListQuery),
    responses((status = 200, description = "in (job, index) order", body = super::openapi::DeadLetterList), (status = 400, description = "bad query", body = super::openapi::ErrorBody), (status = 422, description = "a value past its limit (the message names it)", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let Query(q) = query?;
    let limit = page_limit(q.limit, 100)?;
    for (field, value) in [
        ("pipeline", &q.pipeline),
        ("stage", &q.stage),
        ("after", &q.after),
    ] {
        if let Some(value) = value {
            // A `JOB/INDEX` cursor (at most 57 characters) fits the name limit too.
            in_range(&format!("length of `{field}`"), value.len(), 1, MAX_NAME)?;
        }
    }
    let after = q.after.as_deref().map(cursor).transpose()?;
    let filter = DeadLetterFilter {
        job: q.job,
        pipeline: q.pipeline,
        stage: q.stage,
    };
    let letters = app.backend.dead_letters(&filter, after, limit).await?;
    let next_after = (letters.len() == limit)
        .then(|| letters.last().map(|l| format!("{}/{}", l.job_id, l.index)))
        .flatten();
    Ok(Json(DeadLetterList {
        dead_letters: letters,
        next_after,
    }))
}

fn index_of(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound(format!("{raw:?} is not an item index")))
}

/// `GET /v1/dead-letters/{job}/{index}`: the letter and the failed stage's input.
#[utoipa::path(get, path = "/v1/dead-letters/{job}/{index}", tag = "dead letters", security((), ("api_token" = []), ("admin_token" = [])), params(("job" = uuid::Uuid, Path, description = "job id"), ("index" = u64, Path, description = "item index")),
    responses((status = 200, description = "the letter and the failed stage's input", body = super::openapi::DeadLetterDetail), (status = 404, description = "no such dead letter", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn inspect(
    State(app): State<Arc<App>>,
    Path((raw_job, raw_index)): Path<(String, String)>,
) -> Result<Json<DeadLetterDetail>, ApiError> {
    let (job, index) = (job_id(&raw_job)?, index_of(&raw_index)?);
    let letter = app.backend.dead_letter(job, index).await?.ok_or_else(|| {
        ApiError::NotFound(format!("no dead letter for item {index} of job {job}"))
    })?;
    let item = ItemRef {
        job_id: job,
        item_id: item_id(job, index),
        index,
    };
    // Put back together by the job's pipeline, while this server serves it.
    let input = match app.pipelines.of_record(&letter.pipeline) {
        Some(pipeline) => stage_input(&pipeline, item, &letter.stage)
            .await?
            .map(RawValue::from_string)
            .transpose()
            .map_err(anyhow::Error::from)?,
        None => None,
    };
    Ok(Json(DeadLetterDetail { letter, input }))
}

/// `DELETE /v1/dead-letters/{job}/{index}`: give up on the item (its failed result stays).
#[utoipa::path(delete, path = "/v1/dead-letters/{job}/{index}", tag = "dead letters", security(("admin_token" = [])), params(("job" = uuid::Uuid, Path, description = "job id"), ("index" = u64, Path, description = "item index")),
    responses((status = 204, description = "discarded"), (status = 404, description = "no such dead letter", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn discard(
    State(app): State<Arc<App>>,
    Path((raw_job, raw_index)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (job, index) = (job_id(&raw_job)?, index_of(&raw_index)?);
    if app.backend.discard_dead_letter(job, index).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "no dead letter for item {index} of job {job}"
        )))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReprocessRequest {
    /// The items to run again; all of the job's dead letters when absent.
    indices: Option<Vec<u64>>,
}

/// `POST /v1/jobs/{id}/reprocess` with `{"indices": [...]}` or `{}` for all.
#[utoipa::path(post, path = "/v1/jobs/{id}/reprocess", tag = "dead letters", security(("admin_token" = [])), params(("id" = uuid::Uuid, Path, description = "job id")),
    request_body(content = Option<super::openapi::ReprocessBody>, description = "the items; none for all"),
    responses((status = 202, description = "reprocessing", body = super::openapi::ReprocessAnswer), (status = 400, description = "bad body", body = super::openapi::ErrorBody), (status = 422, description = "a value past its limit (the message names it)", body = super::openapi::ErrorBody), (status = 404, description = "no such job", body = super::openapi::ErrorBody), (status = 409, description = "the job is running, or cannot run on this server (the message says why)", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn reprocess(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let job = job_id(&raw)?;
    // The body is optional: none at all means every dead letter of the job.
    let request: ReprocessRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReprocessRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body must be {{\"indices\": [...]}} or empty: {e}"
            ))
        })?
    };
    if let Some(indices) = &request.indices {
        if indices.len() > crate::limits::MAX_PAGE {
            return Err(ApiError::Unprocessable(format!(
                "`indices` has {} entries, over the limit of {} (leave it out for every dead \
                 letter)",
                indices.len(),
                crate::limits::MAX_PAGE
            )));
        }
        for &index in indices {
            in_range("indices", index, 0, crate::limits::MAX_POSITION)?;
        }
    }
    start(&app, job, request.indices).await
}

/// `POST /v1/dead-letters/{job}/{index}/reprocess`: one item.
#[utoipa::path(post, path = "/v1/dead-letters/{job}/{index}/reprocess", tag = "dead letters", security(("admin_token" = [])), params(("job" = uuid::Uuid, Path, description = "job id"), ("index" = u64, Path, description = "item index")),
    responses((status = 202, description = "reprocessing", body = super::openapi::ReprocessAnswer), (status = 404, description = "no such dead letter", body = super::openapi::ErrorBody), (status = 409, description = "the job is running, or cannot run on this server (the message says why)", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong admin token", body = super::openapi::ErrorBody), (status = 403, description = "admin routes are off (no --admin-token)", body = super::openapi::ErrorBody)))]
pub async fn reprocess_one(
    State(app): State<Arc<App>>,
    Path((raw_job, raw_index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (job, index) = (job_id(&raw_job)?, index_of(&raw_index)?);
    if app.backend.dead_letter(job, index).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "no dead letter for item {index} of job {job}"
        )));
    }
    start(&app, job, Some(vec![index])).await
}

async fn start(app: &App, job: Uuid, indices: Option<Vec<u64>>) -> Result<Response, ApiError> {
    match app.backend.reprocess(job, indices).await? {
        Reprocess::Started(n) => Ok((
            StatusCode::ACCEPTED,
            Json(ReprocessAnswer {
                job_id: job,
                reprocessing: n as u64,
                events_url: format!("/v1/jobs/{job}/events"),
            }),
        )
            .into_response()),
        Reprocess::Running => Err(ApiError::Conflict(format!(
            "job {job} is running; reprocess its dead letters once it has ended"
        ))),
        Reprocess::UnknownJob => Err(ApiError::NotFound(format!("no job {job}"))),
        Reprocess::Unrunnable(reason) => Err(ApiError::Conflict(reason)),
    }
}
