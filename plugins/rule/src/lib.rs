//! Rule: look the vision stage's category up in the `disposal_rules` kv namespace.

use serde::Deserialize;
use serde_json::Value;
use stagehand_sdk::{Context, Envelope, StageError, fatal, kv, output, stage::Guest};

#[derive(Deserialize)]
struct Vision {
    category: Category,
}

#[derive(Deserialize)]
struct Category {
    major: String,
    middle: String,
    minor: String,
}

struct Rule;

impl Guest for Rule {
    fn run(_ctx: Context, input: String) -> Result<String, StageError> {
        let Category {
            major,
            middle,
            minor,
        } = Envelope::<Value>::parse(&input)?
            .stage::<Vision>("vision")?
            .category;
        let key = format!("{major}/{middle}/{minor}");
        let rule = kv::get("disposal_rules", &key)?
            .ok_or_else(|| fatal(format!("unknown category `{key}`: no disposal rule for it")))?;
        let rule: Value = serde_json::from_str(&rule)
            .map_err(|e| fatal(format!("disposal rule `{key}` is not JSON: {e}")))?;
        output(&serde_json::json!({ "rule_key": key, "rule": rule }))
    }
}

stagehand_sdk::export_stage!(Rule);
