//! Handler `save-character`: add a character to the user's collection ("my page" in seed 002).

use serde::Deserialize;
use serde_json::json;
use stagehand_sdk::handler::Guest;
use stagehand_sdk::{Context, HandlerError, records};

#[derive(Deserialize)]
struct UserCharacter {
    user_id: String,
    character_id: String,
    character_name: String,
}

struct SaveCharacter;

impl Guest for SaveCharacter {
    fn handle(
        _ctx: Context,
        _key: Option<String>,
        payload: String,
    ) -> Result<String, HandlerError> {
        let c: UserCharacter = serde_json::from_str(&payload)
            .map_err(|e| HandlerError::Fatal(format!("invalid user character: {e}")))?;
        let key = format!("{}:{}", c.user_id, c.character_id);
        records::put(
            "user_characters",
            &key,
            &json!({ "name": c.character_name }).to_string(),
        )
        .map_err(HandlerError::Retryable)?;
        Ok(json!({ "saved": key }).to_string())
    }
}

stagehand_sdk::export_handler!(SaveCharacter);
