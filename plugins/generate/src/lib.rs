//! Generate: the model answers the case's prompt (seed 000's workflow tester).

use serde::Deserialize;
use stagehand_sdk::llm::{ChatRequest, Role};
use stagehand_sdk::{Context, Envelope, StageError, fatal, output, stage::Guest, text_message};

#[derive(Deserialize)]
struct Case {
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    model: Option<String>,
    /// Stream the answer (`llm.chat-stream`): followers of the job see it being written.
    #[serde(default)]
    stream: bool,
    /// The answer's length limit, in tokens (default 256).
    #[serde(default)]
    max_tokens: Option<u32>,
}

struct Generate;

impl Guest for Generate {
    fn run(_ctx: Context, input: String) -> Result<String, StageError> {
        let case = Envelope::<Case>::parse(&input)?.item;
        if case.prompt.trim().is_empty() {
            return Err(fatal("the case's `prompt` is empty"));
        }
        let system = case
            .system
            .unwrap_or_else(|| "Answer as briefly as possible.".to_string());
        let request = ChatRequest {
            model: case.model,
            messages: vec![
                text_message(Role::System, system),
                text_message(Role::User, case.prompt),
            ],
            max_tokens: Some(case.max_tokens.unwrap_or(256)),
            temperature: Some(0.0),
            json_mode: false,
        };
        let response = if case.stream {
            stagehand_sdk::llm::chat_stream(&request)?
        } else {
            stagehand_sdk::llm::chat(&request)?
        };
        let mut answer = serde_json::json!({ "answer": response.text.trim() });
        stagehand_sdk::add_usage(&mut answer, &response);
        output(&answer)
    }
}

stagehand_sdk::export_stage!(Generate);
