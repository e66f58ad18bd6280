//! One provider: an OpenAI-compatible endpoint, its API keys and its limits.
//!
//! A request passes three gates ([`Gate`]): its model's (if the model has limits of its own),
//! then the key's (keys are taken in turn, round-robin, skipping one the provider paused while
//! another is free), then the provider's. The model's gate comes first, so that waiting for
//! it holds no slot of the whole provider. A 429 pauses the key that got it when the provider
//! has several (rate limits are per key at hosted APIs), else the provider and the model.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use reqwest::StatusCode;
use serde_json::Value;

use super::limits::{Gate, Limits, all_paused};
use super::status::{describe, refusal, retry_after_ms};
use super::wire;
use crate::config::ProviderConfig;
use crate::model::LlmCall;
use crate::runtime::bindings::llm::{ChatRequest, ChatResponse, LlmError};

/// Counters of one provider, for summaries and metrics.
#[derive(Debug, Default)]
pub struct LlmUsage {
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub rate_limited: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Answers that came without usage, counted from an estimate.
    pub estimated: AtomicU64,
}

/// One API key and the gate of its own limits.
struct Key {
    value: String,
    gate: Gate,
}

pub struct Provider {
    pub name: String,
    http: reqwest::Client,
    endpoint: String,
    model: String,
    model_map: BTreeMap<String, String>,
    keys: Vec<Key>,
    next_key: AtomicUsize,
    gate: Gate,
    models: BTreeMap<String, Gate>,
    pub usage: LlmUsage,
}

/// How a request is sent: whole, or streamed with each piece of text given to a callback.
pub(super) enum Delivery<'a> {
    Whole,
    Streamed(&'a mut (dyn FnMut(&str) + Send)),
}

impl Provider {
    pub fn new(name: &str, config: &ProviderConfig) -> Result<Self> {
        let keys = config
            .keys
            .iter()
            .map(|key| {
                let value = std::env::var(&key.env).with_context(|| {
                    format!(
                        "provider `{name}` names ${} for a key, which is not set",
                        key.env
                    )
                })?;
                let gate = Gate::new(Limits {
                    max_concurrent: key.max_concurrent_requests,
                    requests_per_minute: key.requests_per_minute,
                    tokens_per_minute: key.tokens_per_minute,
                });
                Ok(Key { value, gate })
            })
            .collect::<Result<Vec<_>>>()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(config.max_concurrent_requests)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            name: name.to_string(),
            http,
            endpoint: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            model: config.model.clone(),
            model_map: config.model_map.clone(),
            keys,
            next_key: AtomicUsize::new(0),
            gate: Gate::new(Limits {
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

    /// The name this provider knows `asked` by (the default model when none is asked).
    fn model_for(&self, asked: Option<&str>) -> String {
        match asked {
            None => self.model.clone(),
            Some(asked) => self
                .model_map
                .get(asked)
                .cloned()
                .unwrap_or_else(|| asked.to_string()),
        }
    }

    /// How long the provider asked us to wait (its last `Retry-After`), if that is not over.
    /// With several keys, only when every key is paused.
    pub fn paused_for(&self) -> Option<Duration> {
        let keys = all_paused(self.keys.iter().map(|k| k.gate.paused_for()))
            .filter(|_| self.keys.len() > 1);
        std::iter::once(&self.gate)
            .chain(self.models.values())
            .filter_map(Gate::paused_for)
            .chain(keys)
            .max()
    }

    /// The next key in turn, preferring one that is not paused.
    fn pick_key(&self) -> Option<&Key> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        let start = self.next_key.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.keys[(start + i) % n])
            .find(|key| key.gate.paused_for().is_none())
            .or(Some(&self.keys[start % n]))
    }

    /// Send one chat completion for an item of `job` once the limits admit it (waiting is
    /// round-robin across jobs), and account for the answer: usage, 429 pauses, failures.
    pub(super) async fn complete(
        &self,
        job: &str,
        request: ChatRequest,
        delivery: Delivery<'_>,
    ) -> (Result<ChatResponse, LlmError>, LlmCall) {
        let estimate = wire::estimated_tokens(&request);
        let prompt_estimate = wire::estimated_prompt_tokens(&request);
        let model = self.model_for(request.model.as_deref());
        let body = wire::body(request, &model);

        let model_gate = self.models.get(&model);
        let key = self.pick_key();
        let waiting = crate::metrics::llm_waiting();
        let _model_grant = match model_gate {
            Some(gate) => Some(gate.admit(job, estimate).await),
            None => None,
        };
        let _key_grant = match key {
            Some(key) => Some(key.gate.admit(job, estimate).await),
            None => None,
        };
        let _grant = self.gate.admit(job, estimate).await;
        drop(waiting);
        let gates = || {
            std::iter::once(&self.gate)
                .chain(model_gate)
                .chain(key.map(|k| &k.gate))
        };

        self.usage.requests.fetch_add(1, Ordering::Relaxed);
        let sent = std::time::Instant::now();
        let key_value = key.map(|k| k.value.as_str());
        let result = match delivery {
            Delivery::Whole => self.send(body, key_value, prompt_estimate).await,
            Delivery::Streamed(on_text) => {
                self.send_streamed(body, key_value, prompt_estimate, on_text)
                    .await
            }
        };
        let result = result.map(|mut response| {
            response.provider = self.name.clone();
            response
        });
        let call = super::record(&self.name, model, &result);
        crate::metrics::llm_request(&call, sent.elapsed());
        match &result {
            Ok(response) => {
                let usage = &response.usage;
                self.usage
                    .prompt_tokens
                    .fetch_add(usage.prompt_tokens.into(), Ordering::Relaxed);
                self.usage
                    .completion_tokens
                    .fetch_add(usage.completion_tokens.into(), Ordering::Relaxed);
                if usage.estimated {
                    self.usage.estimated.fetch_add(1, Ordering::Relaxed);
                }
                let used = usage.prompt_tokens.saturating_add(usage.completion_tokens);
                gates().for_each(|gate| gate.settle(estimate, used));
            }
            Err(LlmError::RateLimited(retry_after_ms)) => {
                self.usage.rate_limited.fetch_add(1, Ordering::Relaxed);
                let retry_after = retry_after_ms.map(Duration::from_millis);
                match key.filter(|_| self.keys.len() > 1) {
                    Some(key) => key.gate.rate_limited(retry_after),
                    None => gates().for_each(|gate| gate.rate_limited(retry_after)),
                }
            }
            Err(_) => {
                self.usage.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        (result, call)
    }

    /// POST `body`; a success status gives the response, any other an error sorted by what it
    /// means ([`refusal`]).
    pub(super) async fn post(
        &self,
        body: &Value,
        key: Option<&str>,
    ) -> Result<reqwest::Response, LlmError> {
        let mut http = self.http.post(&self.endpoint).json(body);
        if let Some(key) = key {
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
        Err(refusal(status, &body))
    }

    async fn send(
        &self,
        body: Value,
        key: Option<&str>,
        prompt_estimate: u32,
    ) -> Result<ChatResponse, LlmError> {
        let body = self
            .post(&body, key)
            .await?
            .text()
            .await
            .map_err(|e| LlmError::Unavailable(describe(&e)))?;
        wire::parse_completion(&body, prompt_estimate)
    }
}
