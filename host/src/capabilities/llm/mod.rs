//! `llm`: chat completions from any OpenAI-compatible endpoint.
//!
//! The guest describes a request; the host adds the URL, the model default and the API key
//! (read from the environment variable the pipeline names, never shown to a guest), admits
//! requests through the provider's and the model's limits ([`limits`]), and sorts failures into
//! what is worth retrying and what is not. Each try may make `llm_calls` calls of at most
//! `llm_request_kib`, and a job stops starting calls once its `max_tokens` are used.

mod limits;
mod stream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use self::limits::{Gate, Limits};
use super::{Counted, HostState};
use crate::config::LlmConfig;
use crate::events::Token;
use crate::runtime::bindings::llm::{
    ChatRequest, ChatResponse, ContentPart, Host, LlmError, Role, Usage,
};
use anyhow::{Context, Result};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

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
    /// The provider's limits, and those of the models that have their own.
    provider: Gate,
    models: BTreeMap<String, Gate>,
    pub usage: LlmUsage,
}

/// Completion tokens counted for a request that does not set `max_tokens`, until the provider
/// reports what it used.
const ASSUMED_COMPLETION_TOKENS: u32 = 256;

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
            provider: Gate::new(Limits {
                max_concurrent: Some(config.max_concurrent_requests),
                requests_per_minute: config.requests_per_minute,
                tokens_per_minute: config.tokens_per_minute,
            }),
            models: config
                .models
                .iter()
                .map(|(name, m)| {
                    let limits = Limits {
                        max_concurrent: m.max_concurrent_requests,
                        requests_per_minute: m.requests_per_minute,
                        tokens_per_minute: m.tokens_per_minute,
                    };
                    (name.clone(), Gate::new(limits))
                })
                .collect(),
            usage: LlmUsage::default(),
        })
    }

    /// How long the provider asked us to wait (its last `Retry-After`), if that is not over.
    pub fn paused_for(&self) -> Option<Duration> {
        std::iter::once(&self.provider)
            .chain(self.models.values())
            .filter_map(Gate::paused_for)
            .max()
    }

    /// Send one chat completion for an item of `job`, once the limits admit it; waiting is
    /// round-robin across jobs.
    pub async fn chat(&self, job: &str, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        self.limited(job, request, |body| self.send(body)).await
    }

    /// Admit `request` through its model's and the provider's gates, `send` it, and account
    /// for the answer: usage, 429 pauses, failures.
    async fn limited<F, Fut>(
        &self,
        job: &str,
        request: ChatRequest,
        send: F,
    ) -> Result<ChatResponse, LlmError>
    where
        F: FnOnce(Value) -> Fut,
        Fut: Future<Output = Result<ChatResponse, LlmError>>,
    {
        let estimate = estimated_tokens(&request);
        let body = self.body(request);
        let model = body["model"].as_str().unwrap_or_default();
        // The model's gate first: waiting for it must not hold a slot of the whole provider.
        let model_gate = self.models.get(model);
        let waiting = crate::metrics::llm_waiting();
        let _model_grant = match model_gate {
            Some(gate) => Some(gate.admit(job, estimate).await),
            None => None,
        };
        let _grant = self.provider.admit(job, estimate).await;
        drop(waiting);
        let gates = || std::iter::once(&self.provider).chain(model_gate);

        self.usage.requests.fetch_add(1, Ordering::Relaxed);
        let model = model.to_string();
        let sent = std::time::Instant::now();
        let result = send(body).await;
        let (outcome, tokens) = match &result {
            Ok(r) => (
                "ok",
                Some((r.usage.prompt_tokens, r.usage.completion_tokens)),
            ),
            Err(LlmError::RateLimited(_)) => ("rate_limited", None),
            Err(LlmError::Unavailable(_)) => ("unavailable", None),
            Err(LlmError::Rejected(_)) => ("rejected", None),
            Err(LlmError::BadResponse(_)) => ("bad_response", None),
        };
        crate::metrics::llm_request(&model, outcome, sent.elapsed(), tokens);
        match &result {
            Ok(response) => {
                let usage = &response.usage;
                self.usage
                    .prompt_tokens
                    .fetch_add(usage.prompt_tokens.into(), Ordering::Relaxed);
                self.usage
                    .completion_tokens
                    .fetch_add(usage.completion_tokens.into(), Ordering::Relaxed);
                let used = usage.prompt_tokens.saturating_add(usage.completion_tokens);
                gates().for_each(|gate| gate.settle(estimate, used));
            }
            Err(LlmError::RateLimited(retry_after_ms)) => {
                self.usage.rate_limited.fetch_add(1, Ordering::Relaxed);
                let retry_after = retry_after_ms.map(Duration::from_millis);
                gates().for_each(|gate| gate.rate_limited(retry_after));
            }
            Err(_) => {
                self.usage.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// POST `body`; a success status gives the response, any other an error sorted by status.
    async fn post(&self, body: &Value) -> Result<reqwest::Response, LlmError> {
        let mut http = self.http.post(&self.endpoint).json(body);
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
        if status.is_success() {
            return Ok(response);
        }
        let body = response
            .text()
            .await
            .map_err(|e| LlmError::Unavailable(describe(&e)))?;
        let message = format!(
            "{status}: {}",
            crate::text::truncate(&body, MAX_QUOTED_BODY)
        );
        Err(if status.is_server_error() {
            LlmError::Unavailable(message)
        } else {
            LlmError::Rejected(message)
        })
    }

    async fn send(&self, body: Value) -> Result<ChatResponse, LlmError> {
        let body = self
            .post(&body)
            .await?
            .text()
            .await
            .map_err(|e| LlmError::Unavailable(describe(&e)))?;
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
                json!({ "role": role, "content": content(m.content) })
            })
            .collect();
        let mut body = json!({
            "model": request.model.unwrap_or_else(|| self.model.clone()),
            "messages": messages,
        });
        if let Some(max_tokens) = request.max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }
        // As the guest wrote it: 0.2, not the f32's 0.20000000298023224.
        if let Some(temperature) = request
            .temperature
            .and_then(|t| t.to_string().parse::<serde_json::Number>().ok())
        {
            body["temperature"] = Value::Number(temperature);
        }
        if request.json_mode {
            body["response_format"] = json!({ "type": "json_object" });
        }
        body
    }
}

/// A message's content as every OpenAI-compatible server takes it: a string when it is text
/// only (servers such as llama.cpp's refuse or drop an array there), an array of parts only
/// when it carries an image.
fn content(parts: Vec<ContentPart>) -> Value {
    if !parts.iter().any(|p| matches!(p, ContentPart::ImageUrl(_))) {
        let texts: Vec<String> = parts
            .into_iter()
            .map(|part| match part {
                ContentPart::Text(text) => text,
                ContentPart::ImageUrl(url) => url,
            })
            .collect();
        return Value::String(texts.join("\n"));
    }
    let parts: Vec<Value> = parts
        .into_iter()
        .map(|part| match part {
            ContentPart::Text(text) => json!({ "type": "text", "text": text }),
            ContentPart::ImageUrl(url) => {
                json!({ "type": "image_url", "image_url": { "url": url } })
            }
        })
        .collect();
    Value::Array(parts)
}

/// Tokens counted for an image part before the provider says (OpenAI's price of a
/// high-detail 512×512 image).
const ASSUMED_IMAGE_TOKENS: usize = 765;

/// A request's token cost before the provider says: about 4 bytes of text a token, a flat
/// price per image, plus the completion's cap.
fn estimated_tokens(request: &ChatRequest) -> u32 {
    let prompt: usize = request
        .messages
        .iter()
        .flat_map(|m| &m.content)
        .map(|part| match part {
            ContentPart::Text(text) => text.len() / 4 + 1,
            ContentPart::ImageUrl(_) => ASSUMED_IMAGE_TOKENS,
        })
        .sum();
    let completion = request.max_tokens.unwrap_or(ASSUMED_COMPLETION_TOKENS);
    u32::try_from(prompt)
        .unwrap_or(u32::MAX)
        .saturating_add(completion)
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

/// What the provider said it used; nothing said counts as nothing used.
fn usage_of(reported: Option<CompletionUsage>) -> Usage {
    let reported = reported.unwrap_or(CompletionUsage {
        prompt_tokens: 0,
        completion_tokens: 0,
    });
    Usage {
        prompt_tokens: reported.prompt_tokens,
        completion_tokens: reported.completion_tokens,
    }
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
    Ok(ChatResponse {
        text,
        model: completion.model,
        usage: usage_of(completion.usage),
    })
}

/// Bytes of a request a guest controls: the model name, texts and image URLs.
fn request_size(request: &ChatRequest) -> usize {
    let parts: usize = request
        .messages
        .iter()
        .flat_map(|m| &m.content)
        .map(|part| match part {
            ContentPart::Text(text) => text.len(),
            ContentPart::ImageUrl(url) => url.len(),
        })
        .sum();
    parts + request.model.as_ref().map_or(0, String::len)
}

impl HostState {
    /// Before an LLM call: count it against the try's budget, size its request, and check the
    /// job's token budget. Past any of them the try fails (kind `budget`).
    async fn admit_llm_call(&mut self, request: &ChatRequest) -> wasmtime::Result<()> {
        self.spend(Counted::LlmCalls, request_size(request))?;
        if let (Some(max), Some(job)) = (self.job_max_tokens, self.job()) {
            let used = (self.caps.items.llm_tokens(job).await)
                .map_err(|e| wasmtime::Error::msg(format!("{e:#}")))?;
            if used >= max {
                return Err(self.over_budget(
                    "max_tokens",
                    format!(
                        "the job's LLM token budget of {max} is used up ({used} tokens used): \
                         no more LLM calls start for it"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Count what an answered call used against its job.
    async fn count_tokens(&mut self, result: &Result<ChatResponse, LlmError>) {
        let (Ok(response), Some(job)) = (result, self.job()) else {
            return;
        };
        let used =
            u64::from(response.usage.prompt_tokens) + u64::from(response.usage.completion_tokens);
        if let Err(error) = self.caps.items.add_llm_tokens(job, used).await {
            tracing::error!(job = %job, error = %format!("{error:#}"), "cannot count a job's LLM tokens");
        }
    }

    fn job(&self) -> Option<uuid::Uuid> {
        self.context.job_id.parse().ok()
    }
}

impl Host for HostState {
    async fn chat(
        &mut self,
        request: ChatRequest,
    ) -> wasmtime::Result<Result<ChatResponse, LlmError>> {
        self.admit_llm_call(&request).await?;
        let caps = self.caps.clone();
        let job = self.context.job_id.clone();
        let result = self.meter.host_call(caps.llm.chat(&job, request)).await;
        self.count_tokens(&result).await;
        Ok(result)
    }

    async fn chat_stream(
        &mut self,
        request: ChatRequest,
    ) -> wasmtime::Result<Result<ChatResponse, LlmError>> {
        self.admit_llm_call(&request).await?;
        let caps = self.caps.clone();
        let job = self.context.job_id.clone();
        let job_id = uuid::Uuid::parse_str(&job).ok();
        let (index, stage): (u64, Arc<str>) =
            (self.context.item_index, self.context.stage.as_str().into());
        let on_text = |text: &str| {
            if let Some(job_id) = job_id {
                caps.tokens.publish(
                    job_id,
                    Token {
                        index,
                        stage: stage.clone(),
                        text: text.to_string(),
                    },
                );
            }
        };
        let result = self
            .meter
            .host_call(caps.llm.chat_stream(&job, request, on_text))
            .await;
        self.count_tokens(&result).await;
        Ok(result)
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
    fn requests_are_written_as_compatible_servers_take_them() {
        let config: crate::config::LlmConfig =
            toml::from_str("base_url = \"http://x/v1\"\nmodel = \"m\"").unwrap();
        let client = LlmClient::new(&config).unwrap();
        let text = |t: &str| ContentPart::Text(t.into());
        let message = |role, content| crate::runtime::bindings::llm::Message { role, content };
        let body = client.body(ChatRequest {
            model: None,
            messages: vec![
                message(Role::System, vec![text("be brief")]),
                message(
                    Role::User,
                    vec![
                        text("what is"),
                        ContentPart::ImageUrl("data:image/png;base64,AA".into()),
                    ],
                ),
                message(Role::User, vec![text("a"), text("b")]),
            ],
            max_tokens: Some(5),
            temperature: Some(0.2),
            json_mode: false,
        });
        assert_eq!(body["messages"][0]["content"], "be brief");
        assert_eq!(body["messages"][1]["content"][1]["type"], "image_url");
        assert_eq!(body["messages"][2]["content"], "a\nb");
        assert_eq!(body["temperature"].to_string(), "0.2");
        assert!(body.get("response_format").is_none());
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
