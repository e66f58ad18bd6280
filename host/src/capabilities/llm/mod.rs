//! `llm`: chat completions from OpenAI-compatible endpoints.
//!
//! A pipeline names its providers (`[llm]`, `[providers.NAME]`); each stage goes to an ordered
//! list of them, and a call that meets a 429, a 5xx or no connection at one provider goes on to
//! the next ([`LlmProviders::chat`]). The host adds URLs, model names and API keys (read from
//! the environment variables the pipeline names, never shown to a guest), admits requests
//! through each provider's, key's and model's limits ([`limits`]), and sorts failures into what
//! is worth retrying and what is not ([`status`]). Each try may make `llm_calls` calls of at
//! most `llm_request_kib`, a job stops starting calls once its `max_tokens` are used, and
//! every request a try made is recorded in the item's result ([`LlmCall`]).
//!
//! Files: `provider.rs` (one endpoint, its keys and gates), `wire.rs` (request and answer
//! formats), `stream.rs` (streamed answers), `status.rs` (what a failure means), `limits.rs`
//! (the gates).

mod limits;
mod provider;
mod status;
mod stream;
mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use self::provider::Delivery;
pub use self::provider::{LlmUsage, Provider};
use self::wire::finish_reason_name;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::journal::Answered;
use super::{Answer, CallKind, Counted, HostState, Request};
use crate::config::LlmConfig;
use crate::events::Token;
use crate::model::LlmCall;
use crate::runtime::bindings::llm::{ChatRequest, ChatResponse, FinishReason, Host, LlmError};

/// The pipeline's providers, and the route (providers in failover order) of each stage.
pub struct LlmProviders {
    providers: BTreeMap<String, Arc<Provider>>,
    routes: BTreeMap<String, Vec<Arc<Provider>>>,
    default_route: Vec<Arc<Provider>>,
}

impl LlmProviders {
    /// `stages` are (name, providers) pairs; a stage not listed takes the default route.
    pub fn new<'a>(
        config: &LlmConfig,
        stages: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) -> Result<Self> {
        let providers: BTreeMap<String, Arc<Provider>> = config
            .providers
            .iter()
            .map(|(name, p)| {
                let provider =
                    Provider::new(name, p).with_context(|| format!("provider `{name}`"))?;
                Ok((name.clone(), Arc::new(provider)))
            })
            .collect::<Result<_>>()?;
        let route = |names: &[String]| -> Vec<Arc<Provider>> {
            names
                .iter()
                .filter_map(|name| providers.get(name).cloned())
                .collect()
        };
        let routes = stages
            .into_iter()
            .map(|(stage, names)| (stage.to_string(), route(names)))
            .collect();
        let default_route = route(&config.route);
        Ok(Self {
            providers,
            routes,
            default_route,
        })
    }

    pub fn providers(&self) -> impl Iterator<Item = &Provider> {
        self.providers.values().map(Arc::as_ref)
    }

    fn route(&self, stage: &str) -> &[Arc<Provider>] {
        self.routes.get(stage).unwrap_or(&self.default_route)
    }

    /// How long `stage` should wait before its next try because its providers asked for a
    /// pause: none while any provider of its route is free.
    pub fn paused_for(&self, stage: &str) -> Option<Duration> {
        limits::all_paused(self.route(stage).iter().map(|p| p.paused_for()))
    }

    /// Send `request` from an item of `job` at `stage` to the first provider of the stage's
    /// route, and on to the next one on a 429, a 5xx or a failed connection. Each request sent
    /// is pushed to `calls`. A streamed answer fails over only before its first piece, so a
    /// follower never sees two answers.
    async fn chat(
        &self,
        job: &str,
        stage: &str,
        request: ChatRequest,
        mut on_text: Option<&mut (dyn FnMut(&str) + Send)>,
        calls: &mut Vec<LlmCall>,
    ) -> Result<ChatResponse, LlmError> {
        let route = self.route(stage);
        let mut last = None;
        for (position, provider) in route.iter().enumerate() {
            let mut pieces = 0usize;
            let (result, call) = match on_text.as_deref_mut() {
                None => {
                    provider
                        .complete(job, request.clone(), Delivery::Whole)
                        .await
                }
                Some(on_text) => {
                    let mut counting = |text: &str| {
                        pieces += 1;
                        on_text(text);
                    };
                    provider
                        .complete(job, request.clone(), Delivery::Streamed(&mut counting))
                        .await
                }
            };
            calls.push(call);
            let next = route.get(position + 1);
            match (result, next) {
                (
                    Err(error @ (LlmError::RateLimited(_) | LlmError::Unavailable(_))),
                    Some(next),
                ) if pieces == 0 => {
                    tracing::warn!(
                        stage,
                        from = %provider.name,
                        to = %next.name,
                        error = ?error,
                        "LLM call fails over to the next provider"
                    );
                    crate::metrics::llm_failover(&provider.name);
                    last = Some(error);
                }
                (result, _) => return result,
            }
        }
        Err(last.unwrap_or_else(|| LlmError::Unavailable("the stage has no LLM provider".into())))
    }
}

/// A request as its item's result records it.
fn record(provider: &str, model: String, result: &Result<ChatResponse, LlmError>) -> LlmCall {
    let mut call = LlmCall {
        provider: provider.to_string(),
        model,
        outcome: outcome(result).to_string(),
        finish_reason: None,
        prompt_tokens: 0,
        completion_tokens: 0,
        usage_estimated: false,
    };
    if let Ok(response) = result {
        call.finish_reason = Some(finish_reason_name(&response.finish_reason).to_string());
        call.prompt_tokens = response.usage.prompt_tokens;
        call.completion_tokens = response.usage.completion_tokens;
        call.usage_estimated = response.usage.estimated;
    }
    call
}

/// A request's outcome as metrics and results name it.
fn outcome(result: &Result<ChatResponse, LlmError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(LlmError::RateLimited(_)) => "rate_limited",
        Err(LlmError::Unavailable(_)) => "unavailable",
        Err(LlmError::Rejected(_)) => "rejected",
        Err(LlmError::BadResponse(_)) => "bad_response",
    }
}

impl HostState {
    /// Before an LLM call: count it against the try's budget, size its request, and check the
    /// job's token budget. Past any of them the try fails (kind `budget`).
    async fn admit_llm_call(&mut self, request: &ChatRequest) -> wasmtime::Result<()> {
        self.spend(Counted::LlmCalls, wire::request_size(request))?;
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

    fn job(&self) -> Option<uuid::Uuid> {
        self.context.job_id.parse().ok()
    }

    /// A chat call: the journal's answer on a replay, else admitted and started on its own
    /// task, which the run waits on or leaves to wait without it ([`HostState::answer_of`]).
    async fn llm_call(
        &mut self,
        request: ChatRequest,
        streamed: bool,
    ) -> wasmtime::Result<Result<ChatResponse, LlmError>> {
        let kind = if streamed {
            CallKind::ChatStream
        } else {
            CallKind::Chat
        };
        let journaled = Request::new(kind, &request);
        let max_tokens = request.max_tokens;
        let answer = match self.replayed(&journaled)? {
            Some(answer) => answer,
            None => {
                self.admit_llm_call(&request).await?;
                let task = self.start_chat(request, streamed);
                self.answer_of(journaled, task).await?
            }
        };
        let Answer::Llm(result) = answer else {
            return Err(wasmtime::Error::msg(
                "the journal holds another kind of answer",
            ));
        };
        self.cut_answer = cut_short(max_tokens, &result);
        Ok(result)
    }

    /// The call, on a task of its own: it goes on while the run waits without its instance.
    /// Streamed pieces go to the job's followers as they arrive; the answer's tokens are
    /// counted against the job when it is complete.
    fn start_chat(&self, request: ChatRequest, streamed: bool) -> AbortOnDropHandle<Answered> {
        let caps = self.caps.clone();
        let job = self.context.job_id.clone();
        let job_id = self.job();
        let (index, stage): (u64, Arc<str>) =
            (self.context.item_index, self.context.stage.as_str().into());
        let call = async move {
            let tokens = &caps.tokens;
            let mut publish = |text: &str| {
                if let Some(job_id) = job_id {
                    tokens.publish(
                        job_id,
                        Token {
                            index,
                            stage: stage.clone(),
                            text: text.to_string(),
                        },
                    );
                }
            };
            let on_text: Option<&mut (dyn FnMut(&str) + Send)> =
                if streamed { Some(&mut publish) } else { None };
            let mut llm_calls = Vec::new();
            let result = (caps.llm)
                .chat(&job, &stage, request, on_text, &mut llm_calls)
                .await;
            if let (Ok(response), Some(job_id)) = (&result, job_id) {
                let used = u64::from(response.usage.prompt_tokens)
                    + u64::from(response.usage.completion_tokens);
                if let Err(error) = caps.items.add_llm_tokens(job_id, used).await {
                    tracing::error!(job = %job_id, error = %format!("{error:#}"), "cannot count a job's LLM tokens");
                }
            }
            Answered {
                answer: Answer::Llm(result),
                llm_calls,
            }
        };
        AbortOnDropHandle::new(tokio::spawn(call.in_current_span()))
    }
}

/// Why an answer is incomplete, when it was cut at `max_tokens`: a try that fails after such
/// an answer is not retried unchanged.
fn cut_short(
    request_max_tokens: Option<u32>,
    result: &Result<ChatResponse, LlmError>,
) -> Option<String> {
    let Ok(response) = result else {
        return None;
    };
    matches!(response.finish_reason, FinishReason::Length).then(|| {
        let limit = match request_max_tokens {
            Some(max) => format!("the request's max_tokens: {max}"),
            None => "no max_tokens: the model's own limit".to_string(),
        };
        format!(
            "the LLM's answer was cut short (finish_reason `length`, {limit}), and the same \
             request would be cut again: not retried"
        )
    })
}

impl Host for HostState {
    async fn chat(
        &mut self,
        request: ChatRequest,
    ) -> wasmtime::Result<Result<ChatResponse, LlmError>> {
        self.llm_call(request, false).await
    }

    async fn chat_stream(
        &mut self,
        request: ChatRequest,
    ) -> wasmtime::Result<Result<ChatResponse, LlmError>> {
        self.llm_call(request, true).await
    }
}
