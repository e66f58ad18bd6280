//! `GET /v1/jobs/{id}/events`: the job's log as Server-Sent Events.
//!
//! Each message has `id:` (the log number), `event:` and JSON `data:`; the first message sets
//! `retry:`. `Last-Event-ID` (header, or `?last_event_id=`) resumes after that number, replaying
//! from the store then following live; a stream opened after the end replays and closes.
//! Behind nginx, `X-Accel-Buffering: no` keeps events from being held back.
//!
//! `?tokens=true` adds the live pieces of streamed LLM answers as `item.token` messages
//! (`{index, stage, text}`), without `id:` since they are not in the log and not replayed; a
//! follower too slow for them gets `tokens.dropped` (`{missed}`) instead of a growing buffer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, App, job_id};
use crate::events::view::{Coalescing, JobView};
use crate::events::{Token, TokenSubscription};
use crate::limits::{
    MAX_POSITION, MAX_PROGRESS_INTERVAL_MS, MAX_PROGRESS_ITEMS, MIN_PROGRESS_INTERVAL_MS, in_range,
};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[param(minimum = 0, maximum = 9223372036854775807i64)]
    last_event_id: Option<u64>,
    /// Progress frames carry at most this many items (default 10).
    #[param(minimum = 1, maximum = 1000)]
    max_items: Option<usize>,
    /// ... and go out at least this often while items finish (default 3000 ms).
    #[param(minimum = 100, maximum = 600000)]
    interval_ms: Option<u64>,
    /// Also send `item.token` messages while stages stream LLM answers.
    #[serde(default)]
    tokens: bool,
}

const RETRY: Duration = Duration::from_secs(3);

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", security((), ("api_token" = []), ("admin_token" = [])), params(("id" = uuid::Uuid, Path, description = "job id"), EventsQuery,
      ("Last-Event-ID" = Option<u64>, Header, minimum = 0, maximum = 9223372036854775807i64, description = "resume after this event number")),
    responses((status = 200, description = "Server-Sent Events: `job.started`, `job.progress`, `item.stage`, `item.token`, `job.completed`, `job.cancelled`, `job.failed`", content_type = "text/event-stream", body = serde_json::Value),
              (status = 400, description = "bad query or Last-Event-ID", body = super::openapi::ErrorBody), (status = 422, description = "a value past its limit (the message names it)", body = super::openapi::ErrorBody), (status = 404, description = "no such job", body = super::openapi::ErrorBody), (status = 401, description = "missing or wrong token", body = super::openapi::ErrorBody)))]
pub async fn stream(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let id = job_id(&raw)?;
    let job = app
        .backend
        .job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let after = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                ApiError::BadRequest("`Last-Event-ID` must be an event number".into())
            })?,
        None => q.last_event_id.unwrap_or(0),
    };
    for number in [Some(after), q.last_event_id].into_iter().flatten() {
        in_range("last_event_id", number, 0, MAX_POSITION)?;
    }
    if let Some(max_items) = q.max_items {
        in_range("max_items", max_items, 1, MAX_PROGRESS_ITEMS)?;
    }
    if let Some(interval) = q.interval_ms {
        in_range(
            "interval_ms",
            interval,
            MIN_PROGRESS_INTERVAL_MS,
            MAX_PROGRESS_INTERVAL_MS,
        )?;
    }
    let defaults = Coalescing::default();
    let coalescing = Coalescing {
        max_items: q.max_items.unwrap_or(defaults.max_items),
        interval: q
            .interval_ms
            .map_or(defaults.interval, Duration::from_millis),
    };
    // Follow tokens before reading the log, so none arrives between the two unseen.
    let tokens = q.tokens.then(|| app.live_tokens.subscribe(id));
    let view = JobView::new(app.backend.events(), id, job.total, after, coalescing).await?;
    // Counted while the stream lives: the guard goes with the stream's state.
    let subscriber = crate::metrics::sse_subscriber();
    let frames = futures::stream::unfold(
        (view, tokens, true, subscriber),
        |(mut view, mut tokens, first, subscriber)| async move {
            if first {
                return Some((
                    Ok::<_, Infallible>(SseEvent::default().retry(RETRY)),
                    (view, tokens, false, subscriber),
                ));
            }
            let event = tokio::select! {
                // Log frames first: the terminal one must not wait behind a flood of tokens.
                biased;
                frame = view.next() => match frame {
                    Ok(Some(frame)) => SseEvent::default()
                        .id(frame.id.to_string())
                        .event(frame.event)
                        .data(frame.data.to_string()),
                    Ok(None) => return None,
                    Err(error) => {
                        tracing::error!(error = %format!("{error:#}"), "event stream failed");
                        return None;
                    }
                },
                token = next_token(&mut tokens) => match token {
                    Ok(token) => SseEvent::default()
                        .event("item.token")
                        .data(serde_json::to_string(&token).expect("a token serialises")),
                    Err(missed) => SseEvent::default()
                        .event("tokens.dropped")
                        .data(serde_json::json!({ "missed": missed }).to_string()),
                },
            };
            Some((Ok(event), (view, tokens, false, subscriber)))
        },
    );
    let headers = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        ),
    ];
    Ok((
        headers,
        Sse::new(frames).keep_alive(KeepAlive::new().interval(app.sse_keep_alive)),
    )
        .into_response())
}

/// The next token of a follower; never, without one.
async fn next_token(tokens: &mut Option<TokenSubscription>) -> Result<Token, u64> {
    match tokens {
        Some(tokens) => tokens.next().await,
        None => std::future::pending().await,
    }
}
