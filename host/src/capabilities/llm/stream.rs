//! Streamed completions (`stream: true`): the provider sends Server-Sent Events of text deltas;
//! each delta goes to a callback as it arrives (the job's `item.token` followers) and the whole
//! text is returned, as `chat` would. Servers that ignore `stream_options.include_usage` send
//! no usage: it is then estimated ([`wire::usage`]).

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::provider::Provider;
use super::status::{describe, quoted};
use super::wire::{self, CompletionUsage};
use crate::runtime::bindings::llm::{ChatResponse, LlmError};

/// A streamed answer longer than this is refused rather than held in memory.
const MAX_STREAMED_TEXT: usize = 4 << 20;

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<CompletionUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Delta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

impl Provider {
    pub(super) async fn send_streamed(
        &self,
        mut body: Value,
        key: Option<&str>,
        prompt_estimate: u32,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<ChatResponse, LlmError> {
        body["stream"] = json!(true);
        // Ask for the usage in a last chunk, so the token buckets can be settled.
        body["stream_options"] = json!({ "include_usage": true });
        let response = self.post(&body, key).await?;
        let mut events = response.bytes_stream().eventsource();
        let (mut text, mut model, mut usage) = (String::new(), String::new(), None);
        let mut finish = None;
        let mut done = false;
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| match e {
                eventsource_stream::EventStreamError::Transport(e) => {
                    LlmError::Unavailable(format!("stream broke: {}", describe(&e)))
                }
                other => LlmError::BadResponse(format!("not an event stream: {other}")),
            })?;
            if event.data.trim() == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Chunk = serde_json::from_str(&event.data)
                .map_err(|e| LlmError::BadResponse(format!("{e}: {}", quoted(&event.data))))?;
            if model.is_empty() {
                model = chunk.model;
            }
            if chunk.usage.is_some() {
                usage = chunk.usage;
            }
            for choice in chunk.choices {
                if choice.finish_reason.is_some() {
                    finish = choice.finish_reason;
                }
                let Some(piece) = choice.delta.content else {
                    continue;
                };
                if text.len() + piece.len() > MAX_STREAMED_TEXT {
                    return Err(LlmError::BadResponse(format!(
                        "the streamed answer passed {} MiB",
                        MAX_STREAMED_TEXT >> 20
                    )));
                }
                on_text(&piece);
                text.push_str(&piece);
            }
        }
        if !done {
            return Err(LlmError::Unavailable(
                "the stream ended before `[DONE]`".into(),
            ));
        }
        Ok(ChatResponse {
            usage: wire::usage(usage, prompt_estimate, &text),
            text,
            model,
            finish_reason: wire::finish_reason(finish.as_deref()),
            provider: String::new(),
        })
    }
}
