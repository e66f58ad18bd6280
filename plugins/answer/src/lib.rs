//! Answer: ask the LLM for the disposal steps and a short answer to the user, from the
//! category and its disposal rule.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stagehand_sdk::llm::{ChatRequest, Role};
use stagehand_sdk::{
    Context, Envelope, StageError, chat_json_streamed, output, progress, retryable, stage::Guest,
    text_message,
};

const SYSTEM_PROMPT: &str = "You help people dispose of household waste correctly. \
Given a waste category and the local disposal rule, answer with a JSON object \
{\"steps\": [short imperative steps], \"answer\": \"one or two friendly sentences for the user\"}.";

#[derive(Deserialize)]
struct Rule {
    rule_key: String,
    rule: Value,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    steps: Vec<String>,
    answer: String,
}

struct AnswerStage;

impl Guest for AnswerStage {
    fn run(_ctx: Context, input: String) -> Result<String, StageError> {
        let rule: Rule = Envelope::<Value>::parse(&input)?.stage("rule")?;
        progress::report(0.1, "writing the answer");
        let prompt = format!("Category: {}\nDisposal rule: {}", rule.rule_key, rule.rule);
        let request = ChatRequest {
            model: None,
            messages: vec![
                text_message(Role::System, SYSTEM_PROMPT),
                text_message(Role::User, prompt),
            ],
            max_tokens: Some(400),
            temperature: Some(0.2),
            json_mode: true,
        };
        let (answer, response) = chat_json_streamed::<Answer>(&request)?;
        if answer.steps.is_empty()
            || answer.steps.iter().any(|s| s.trim().is_empty())
            || answer.answer.trim().is_empty()
        {
            return Err(retryable("model gave empty steps or an empty answer"));
        }
        let mut answer = serde_json::json!({ "steps": answer.steps, "answer": answer.answer });
        stagehand_sdk::add_usage(&mut answer, &response);
        output(&answer)
    }
}

stagehand_sdk::export_stage!(AnswerStage);
