//! Handler `character-match`: the character for a category, from the `characters` kv namespace.
//! The most specific entry wins: `major/middle/minor`, then `major/middle`, then `major`.

use serde::Deserialize;
use serde_json::{Value, json};
use stagehand_sdk::handler::Guest;
use stagehand_sdk::{Context, HandlerError, kv};

#[derive(Deserialize)]
struct Request {
    category: Category,
}

#[derive(Deserialize)]
struct Category {
    major: String,
    middle: String,
    minor: String,
}

struct CharacterMatch;

impl Guest for CharacterMatch {
    fn handle(
        _ctx: Context,
        _key: Option<String>,
        payload: String,
    ) -> Result<String, HandlerError> {
        let Request { category: c } = serde_json::from_str(&payload)
            .map_err(|e| HandlerError::Fatal(format!("invalid request: {e}")))?;
        let candidates = [
            format!("{}/{}/{}", c.major, c.middle, c.minor),
            format!("{}/{}", c.major, c.middle),
            c.major,
        ];
        for key in &candidates {
            let found =
                kv::get("characters", key).map_err(|e| HandlerError::Fatal(format!("{e:?}")))?;
            if let Some(character) = found {
                let character: Value = serde_json::from_str(&character).map_err(|e| {
                    HandlerError::Fatal(format!("character `{key}` is not JSON: {e}"))
                })?;
                return Ok(json!({ "character": character }).to_string());
            }
        }
        Ok(json!({ "character": null }).to_string())
    }
}

stagehand_sdk::export_handler!(CharacterMatch);
