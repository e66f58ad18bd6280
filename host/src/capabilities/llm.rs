//! `llm`: chat completions from any OpenAI-compatible endpoint.
//!
//! The guest describes a request; the host adds the URL, the model default and the API key
//! (read from the environment variable the pipeline names, never shown to a guest), bounds
//! concurrent requests, and sorts failures into what is worth retrying and what is not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::HostState;
use crate::config::LlmConfig;
use crate::runtime::bindings::llm::{
    ChatRequest, ChatResponse, ContentPart, Host, LlmError, Role, Usage,
};

/// Counters of one provider, for summaries and metrics.
#[derive(Debug, Default)]
pub struct LlmUsage {
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub rate_limited: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

pub struct LlmClient {
    http: reqwest::Client,
    endpoint: String,
    model: String,
    api_key: Option<String>,
    in_flight: Semaphore,
    /// Set by a 429 with `Retry-After`: no request goes out before then, and retries of failed
    /// stages wait for it too.
    paused_until: std::sync::Mutex<Option<tokio::time::Instant>>,
    pub usage: LlmUsage,
}

/// Longest provider error body quoted in a message.
const MAX_QUOTED_BODY: usize = 300;

impl LlmClient {
    pub fn new(config: &LlmConfig) -> Result<Self> {
        let api_key = match &config.api_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .with_context(|| format!("`llm.api_key_env` names ${var}, which is not set"))?,
            ),
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(config.max_concurrent_requests)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            http,
            endpoint: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            model: config.model.clone(),
            api_key,
            in_flight: Semaphore::new(config.max_concurrent_requests),
            paused_until: std::sync::Mutex::default(),
            usage: LlmUsage::default(),
        })
    }

    /// How long the provider asked us to wait (its last `Retry-After`), if that is not over.
    pub fn paused_for(&self) -> Option<Duration> {
        let until = (*self.paused_until.lock().expect("not poisoned"))?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        (!left.is_zero()).then_some(left)
    }

    pub async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| LlmError::Unavailable("client shut down".into()))?;
        if let Some(wait) = self.paused_for() {
            tokio::time::sleep(wait).await;
        }
        self.usage.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.send(request).await;
        match &result {
            Ok(response) => {
                self.usage
                    .prompt_tokens
                    .fetch_add(response.usage.prompt_tokens.into(), Ordering::Relaxed);
                self.usage
                    .completion_tokens
                    .fetch_add(response.usage.completion_tokens.into(), Ordering::Relaxed);
            }
            Err(LlmError::RateLimited(retry_after_ms)) => {
                self.usage.rate_limited.fetch_add(1, Ordering::Relaxed);
                if let Some(ms) = retry_after_ms {
                    let until = tokio::time::Instant::now() + Duration::from_millis(*ms);
                    let mut paused = self.paused_until.lock().expect("not poisoned");
                    *paused = Some(paused.map_or(until, |p| p.max(until)));
                }
            }
            Err(_) => {
                self.usage.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn send(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let mut http = self.http.post(&self.endpoint).json(&self.body(request));
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key);
        }
        let response = http
            .send()
            .await
            .map_err(|e| LlmError::Unavailable(describe(&e)))?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(LlmError::RateLimited(retry_after_ms(response.headers())));
        }
        let body = response
            .text()
            .await
            .map_err(|e| LlmError::Unavailable(describe(&e)))?;
        if status.is_server_error() {
            return Err(LlmError::Unavailable(format!(
                "{status}: {}",
                crate::text::truncate(&body, MAX_QUOTED_BODY)
            )));
        }
        if !status.is_success() {
            return Err(LlmError::Rejected(format!(
                "{status}: {}",
                crate::text::truncate(&body, MAX_QUOTED_BODY)
            )));
        }
        parse_completion(&body)
    }

    /// The OpenAI chat completions request body.
    fn body(&self, request: ChatRequest) -> Value {
        let messages: Vec<Value> = request
            .messages
            .into_iter()
            .map(|m| {
                let role = match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                let parts: Vec<Value> = m
                    .content
                    .into_iter()
                    .map(|part| match part {
                        ContentPart::Text(text) => json!({ "type": "text", "text": text }),
                        ContentPart::ImageUrl(url) => {
                            json!({ "type": "image_url", "image_url": { "url": url } })
                        }
                    })
                    .collect();
                json!({ "role": role, "content": parts })
            })
            .collect();
        let mut body = json!({
            "model": request.model.unwrap_or_else(|| self.model.clone()),
            "messages": messages,
        });
        if let Some(max_tokens) = request.max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }
        if let Some(temperature) = request.temperature {
            body["temperature"] = json!(temperature);
        }
        if request.json_mode {
            body["response_format"] = json!({ "type": "json_object" });
        }
        body
    }
}

fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "request timed out".to_string()
    } else if error.is_connect() {
        format!("cannot connect: {error}")
    } else {
        error.to_string()
    }
}

/// `Retry-After` in seconds (the standard) or `retry-after-ms` (OpenAI's), in milliseconds.
fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
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

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    model: String,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<CompletionUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct CompletionUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

fn parse_completion(body: &str) -> Result<ChatResponse, LlmError> {
    let completion: Completion = serde_json::from_str(body).map_err(|e| {
        LlmError::BadResponse(format!(
            "{e}: {}",
            crate::text::truncate(body, MAX_QUOTED_BODY)
        ))
    })?;
    let text = completion
        .choices
        .into_iter()
        .next()
        .and_then(|c| c.message.content)
        .ok_or_else(|| LlmError::BadResponse("no message content in the first choice".into()))?;
    let usage = completion.usage.map_or(
        Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
        },
        |u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        },
    );
    Ok(ChatResponse {
        text,
        model: completion.model,
        usage,
    })
}

impl Host for HostState {
    async fn chat(
        &mut self,
        request: ChatRequest,
    ) -> wasmtime::Result<Result<ChatResponse, LlmError>> {
        let caps = self.caps.clone();
        Ok(self.meter.host_call(caps.llm.chat(request)).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after_ms(&headers), None);
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after_ms(&headers), Some(2000));
        headers.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after_ms(&headers), Some(150));
    }

    #[test]
    fn completion_without_content_is_a_bad_response() {
        let body = r#"{"model":"m","choices":[{"message":{"role":"assistant"}}]}"#;
        assert!(matches!(
            parse_completion(body),
            Err(LlmError::BadResponse(_))
        ));
        let ok = r#"{"model":"m","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let response = parse_completion(ok).unwrap();
        assert_eq!(
            (response.text.as_str(), response.usage.prompt_tokens),
            ("hi", 3)
        );
    }
}
