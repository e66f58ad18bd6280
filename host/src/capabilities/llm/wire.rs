//! The chat completions wire format, written the way every OpenAI-compatible server takes it
//! and read the way they answer.
//!
//! Requests carry only the fields they need: text-only content as a string (llama.cpp's server
//! refuses or drops an array there), parts only when there is an image, numbers as the guest
//! wrote them. Answers may lack `usage` (servers that ignore `stream_options`, some gateways):
//! the usage is then estimated from the text and marked as such, never taken as 0.

use serde::Deserialize;
use serde_json::{Value, json};

use super::status::quoted;
use crate::runtime::bindings::llm::{
    ChatRequest, ChatResponse, ContentPart, FinishReason, LlmError, Role, Usage,
};

/// Completion tokens counted for a request that does not set `max_tokens`, until the provider
/// reports what it used.
const ASSUMED_COMPLETION_TOKENS: u32 = 256;

/// Tokens counted for an image part before the provider says (OpenAI's price of a
/// high-detail 512×512 image).
const ASSUMED_IMAGE_TOKENS: usize = 765;

/// The request body for `model` (the provider's name for it).
pub(super) fn body(request: ChatRequest, model: &str) -> Value {
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
    let mut body = json!({ "model": model, "messages": messages });
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

/// A message's content: a string when it is text only, an array of parts only when it carries
/// an image.
fn content(parts: Vec<ContentPart>) -> Value {
    if !parts.iter().any(|p| matches!(p, ContentPart::ImageUrl(_))) {
        let texts: Vec<String> = parts
            .into_iter()
            .map(|part| match part {
                ContentPart::Text(text) | ContentPart::ImageUrl(text) => text,
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

/// A prompt's tokens before the provider says: about 4 bytes of text a token, a flat price
/// per image.
pub(super) fn estimated_prompt_tokens(request: &ChatRequest) -> u32 {
    let prompt: usize = request
        .messages
        .iter()
        .flat_map(|m| &m.content)
        .map(|part| match part {
            ContentPart::Text(text) => text.len() / 4 + 1,
            ContentPart::ImageUrl(_) => ASSUMED_IMAGE_TOKENS,
        })
        .sum();
    u32::try_from(prompt).unwrap_or(u32::MAX)
}

/// What a request may cost, for the token buckets: the prompt's estimate plus the
/// completion's cap.
pub(super) fn estimated_tokens(request: &ChatRequest) -> u32 {
    estimated_prompt_tokens(request)
        .saturating_add(request.max_tokens.unwrap_or(ASSUMED_COMPLETION_TOKENS))
}

#[derive(Deserialize)]
pub(super) struct CompletionUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

/// The usage the provider reported, or one estimated from the prompt and the answer's text.
pub(super) fn usage(reported: Option<CompletionUsage>, prompt_estimate: u32, text: &str) -> Usage {
    match reported {
        Some(reported) => Usage {
            prompt_tokens: reported.prompt_tokens,
            completion_tokens: reported.completion_tokens,
            estimated: false,
        },
        None => Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: u32::try_from(text.len().div_ceil(4)).unwrap_or(u32::MAX),
            estimated: true,
        },
    }
}

/// OpenAI's `finish_reason`; none at all is `other("")`.
pub(super) fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("stop") | Some("eos") | Some("end_turn") => FinishReason::Stop,
        Some("length") | Some("max_tokens") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        other => FinishReason::Other(other.unwrap_or_default().to_string()),
    }
}

/// A finish reason as results and metrics write it.
pub(super) fn finish_reason_name(reason: &FinishReason) -> &str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Other(other) => other,
    }
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
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

/// A (not streamed) chat completion; `provider` is filled in by the caller.
pub(super) fn parse_completion(body: &str, prompt_estimate: u32) -> Result<ChatResponse, LlmError> {
    let completion: Completion = serde_json::from_str(body)
        .map_err(|e| LlmError::BadResponse(format!("{e}: {}", quoted(body))))?;
    let choice = completion.choices.into_iter().next();
    let finish = finish_reason(choice.as_ref().and_then(|c| c.finish_reason.as_deref()));
    let text = choice
        .and_then(|c| c.message.content)
        .ok_or_else(|| LlmError::BadResponse("no message content in the first choice".into()))?;
    Ok(ChatResponse {
        usage: usage(completion.usage, prompt_estimate, &text),
        text,
        model: completion.model,
        finish_reason: finish,
        provider: String::new(),
    })
}

/// Bytes of a request a guest controls: the model name, texts and image URLs.
pub(super) fn request_size(request: &ChatRequest) -> usize {
    let parts: usize = request
        .messages
        .iter()
        .flat_map(|m| &m.content)
        .map(|part| match part {
            ContentPart::Text(text) | ContentPart::ImageUrl(text) => text.len(),
        })
        .sum();
    parts + request.model.as_ref().map_or(0, String::len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::bindings::llm::Message;

    #[test]
    fn requests_are_written_as_compatible_servers_take_them() {
        let text = |t: &str| ContentPart::Text(t.into());
        let message = |role, content| Message { role, content };
        let body = body(
            ChatRequest {
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
            },
            "m",
        );
        assert_eq!(body["model"], "m");
        assert_eq!(body["messages"][0]["content"], "be brief");
        assert_eq!(body["messages"][1]["content"][1]["type"], "image_url");
        assert_eq!(body["messages"][2]["content"], "a\nb");
        assert_eq!(body["temperature"].to_string(), "0.2");
        assert!(body.get("response_format").is_none());
        assert!(body.get("stream").is_none());
    }

    #[test]
    fn completion_without_content_is_a_bad_response() {
        let body = r#"{"model":"m","choices":[{"message":{"role":"assistant"}}]}"#;
        assert!(matches!(
            parse_completion(body, 1),
            Err(LlmError::BadResponse(_))
        ));
    }

    #[test]
    fn usage_and_finish_reason_are_read_or_estimated() {
        let ok = r#"{"model":"m","choices":[{"message":{"content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let response = parse_completion(ok, 99).unwrap();
        assert_eq!(
            (response.text.as_str(), response.usage.prompt_tokens),
            ("hi", 3)
        );
        assert!(!response.usage.estimated);
        assert!(matches!(response.finish_reason, FinishReason::Length));

        let silent = r#"{"model":"m","choices":[{"message":{"content":"twelve bytes"}}]}"#;
        let response = parse_completion(silent, 40).unwrap();
        assert!(response.usage.estimated);
        assert_eq!(
            (
                response.usage.prompt_tokens,
                response.usage.completion_tokens
            ),
            (40, 3)
        );
        assert!(matches!(&response.finish_reason, FinishReason::Other(r) if r.is_empty()));
    }
}
