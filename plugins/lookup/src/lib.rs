//! The fact-check example's stage: looks the item's question up in a facts service (outbound
//! HTTP to a host its pipeline file grants, with the service's API key held by the host as a
//! secret) and has the LLM answer from the facts it found. Where to look, the prompt and the
//! model are its settings (`[stage.config]`), so one component serves other services and
//! prompts.

use serde::Deserialize;
use serde_json::{Value, json};
use stagehand_sdk::http::Request;
use stagehand_sdk::{
    Context, Envelope, StageError, config, fatal, llm, output, stage::Guest, text_message,
};

#[derive(Deserialize)]
struct Item {
    question: String,
}

#[derive(Deserialize)]
struct Found {
    facts: Vec<Fact>,
}

#[derive(Deserialize)]
struct Fact {
    topic: String,
    fact: String,
}

/// A setting of the stage, or a fatal error naming it.
fn setting(name: &str) -> Result<String, StageError> {
    config::get(name).map_err(|_| fatal(format!("the stage needs the setting `{name}`")))
}

/// `text` with each character a URL query may not hold percent-encoded.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Lookup;

impl Guest for Lookup {
    fn run(_ctx: Context, input: String) -> Result<String, StageError> {
        let item = Envelope::<Item>::parse(&input)?.item;
        let url = format!(
            "{}?q={}",
            setting("facts_url")?,
            query_escape(&item.question)
        );
        let reply = Request::get(&url)
            .header("authorization", "Bearer {{secret:FACTS_KEY}}")
            .send()?;
        if reply.status != 200 {
            return Err(StageError::Retryable(format!(
                "the facts service answered {}: {}",
                reply.status,
                reply.text()
            )));
        }
        let found: Found = reply.json()?;
        let facts: Vec<String> = found
            .facts
            .iter()
            .map(|f| format!("- {}: {}", f.topic, f.fact))
            .collect();
        let prompt = setting("prompt")?
            .replace("{question}", &item.question)
            .replace("{facts}", &facts.join("\n"));
        let answer = llm::chat(&llm::ChatRequest {
            model: config::get("model").ok(),
            messages: vec![text_message(llm::Role::User, &prompt)],
            max_tokens: Some(200),
            temperature: Some(0.0),
            json_mode: false,
        })?;
        output(&json!({
            "question": item.question,
            "facts": found.facts.iter().map(|f| json!({"topic": f.topic, "fact": f.fact})).collect::<Vec<Value>>(),
            "answer": answer.text,
            "model": answer.model,
        }))
    }
}

stagehand_sdk::export_stage!(Lookup);
