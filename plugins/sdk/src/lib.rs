//! Write Stagehand stages and handlers in Rust.
//!
//! The contract is `wit/pipeline.wit`; this crate generates its bindings once and adds the few
//! helpers every stage needs: parsing the input envelope, turning LLM failures into the right
//! [`StageError`], and serialising outputs.
//!
//! ```ignore
//! use stagehand_sdk::{Context, Envelope, StageError, stage::Guest};
//!
//! struct Echo;
//! impl Guest for Echo {
//!     fn run(_ctx: Context, input: String) -> Result<String, StageError> {
//!         let envelope: Envelope = Envelope::parse(&input)?;
//!         stagehand_sdk::output(&envelope.item)
//!     }
//! }
//! stagehand_sdk::export_stage!(Echo);
//! ```

pub mod http;

use std::fmt::Display;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

/// Bindings of the `stage` world; implement [`stage::Guest`] and call [`export_stage!`].
#[allow(clippy::too_many_arguments)] // generated code
pub mod stage {
    wit_bindgen::generate!({
        world: "stage",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_stage",
        default_bindings_module: "stagehand_sdk::stage",
        // `wasi:http` and the `wasi:io`/`wasi:clocks` parts it uses, for [`http`].
        generate_all,
    });
}

/// Bindings of the `handler` world; implement [`handler::Guest`] and call [`export_handler!`].
#[allow(clippy::too_many_arguments)] // generated code
pub mod handler {
    wit_bindgen::generate!({
        world: "handler",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_handler",
        default_bindings_module: "stagehand_sdk::handler",
        with: {
            "stagehand:pipeline/types@0.2.0": crate::stage::stagehand::pipeline::types,
            "stagehand:pipeline/kv@0.2.0": crate::stage::stagehand::pipeline::kv,
            "stagehand:pipeline/log@0.2.0": crate::stage::stagehand::pipeline::log,
            "wasi:http/types@0.2.12": crate::stage::wasi::http::types,
            "wasi:http/outgoing-handler@0.2.12": crate::stage::wasi::http::outgoing_handler,
            "wasi:io/error@0.2.12": crate::stage::wasi::io::error,
            "wasi:io/poll@0.2.12": crate::stage::wasi::io::poll,
            "wasi:io/streams@0.2.12": crate::stage::wasi::io::streams,
            "wasi:clocks/monotonic-clock@0.2.12": crate::stage::wasi::clocks::monotonic_clock,
        },
    });
}

pub use handler::export_handler;
pub use handler::stagehand::pipeline::records;
pub use stage::export_stage;
pub use stage::stagehand::pipeline::{config, dispatch, kv, llm, log, progress, types};
pub use types::{Context, HandlerError, StageError};

/// A fatal error: the item fails, retrying cannot help.
pub fn fatal(message: impl Display) -> StageError {
    StageError::Fatal(message.to_string())
}

/// A retryable error: the host may run the stage again for this item.
pub fn retryable(message: impl Display) -> StageError {
    StageError::Retryable(message.to_string())
}

/// The input every stage receives: the item and the outputs of the stages before it.
#[derive(Debug, Deserialize)]
pub struct Envelope<T = Value> {
    pub item: T,
    #[serde(default)]
    pub stages: Map<String, Value>,
}

impl<T: DeserializeOwned> Envelope<T> {
    /// Parse the input; a malformed item is a fatal error naming what is wrong.
    pub fn parse(input: &str) -> Result<Self, StageError> {
        serde_json::from_str(input).map_err(|e| fatal(format!("invalid input: {e}")))
    }

    /// The output of an earlier stage, deserialised; missing or malformed is fatal, since the
    /// pipeline is wired wrongly.
    pub fn stage<S: DeserializeOwned>(&self, name: &str) -> Result<S, StageError> {
        let value = self
            .stages
            .get(name)
            .ok_or_else(|| fatal(format!("no output of stage `{name}` in the input")))?;
        S::deserialize(value).map_err(|e| fatal(format!("output of stage `{name}`: {e}")))
    }
}

/// Serialise a stage's output.
pub fn output<T: Serialize + ?Sized>(value: &T) -> Result<String, StageError> {
    serde_json::to_string(value).map_err(|e| fatal(format!("cannot serialise output: {e}")))
}

impl From<llm::LlmError> for StageError {
    fn from(error: llm::LlmError) -> Self {
        use llm::LlmError::*;
        match error {
            RateLimited(Some(ms)) => retryable(format!("LLM rate limited; retry after {ms} ms")),
            RateLimited(None) => retryable("LLM rate limited"),
            Unavailable(m) => retryable(format!("LLM unavailable: {m}")),
            BadResponse(m) => retryable(format!("LLM answered badly: {m}")),
            Rejected(m) => fatal(format!("LLM rejected the request: {m}")),
        }
    }
}

impl From<dispatch::DispatchError> for StageError {
    fn from(error: dispatch::DispatchError) -> Self {
        use dispatch::DispatchError::*;
        match error {
            NoSuchHandler(h) => fatal(format!("no handler `{h}` in the pipeline")),
            HandlerFailed(HandlerError::Retryable(m)) => retryable(format!("handler failed: {m}")),
            HandlerFailed(HandlerError::Fatal(m)) => fatal(format!("handler failed: {m}")),
            Host(m) => retryable(format!("dispatch failed: {m}")),
        }
    }
}

impl From<kv::KvError> for StageError {
    fn from(error: kv::KvError) -> Self {
        match error {
            kv::KvError::NoSuchNamespace(ns) => {
                fatal(format!("no kv namespace `{ns}` in the pipeline"))
            }
        }
    }
}

/// A text message.
pub fn text_message(role: llm::Role, text: impl Into<String>) -> llm::Message {
    llm::Message {
        role,
        content: vec![llm::ContentPart::Text(text.into())],
    }
}

/// Ask the model for a JSON object and deserialise it. An answer that is not the JSON asked for
/// is retryable: models are sometimes wrong once and right the next time. One cut at
/// `max_tokens` is not: the host fails such a try with kind `length`, without retrying it.
pub fn chat_json<T: DeserializeOwned>(
    request: &llm::ChatRequest,
) -> Result<(T, llm::ChatResponse), StageError> {
    parse_json_answer(llm::chat(request)?)
}

/// [`chat_json`] with the answer streamed: clients following the job see it being written
/// (`item.token` events) while this waits for the whole of it.
pub fn chat_json_streamed<T: DeserializeOwned>(
    request: &llm::ChatRequest,
) -> Result<(T, llm::ChatResponse), StageError> {
    parse_json_answer(llm::chat_stream(request)?)
}

fn parse_json_answer<T: DeserializeOwned>(
    response: llm::ChatResponse,
) -> Result<(T, llm::ChatResponse), StageError> {
    let parsed = serde_json::from_str(strip_code_fence(&response.text)).map_err(|e| {
        let cut = match response.finish_reason {
            llm::FinishReason::Length => ", cut short at max_tokens",
            _ => "",
        };
        retryable(format!(
            "model answer is not the JSON asked for ({e}{cut}): {}",
            preview(&response.text)
        ))
    })?;
    Ok((parsed, response))
}

/// Add what an answer cost to a stage's output object: `model`, `provider` (the one that
/// answered), `tokens`, and `tokens_estimated: true` when the provider reported no usage and
/// the tokens are the host's estimate.
pub fn add_usage(output: &mut Value, response: &llm::ChatResponse) {
    let usage = &response.usage;
    output["model"] = response.model.clone().into();
    output["provider"] = response.provider.clone().into();
    output["tokens"] = (usage.prompt_tokens + usage.completion_tokens).into();
    if usage.estimated {
        output["tokens_estimated"] = true.into();
    }
}

/// Models like to wrap JSON in ```json fences even in JSON mode.
fn strip_code_fence(text: &str) -> &str {
    let t = text.trim();
    t.strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .map(str::trim)
        .unwrap_or(t)
}

/// The first 200 characters, for error messages.
pub fn preview(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// Log through the host, tagged with the job, item and stage.
pub fn log(level: log::Level, message: impl AsRef<str>) {
    log::write(level, message.as_ref());
}
