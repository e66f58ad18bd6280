//! Grade: compare the generated answer with the case's expected answer: `exact`
//! (case-insensitive, trimmed), `contains`, `regex`, or `judge` (the LLM decides). A wrong
//! answer is a graded result (`passed: false`), not a failed item.

use serde::Deserialize;
use stagehand_sdk::llm::{ChatRequest, Role};
use stagehand_sdk::{
    Context, Envelope, StageError, chat_json, fatal, output, stage::Guest, text_message,
};

#[derive(Deserialize)]
struct Case {
    expected: String,
    #[serde(default = "default_mode", rename = "match")]
    mode: String,
    #[serde(default)]
    prompt: String,
}

fn default_mode() -> String {
    "exact".into()
}

#[derive(Deserialize)]
struct Generated {
    answer: String,
}

#[derive(Deserialize)]
struct Verdict {
    correct: bool,
    #[serde(default)]
    reason: String,
}

const JUDGE_PROMPT: &str =
    "You grade answers. Reply with a JSON object {\"correct\": true|false, \"reason\": \"...\"}.";

struct Grade;

impl Guest for Grade {
    fn run(_ctx: Context, input: String) -> Result<String, StageError> {
        let envelope = Envelope::<Case>::parse(&input)?;
        let answer = envelope.stage::<Generated>("generate")?.answer;
        let case = envelope.item;
        let normalise = |s: &str| s.trim().trim_end_matches('.').to_lowercase();
        let (passed, reason) = match case.mode.as_str() {
            "exact" => (
                normalise(&answer) == normalise(&case.expected),
                String::new(),
            ),
            "contains" => (
                normalise(&answer).contains(&normalise(&case.expected)),
                String::new(),
            ),
            "regex" => {
                let pattern = regex::Regex::new(&case.expected)
                    .map_err(|e| fatal(format!("invalid `expected` regex: {e}")))?;
                (pattern.is_match(&answer), String::new())
            }
            "judge" => {
                let question = format!(
                    "Question: {}\nExpected answer: {}\nGiven answer: {}",
                    case.prompt, case.expected, answer
                );
                let request = ChatRequest {
                    model: None,
                    messages: vec![
                        text_message(Role::System, JUDGE_PROMPT),
                        text_message(Role::User, question),
                    ],
                    max_tokens: Some(200),
                    temperature: Some(0.0),
                    json_mode: true,
                };
                let (verdict, _) = chat_json::<Verdict>(&request)?;
                (verdict.correct, verdict.reason)
            }
            other => {
                return Err(fatal(format!(
                    "unknown match mode {other:?}: use exact, contains, regex or judge"
                )));
            }
        };
        output(
            &serde_json::json!({ "passed": passed, "mode": case.mode, "expected": case.expected, "answer": answer, "reason": reason }),
        )
    }
}

stagehand_sdk::export_stage!(Grade);
