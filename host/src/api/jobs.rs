//! Submitting, inspecting, paging through and cancelling jobs.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use sha2::{Digest, Sha256};

use super::openapi::{
    CancelAnswer, CancelState, JobLinks, JobList, JobStatus, ResultsPage, ScanAccepted,
    StageDigest, StageTimes,
};
use super::{ApiError, App, PipelineQuery, images, job_id, page_limit, pipeline};
use crate::backend::JobFilter;
use crate::limits::{MAX_NAME, MAX_PAGE, MAX_PAGE_NUMBER};
use crate::model::{CancelOutcome, Idempotency, JobOptions, JobRecord, JobState, Submitted};
use crate::pipeline::Pipeline;

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// The pipeline that runs the job (optional when the server serves one; in the path of
    /// `/v1/pipelines/{pipeline}/jobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pipeline: Option<String>,
    items: Vec<Box<RawValue>>,
    #[serde(default)]
    options: JobOptions,
    /// Or the `Idempotency-Key` header: a repeated submission with the same key returns the
    /// job the first one created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<String>,
}

const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The key of a submission (header or body) and a digest of what it asks for, of `pipeline`.
fn idempotency(
    headers: &HeaderMap,
    submission: &Submission,
    pipeline: &str,
) -> Result<Option<Idempotency>, ApiError> {
    let header = match headers.get("idempotency-key") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::BadRequest("`Idempotency-Key` must be text".into()))?
                .to_string(),
        ),
        None => None,
    };
    let Some(key) = header.or_else(|| submission.idempotency_key.clone()) else {
        return Ok(None);
    };
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::Unprocessable(format!(
            "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} bytes"
        )));
    }
    let canonical = serde_json::to_vec(&(&submission.items, &submission.options, pipeline))
        .map_err(anyhow::Error::from)?;
    Ok(Some(Idempotency {
        key,
        request_digest: format!("{:x}", Sha256::digest(&canonical)),
    }))
}

/// An item within its pipeline's `[limits] max_item_kib` and the JSON depth limit, with valid
/// images.
fn check_item(app: &App, pipeline: &Pipeline, item: &str, what: &str) -> Result<(), ApiError> {
    let limits = pipeline.config.limits;
    crate::limits::check_size_and_depth(item, what, limits.max_item_bytes())?;
    images::check_item(item, what, app.max_image_bytes)
}

/// 202 with the links of a new job, 200 with those of the job a repeated key names, 409 if
/// that job was asked for with another body.
fn answer(submitted: Submitted) -> Result<(StatusCode, JobRecord), ApiError> {
    match submitted {
        Submitted::New(job) => Ok((StatusCode::ACCEPTED, job)),
        Submitted::Existing(job) => Ok((StatusCode::OK, job)),
        Submitted::Conflict(job) => Err(ApiError::Conflict(format!(
            "idempotency key already used by job {} with a different request",
            job.id
        ))),
    }
}

#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])),
    request_body = super::openapi::SubmissionBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "a repeat with the same key returns the same job")),
    responses((status = 202, description = "accepted and durable", body = super::openapi::JobLinks),
              (status = 200, description = "the job an earlier submission with this key created", body = super::openapi::JobLinks),
              (status = 400, description = "malformed JSON", body = super::openapi::ErrorBody), (status = 409, description = "key used with another body", body = super::openapi::ErrorBody), (status = 413, description = "body or image too large", body = super::openapi::ErrorBody), (status = 415, description = "not JSON", body = super::openapi::ErrorBody), (status = 422, description = "not a valid job", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn submit(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<Submission>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(submission) = body?;
    let pipeline = pipeline(&app, submission.pipeline.as_deref())?;
    submit_job(&app, &pipeline, &headers, submission).await
}

/// `POST /v1/jobs` for the pipeline in the path.
#[utoipa::path(post, path = "/v1/pipelines/{pipeline}/jobs", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])),
    request_body = super::openapi::SubmissionBody,
    params(("pipeline" = String, Path, description = "pipeline name"),
           ("Idempotency-Key" = Option<String>, Header, description = "a repeat with the same key returns the same job")),
    responses((status = 202, description = "accepted and durable", body = super::openapi::JobLinks),
              (status = 200, description = "the job an earlier submission with this key created", body = super::openapi::JobLinks),
              (status = 400, description = "malformed JSON", body = super::openapi::ErrorBody), (status = 404, description = "no such pipeline", body = super::openapi::ErrorBody), (status = 409, description = "key used with another body", body = super::openapi::ErrorBody), (status = 413, description = "body or image too large", body = super::openapi::ErrorBody), (status = 415, description = "not JSON", body = super::openapi::ErrorBody), (status = 422, description = "not a valid job", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn submit_to_pipeline(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Submission>, JsonRejection>,
) -> Result<Response, ApiError> {
    let pipeline = pipeline(&app, Some(&name))?;
    let Json(submission) = body?;
    if let Some(other) = submission
        .pipeline
        .as_deref()
        .filter(|other| *other != name)
    {
        return Err(ApiError::Unprocessable(format!(
            "the body names pipeline `{other}`, the path `{name}`"
        )));
    }
    submit_job(&app, &pipeline, &headers, submission).await
}

/// Check a submission against `pipeline`'s limits, then hand it to the backend.
async fn submit_job(
    app: &App,
    pipeline: &Arc<Pipeline>,
    headers: &HeaderMap,
    submission: Submission,
) -> Result<Response, ApiError> {
    if submission.items.is_empty() {
        return Err(ApiError::Unprocessable(
            "`items` is empty: a job needs at least one item".into(),
        ));
    }
    let limits = pipeline.config.limits;
    if submission.items.len() as u64 > limits.max_items {
        return Err(ApiError::Unprocessable(format!(
            "`items` has {} items, over the limit of {} (`[limits] max_items`)",
            submission.items.len(),
            limits.max_items
        )));
    }
    submission.options.check(&limits)?;
    for (index, item) in submission.items.iter().enumerate() {
        check_item(app, pipeline, item.get(), &format!("item {index}"))?;
    }
    let idempotency = idempotency(headers, &submission, pipeline.name())?;
    let items = submission
        .items
        .into_iter()
        .map(|item| item.get().as_bytes().to_vec())
        .collect();
    let (status, job) = answer(
        app.backend
            .submit(pipeline, items, submission.options, idempotency)
            .await?,
    )?;
    Ok((status, Json(JobLinks::new(job.id))).into_response())
}

/// Seed 001's scan: one item in, its id out at once; its stream shows every stage. The item is
/// a JSON object, or a multipart form with the photo as a file part named `image`.
#[utoipa::path(post, path = "/v1/scans", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])),
    request_body(content((Object = "application/json"), (Object = "multipart/form-data")), description = "one item, or a form with an `image` file part"),
    responses((status = 202, description = "accepted", body = super::openapi::ScanAccepted),
              (status = 400, description = "malformed body", body = super::openapi::ErrorBody), (status = 413, description = "too large", body = super::openapi::ErrorBody), (status = 415, description = "unsupported type", body = super::openapi::ErrorBody), (status = 422, description = "not a scan", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn scan(
    State(app): State<Arc<App>>,
    query: Result<Query<PipelineQuery>, QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let pipeline = pipeline(&app, query.pipeline.as_deref())?;
    scan_with(&app, &pipeline, request).await
}

/// `POST /v1/scans` on the pipeline in the path.
#[utoipa::path(post, path = "/v1/pipelines/{pipeline}/scans", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])),
    params(("pipeline" = String, Path, description = "pipeline name")),
    request_body(content((Object = "application/json"), (Object = "multipart/form-data")), description = "one item, or a form with an `image` file part"),
    responses((status = 202, description = "accepted", body = super::openapi::ScanAccepted),
              (status = 400, description = "malformed body", body = super::openapi::ErrorBody), (status = 404, description = "no such pipeline", body = super::openapi::ErrorBody), (status = 413, description = "too large", body = super::openapi::ErrorBody), (status = 415, description = "unsupported type", body = super::openapi::ErrorBody), (status = 422, description = "not a scan", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn scan_on_pipeline(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let pipeline = pipeline(&app, Some(&name))?;
    scan_with(&app, &pipeline, request).await
}

async fn scan_with(
    app: &App,
    pipeline: &Arc<Pipeline>,
    request: Request,
) -> Result<Response, ApiError> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let item = if multipart {
        let form = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        images::item_from_multipart(form, app.max_image_bytes)
            .await?
            .to_string()
    } else {
        let Json(item) = Json::<Box<RawValue>>::from_request(request, &()).await?;
        if !item.get().trim_start().starts_with('{') {
            return Err(ApiError::Unprocessable(
                "a scan is one JSON object, e.g. {\"user_id\": ..., \"image_url\": ...}, or a \
                 multipart form with an `image` file part"
                    .into(),
            ));
        }
        item.get().to_string()
    };
    check_item(app, pipeline, &item, "the scan")?;
    let (_, job) = answer(
        app.backend
            .submit(
                pipeline,
                vec![item.into_bytes()],
                JobOptions::default(),
                None,
            )
            .await?,
    )?;
    let body = ScanAccepted {
        links: JobLinks::new(job.id),
        task_id: job.id,
        status: "processing",
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<JobState>,
    /// Jobs of this pipeline only.
    #[param(max_length = 64)]
    pipeline: Option<String>,
    /// Keyset: jobs created before this job id.
    before: Option<uuid::Uuid>,
    /// Jobs per page (50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])), params(ListQuery),
    responses((status = 200, description = "newest first", body = super::openapi::JobList), (status = 400, description = "bad query", body = super::openapi::ErrorBody), (status = 422, description = "a value past its limit (the message names it)", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(q) = query?;
    let limit = page_limit(q.limit, 50)?;
    if let Some(name) = &q.pipeline {
        crate::limits::in_range("length of `pipeline`", name.len(), 1, MAX_NAME)?;
    }
    let filter = JobFilter {
        state: q.state,
        pipeline: q.pipeline,
    };
    let jobs = app.backend.jobs(q.before, &filter, limit).await?;
    let next_before = if jobs.len() == limit {
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok(Json(JobList { jobs, next_before }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])), params(("id" = uuid::Uuid, Path, description = "job id")),
    responses((status = 200, description = "state and counts", body = super::openapi::JobStatus), (status = 404, description = "no such job", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn status(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let id = job_id(&raw)?;
    let job = app
        .backend
        .job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let end = job.finished_at.unwrap_or_else(crate::model::now_ms);
    // `None` when the server no longer serves the job's pipeline.
    let pipeline = app.pipelines.of_job(&job.pipeline, &job.revision);
    let pipeline_tokens = pipeline
        .as_ref()
        .and_then(|p| p.config.llm.max_tokens_per_job);
    Ok(Json(JobStatus {
        duration_ms: end.saturating_sub(job.created_at),
        max_tokens: job.options.max_tokens.or(pipeline_tokens),
        // The versions new stage entries use now; each result records the ones it ran.
        stage_versions: pipeline
            .iter()
            .flat_map(|p| &p.stages)
            .map(|s| StageDigest {
                stage: s.config.name.clone(),
                digest: s.current().meta.digest.clone(),
            })
            .collect(),
        links: JobLinks::new(id),
        job,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ResultsQuery {
    /// Keyset: results with an index above this.
    #[param(minimum = 0, maximum = 9223372036854775807i64)]
    after: Option<u64>,
    /// Results per page (100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Seed 000's API: 1-based page of `page_size`.
    #[param(minimum = 1, maximum = 100000)]
    page: Option<usize>,
    #[param(minimum = 1, maximum = 1000)]
    page_size: Option<usize>,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/results", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])), params(("id" = uuid::Uuid, Path, description = "job id"), ResultsQuery),
    responses((status = 200, description = "a page of results", body = super::openapi::ResultsPage), (status = 400, description = "bad query", body = super::openapi::ErrorBody), (status = 422, description = "a value past its limit (the message names it)", body = super::openapi::ErrorBody), (status = 404, description = "no such job", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn results(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
    query: Result<Query<ResultsQuery>, QueryRejection>,
) -> Result<Json<ResultsPage>, ApiError> {
    let Query(q) = query?;
    let id = job_id(&raw)?;
    if app.backend.job(id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no job {id}")));
    }
    if let Some(after) = q.after {
        crate::limits::in_range("after", after, 0, crate::limits::MAX_POSITION)?;
    }
    let field = if q.limit.is_some() {
        "limit"
    } else {
        "page_size"
    };
    let size = q.limit.or(q.page_size).unwrap_or(100);
    crate::limits::in_range(field, size, 1, MAX_PAGE)?;
    if let Some(page) = q.page {
        crate::limits::in_range("page", page, 1, MAX_PAGE_NUMBER)?;
        if q.after.is_some() {
            return Err(ApiError::BadRequest(
                "`page` does not go with `after`".into(),
            ));
        }
        // Offset paging walks the skipped results; `after` is the fast way.
        let skip = (page - 1).saturating_mul(size);
        let results = app.backend.results_from(id, skip, size).await?;
        return Ok(Json(ResultsPage {
            job_id: id,
            results,
            page: Some(page as u64),
            page_size: Some(size as u64),
            next_after: None,
        }));
    }
    let results = app.backend.results(id, q.after, size).await?;
    let next_after = if results.len() == size {
        results.last().map(|r| r.index)
    } else {
        None
    };
    Ok(Json(ResultsPage {
        job_id: id,
        results,
        page: None,
        page_size: None,
        next_after,
    }))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])), params(("id" = uuid::Uuid, Path, description = "job id")),
    responses((status = 202, description = "cancelling", body = super::openapi::CancelAnswer),
              (status = 200, description = "it had ended: its final state", body = super::openapi::CancelAnswer), (status = 404, description = "no such job", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn cancel(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&raw)?;
    match app.backend.cancel(id).await? {
        CancelOutcome::Cancelling => Ok((
            StatusCode::ACCEPTED,
            Json(CancelAnswer {
                job_id: id,
                state: CancelState::Cancelling,
            }),
        )
            .into_response()),
        CancelOutcome::Finished(state) => Ok(Json(CancelAnswer {
            job_id: id,
            state: state.into(),
        })
        .into_response()),
        CancelOutcome::Unknown => Err(ApiError::NotFound(format!("no job {id}"))),
    }
}

/// One stage's share of a job's time.
#[derive(Serialize, Default, utoipa::ToSchema)]
pub struct StageTime {
    stage: String,
    /// Items that passed the stage (a try that failed for good is in the item's error, not here);
    /// outputs reused after a restart are not counted.
    runs: u64,
    total_ms: f64,
    mean_ms: f64,
    /// Of the time of all stages, 0 to 1.
    share: f64,
}

/// `GET /v1/jobs/{id}/stages`: where the job's finished items spent their time, per stage (seed
/// 003's vision / rule / answer / reward shares). Read from the stored results a page at a time
/// (in either mode), so memory does not grow with the job.
#[utoipa::path(get, path = "/v1/jobs/{id}/stages", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])), params(("id" = uuid::Uuid, Path, description = "job id")),
    responses((status = 200, description = "time per stage", body = super::openapi::StageTimes), (status = 404, description = "no such job", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn stage_times(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
) -> Result<Json<StageTimes>, ApiError> {
    let id = job_id(&raw)?;
    let Some(job) = app.backend.job(id).await? else {
        return Err(ApiError::NotFound(format!("no job {id}")));
    };
    // In the pipeline's order; stages it no longer has are added as the results name them.
    let mut stages: Vec<StageTime> = app
        .pipelines
        .of_job(&job.pipeline, &job.revision)
        .iter()
        .flat_map(|p| &p.stages)
        .map(|s| StageTime {
            stage: s.config.name.clone(),
            ..StageTime::default()
        })
        .collect();
    let (mut items, mut after) = (0u64, None);
    loop {
        let page = app.backend.results(id, after, MAX_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.index);
        items += page.len() as u64;
        for run in page
            .iter()
            .flat_map(|r| &r.stages)
            .filter(|run| !run.reused)
        {
            let at = match stages.iter().position(|t| t.stage == run.stage) {
                Some(at) => at,
                None => {
                    stages.push(StageTime {
                        stage: run.stage.clone(),
                        ..StageTime::default()
                    });
                    stages.len() - 1
                }
            };
            stages[at].runs += 1;
            stages[at].total_ms += run.duration_ms;
        }
    }
    let all: f64 = stages.iter().map(|t| t.total_ms).sum();
    for time in &mut stages {
        time.mean_ms = if time.runs == 0 {
            0.0
        } else {
            time.total_ms / time.runs as f64
        };
        time.share = if all > 0.0 { time.total_ms / all } else { 0.0 };
    }
    Ok(Json(StageTimes {
        job_id: id,
        items,
        stages,
    }))
}
