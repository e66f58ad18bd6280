//! Streamed completions (`stream: true`): the provider sends Server-Sent Events of text deltas;
//! each delta goes to a callback as it arrives (the job's `item.token` followers) and the whole
//! text is returned, as `chat` would.

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{CompletionUsage, LlmClient, MAX_QUOTED_BODY, describe, usage_of};
use crate::runtime::bindings::llm::{ChatRequest, ChatResponse, LlmError};

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
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

impl LlmClient {
    /// [`LlmClient::chat`], streamed: `on_text` gets each piece of the answer as it arrives.
    pub async fn chat_stream(
        &self,
        job: &str,
        request: ChatRequest,
        on_text: impl FnMut(&str),
    ) -> Result<ChatResponse, LlmError> {
        self.limited(job, request, |mut body| async move {
            body["stream"] = json!(true);
            // Ask for the usage in a last chunk, so the token buckets can be settled.
            body["stream_options"] = json!({ "include_usage": true });
            self.send_streamed(body, on_text).await
        })
        .await
    }

    async fn send_streamed(
        &self,
        body: Value,
        mut on_text: impl FnMut(&str),
    ) -> Result<ChatResponse, LlmError> {
        let response = self.post(&body).await?;
        let mut events = response.bytes_stream().eventsource();
        let (mut text, mut model, mut usage) = (String::new(), String::new(), None);
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
            let chunk: Chunk = serde_json::from_str(&event.data).map_err(|e| {
                LlmError::BadResponse(format!(
                    "{e}: {}",
                    crate::text::truncate(&event.data, MAX_QUOTED_BODY)
                ))
            })?;
            if model.is_empty() {
                model = chunk.model;
            }
            if chunk.usage.is_some() {
                usage = chunk.usage;
            }
            for piece in chunk.choices.into_iter().filter_map(|c| c.delta.content) {
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
            text,
            model,
            usage: usage_of(usage),
        })
    }
}
