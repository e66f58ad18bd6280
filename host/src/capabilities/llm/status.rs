//! What a provider's failure means: worth another try, or not.
//!
//! The status decides first: 429 is a rate limit; 408 and 409 (a timeout, a conflict on the
//! provider's side) and 5xx are outages worth retrying; any other 4xx says the request itself
//! is wrong. Some servers answer a request that fails their schema with a 500 (llama.cpp's
//! server through llama-cpp-python, some gateways): such a body is read as what it is, a
//! rejection, so the item is not tried again and again with the same bad request.

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::runtime::bindings::llm::LlmError;

/// Longest provider error body quoted in a message: enough for a validation error's list.
pub(super) const MAX_QUOTED_BODY: usize = 4096;

/// The error an unsuccessful status with `body` stands for (429 is handled before, with its
/// `Retry-After`).
pub(super) fn refusal(status: StatusCode, body: &str) -> LlmError {
    let message = format!("{status}: {}", quoted(body));
    let retryable = matches!(
        status,
        StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS
    ) || (status.is_server_error() && !says_invalid(body));
    if retryable {
        LlmError::Unavailable(message)
    } else {
        LlmError::Rejected(message)
    }
}

/// Words with which OpenAI-compatible servers say the request is invalid, whatever the status.
const INVALID_REQUEST_MARKERS: &[&str] = &[
    "validation error",
    "invalid_request_error",
    "badrequesterror",
    "unprocessable",
];

fn says_invalid(body: &str) -> bool {
    let body = body.to_ascii_lowercase();
    INVALID_REQUEST_MARKERS.iter().any(|m| body.contains(m))
}

/// A provider's error body for a message: the cause first (OpenAI's `error.message`,
/// FastAPI's `detail`, or a top-level `message`), then the rest, within [`MAX_QUOTED_BODY`].
pub(super) fn quoted(body: &str) -> String {
    let body = body.trim();
    let cause = serde_json::from_str::<Value>(body).ok().and_then(|json| {
        ["/error/message", "/detail", "/message", "/error"]
            .iter()
            .find_map(|at| match json.pointer(at)? {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                // FastAPI's validation errors: a list of objects.
                detail @ (Value::Array(_) | Value::Object(_)) if *at == "/detail" => {
                    Some(detail.to_string())
                }
                _ => None,
            })
    });
    let text = match cause {
        Some(cause) => format!("{cause} (body: {body})"),
        None => body.to_string(),
    };
    crate::text::truncate(&text, MAX_QUOTED_BODY).into_owned()
}

pub(super) fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "request timed out".to_string()
    } else if error.is_connect() {
        format!("cannot connect: {error}")
    } else {
        error.to_string()
    }
}

/// `Retry-After` in seconds (the standard) or `retry-after-ms` (OpenAI's), in milliseconds.
pub(super) fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    if let Some(ms) = header("retry-after-ms") {
        return Some(ms.max(0.0) as u64);
    }
    header("retry-after").map(|s| (s.max(0.0) * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retried(status: u16, body: &str) -> bool {
        match refusal(StatusCode::from_u16(status).unwrap(), body) {
            LlmError::Unavailable(_) => true,
            LlmError::Rejected(_) => false,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn statuses_are_sorted_by_what_they_mean() {
        assert!(retried(
            500,
            r#"{"error":{"message":"The server had an error"}}"#
        ));
        assert!(retried(502, "Bad Gateway"));
        assert!(retried(503, ""));
        assert!(retried(408, ""));
        assert!(retried(409, ""));
        assert!(!retried(400, r#"{"error":{"message":"bad"}}"#));
        assert!(!retried(401, "no key"));
        assert!(!retried(404, "no such model"));
        assert!(!retried(422, "{}"));
        // llama-cpp-python answers a schema failure with a 500.
        assert!(!retried(
            500,
            "10 validation errors for CreateChatCompletionRequest\nmessages.0.content\n  \
             Input should be a valid string"
        ));
        // LiteLLM's proxy wraps a provider's 400.
        assert!(!retried(
            500,
            r#"{"error":{"message":"litellm.BadRequestError: OpenAIException - bad","type":null}}"#
        ));
    }

    #[test]
    fn the_cause_comes_first_and_long_bodies_are_kept_to_a_few_kb() {
        let detail = format!(
            r#"{{"padding":"{}","error":{{"message":"model `x` does not exist","type":"invalid_request_error"}}}}"#,
            "p".repeat(400)
        );
        let message = match refusal(StatusCode::NOT_FOUND, &detail) {
            LlmError::Rejected(m) => m,
            other => panic!("{other:?}"),
        };
        assert!(
            message.starts_with("404 Not Found: model `x` does not exist (body: "),
            "{message}"
        );
        let fastapi = quoted(r#"{"detail":[{"loc":["body","messages"],"msg":"field required"}]}"#);
        assert!(fastapi.starts_with(r#"[{"loc""#), "{fastapi}");
        let huge = "e".repeat(100_000);
        assert!(quoted(&huge).len() <= MAX_QUOTED_BODY + 3);
        assert!(
            quoted(&"e".repeat(1000)).len() == 1000,
            "1 KB is kept whole"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after_ms(&headers), None);
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after_ms(&headers), Some(2000));
        headers.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after_ms(&headers), Some(150));
    }
}
