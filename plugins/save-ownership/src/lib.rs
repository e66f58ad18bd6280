//! Handler `save-ownership`: record that a user owns a character, under its ownership id.

use serde::Deserialize;
use serde_json::json;
use stagehand_sdk::handler::Guest;
use stagehand_sdk::{Context, HandlerError, records};

#[derive(Deserialize)]
struct Ownership {
    ownership_id: String,
    user_id: String,
    character_id: String,
}

struct SaveOwnership;

impl Guest for SaveOwnership {
    fn handle(ctx: Context, _key: Option<String>, payload: String) -> Result<String, HandlerError> {
        let o: Ownership = serde_json::from_str(&payload)
            .map_err(|e| HandlerError::Fatal(format!("invalid ownership: {e}")))?;
        let record = json!({ "user_id": o.user_id, "character_id": o.character_id, "job_id": ctx.job_id, "item_index": ctx.item_index });
        records::put("ownership", &o.ownership_id, &record.to_string())
            .map_err(HandlerError::Retryable)?;
        Ok(json!({ "saved": o.ownership_id }).to_string())
    }
}

stagehand_sdk::export_handler!(SaveOwnership);
