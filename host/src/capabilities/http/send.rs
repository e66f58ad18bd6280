//! One outbound request, made by the host for a guest: checked against the grant at every hop
//! (redirects are followed here, each against the allowlist), limited in time and in bytes,
//! counted and traced. What it answers is plain data, so that a journal can keep it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::Instrument as _;

use super::HttpGrant;
use crate::outbound::{HttpLimits, MAX_REDIRECTS};

/// A guest's request once its body is complete.
#[derive(Debug, Clone)]
pub struct FullRequest {
    pub method: http::Method,
    pub url: http::Uri,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

/// How a reply names the request body it answers.
pub fn body_digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// A response, whole: what the guest reads, and what a journal keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    /// sha256 of the request body it answers: a replay checks that it sends the same.
    pub request_body_sha256: String,
}

/// Why a request got no response; each becomes a `wasi:http` error code for the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum HttpFailure {
    #[error("{0}")]
    Denied(String),
    #[error("the request body is over the stage's `http.request_kib` ({0} bytes)")]
    RequestTooLarge(u64),
    #[error("the response body is over the stage's `http.response_kib` ({0} bytes)")]
    ResponseTooLarge(u64),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Protocol(String),
}

impl HttpFailure {
    /// The `outcome` label of `stagehand_http_requests_total`.
    fn outcome(&self) -> &'static str {
        match self {
            HttpFailure::Denied(_) => "denied",
            HttpFailure::RequestTooLarge(_) | HttpFailure::ResponseTooLarge(_) => "too_large",
            HttpFailure::Timeout(_) => "timeout",
            HttpFailure::Connect(_) => "connect_error",
            HttpFailure::Protocol(_) => "error",
        }
    }

    /// The error code the guest reads.
    pub fn to_wasi(&self) -> wasmtime_wasi_http::Error {
        use wasmtime_wasi_http::Error;
        match self {
            HttpFailure::Denied(_) => Error::HttpRequestDenied,
            HttpFailure::RequestTooLarge(n) => Error::HttpRequestBodySize(Some(*n)),
            HttpFailure::ResponseTooLarge(n) => Error::HttpResponseBodySize(Some(*n)),
            HttpFailure::Timeout(_) => Error::HttpResponseTimeout,
            HttpFailure::Connect(_) => Error::ConnectionRefused,
            HttpFailure::Protocol(m) => Error::InternalError(Some(m.clone())),
        }
    }
}

/// Who asks, for logs and metrics.
#[derive(Debug, Clone, Default)]
pub struct Asker {
    pub pipeline: String,
    /// The stage, or `handler:NAME`.
    pub component: String,
}

/// Make `request` as `grant` allows, within its limits.
pub async fn send(grant: &HttpGrant, request: FullRequest) -> Result<Reply, HttpFailure> {
    let (limits, asker) = (grant.limits, &grant.asker);
    let request_body_sha256 = body_digest(&request.body);
    let span = tracing::info_span!(
        "http",
        method = %request.method,
        url = %request.url,
        status = tracing::field::Empty,
    );
    let started = Instant::now();
    let deadline = limits.timeout;
    let (origin, result) =
        match tokio::time::timeout(deadline, follow(grant, request).instrument(span.clone())).await
        {
            Ok((origin, result)) => (origin, result),
            Err(_) => (
                None,
                Err(HttpFailure::Timeout(format!(
                    "no whole response within the stage's `http.timeout_ms` ({} ms)",
                    deadline.as_millis()
                ))),
            ),
        };
    let host = origin.as_deref().unwrap_or("none");
    let outcome = match &result {
        Ok(reply) => {
            span.record("status", reply.status);
            status_class(reply.status)
        }
        Err(failure) => failure.outcome(),
    };
    let bytes = result.as_ref().map_or(0, |r| r.body.len());
    crate::metrics::http_request(
        &asker.pipeline,
        &asker.component,
        host,
        outcome,
        started.elapsed(),
        bytes,
    );
    if let Err(failure) = &result {
        tracing::warn!(pipeline = %asker.pipeline, stage = %asker.component, error = %failure, "an outbound request failed");
    }
    result.map(|mut reply| {
        reply.request_body_sha256 = request_body_sha256;
        reply
    })
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The request and the redirects it leads to, each hop checked against the grant. Also
/// returns the origin of the last allowed hop, for metrics (an allowlist entry, so a bounded
/// set of label values).
async fn follow(
    grant: &HttpGrant,
    request: FullRequest,
) -> (Option<String>, Result<Reply, HttpFailure>) {
    let limits = grant.limits;
    let FullRequest {
        mut method,
        mut url,
        headers,
        mut body,
    } = request;
    let mut origin = None;
    for hop in 0..=MAX_REDIRECTS {
        let (to, allowed) = match grant.check(&url) {
            Ok(checked) => checked,
            Err(why) => {
                let why = if hop == 0 {
                    why
                } else {
                    format!("a redirect left the allowed hosts: {why}")
                };
                return (origin, Err(HttpFailure::Denied(why)));
            }
        };
        origin = Some(allowed);
        let mut builder = grant
            .client
            .request(method.clone(), url.to_string())
            .timeout(limits.timeout);
        // Secrets are filled in for this hop's destination, or the request goes nowhere.
        let mut used = Vec::new();
        for (name, value) in &headers {
            let (value, secrets) = match grant.secrets.fill(value, &to) {
                Ok(filled) => filled,
                Err(why) => return (origin, Err(HttpFailure::Denied(why))),
            };
            used.extend(secrets);
            builder = builder.header(name.as_str(), value);
        }
        if !body.is_empty() {
            builder = builder.body(body.clone());
        }
        let response = match builder.send().await {
            Ok(response) => response,
            Err(error) => return (origin, Err(transport_failure(&error, limits))),
        };
        let status = response.status();
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_string);
        if status.is_redirection()
            && let Some(location) = location
        {
            if hop == MAX_REDIRECTS {
                return (
                    origin,
                    Err(HttpFailure::Protocol(format!(
                        "more than {MAX_REDIRECTS} redirects"
                    ))),
                );
            }
            url = match resolve(&url, &location) {
                Some(next) => next,
                None => {
                    return (
                        origin,
                        Err(HttpFailure::Protocol(format!(
                            "a redirect to an unreadable location: {location:?}"
                        ))),
                    );
                }
            };
            // 303, and 301/302 after a POST, go on as a GET without a body (as browsers do).
            if status == http::StatusCode::SEE_OTHER
                || (method == http::Method::POST && matches!(status.as_u16(), 301 | 302))
            {
                method = http::Method::GET;
                body = Bytes::new();
            }
            continue;
        }
        let reply = read_reply(response, limits).await.map(|mut reply| {
            if !used.is_empty() {
                for (_, value) in &mut reply.headers {
                    let mut bytes = std::mem::take(value).into_bytes();
                    grant.secrets.scrub(&mut bytes, &used);
                    *value = String::from_utf8_lossy(&bytes).into_owned();
                }
                grant.secrets.scrub(&mut reply.body, &used);
            }
            reply
        });
        return (origin, reply);
    }
    unreachable!("the loop returns at its last hop")
}

/// `location` against `base`: absolute, or a path on the same origin.
fn resolve(base: &http::Uri, location: &str) -> Option<http::Uri> {
    let base = reqwest::Url::parse(&base.to_string()).ok()?;
    base.join(location).ok()?.as_str().parse().ok()
}

async fn read_reply(response: reqwest::Response, limits: HttpLimits) -> Result<Reply, HttpFailure> {
    let limit = limits.response_bytes;
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(HttpFailure::ResponseTooLarge(limit as u64));
    }
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|v| (name.as_str().to_string(), v.to_string()))
        })
        .collect();
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| HttpFailure::Protocol(format!("reading the response: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(HttpFailure::ResponseTooLarge(limit as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply {
        status,
        headers,
        body,
        request_body_sha256: String::new(),
    })
}

fn transport_failure(error: &reqwest::Error, limits: HttpLimits) -> HttpFailure {
    let detail = std::error::Error::source(error)
        .map_or_else(|| error.to_string(), |s| format!("{error}: {s}"));
    if error.is_timeout() {
        HttpFailure::Timeout(format!(
            "timed out (`http.connect_timeout_ms` {} ms, `http.timeout_ms` {} ms): {detail}",
            limits.connect_timeout.as_millis(),
            limits.timeout.as_millis()
        ))
    } else if error.is_connect() {
        HttpFailure::Connect(detail)
    } else {
        HttpFailure::Protocol(detail)
    }
}

/// The client of one grant: no redirects of its own (they are followed above, each checked),
/// no proxy from the environment, its connect timeout.
pub fn client(connect_timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(connect_timeout)
        .build()
        .expect("a client without TLS options builds")
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}
