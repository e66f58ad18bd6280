//! Reward: find the character that fits the category (a synchronous `call`), then record the
//! user's ownership with two idempotent effects (seed 002's dispatcher).
//!
//! The idempotency key is `uuid5(NAMESPACE_DNS, "ownership:{user_id}:{character_id}")`, as in
//! seed 002: a retry, a reprocess or a replay of this item emits the same key, so the host runs
//! each effect once.

use serde::Deserialize;
use serde_json::{Value, json};
use stagehand_sdk::dispatch::{self, EmitOutcome};
use stagehand_sdk::{Context, Envelope, StageError, fatal, output, stage::Guest};
use uuid::Uuid;

#[derive(Deserialize)]
struct Item {
    user_id: String,
}

#[derive(Deserialize)]
struct Vision {
    category: Value,
}

#[derive(Deserialize)]
struct Match {
    character: Option<Character>,
}

#[derive(Deserialize, serde::Serialize)]
struct Character {
    id: String,
    name: String,
}

/// The key seed 002 derives for an ownership; the same user and character always give the same one.
fn ownership_key(user_id: &str, character_id: &str) -> String {
    Uuid::new_v5(
        &Uuid::NAMESPACE_DNS,
        format!("ownership:{user_id}:{character_id}").as_bytes(),
    )
    .to_string()
}

struct Reward;

impl Guest for Reward {
    fn run(_ctx: Context, input: String) -> Result<String, StageError> {
        let envelope = Envelope::<Item>::parse(&input)?;
        let user_id = envelope.item.user_id.trim();
        if user_id.is_empty() {
            return Err(fatal("the item's `user_id` is empty"));
        }
        let vision: Vision = envelope.stage("vision")?;
        let matched = dispatch::call(
            "character-match",
            &json!({ "category": vision.category }).to_string(),
        )?;
        let matched: Match = serde_json::from_str(&matched)
            .map_err(|e| fatal(format!("character-match answered badly: {e}")))?;
        let Some(character) = matched.character else {
            return output(&json!({ "character": null, "effects": [] }));
        };

        let key = ownership_key(user_id, &character.id);
        let ownership =
            json!({ "ownership_id": key, "user_id": user_id, "character_id": character.id });
        let user_character = json!({ "user_id": user_id, "character_id": character.id, "character_name": character.name });
        let mut effects = Vec::new();
        for (handler, payload) in [
            ("save-ownership", ownership),
            ("save-character", user_character),
        ] {
            let outcome = match dispatch::emit(handler, &payload.to_string(), &key)? {
                EmitOutcome::Accepted => "accepted",
                EmitOutcome::Duplicate => "duplicate",
            };
            effects.push(json!({ "handler": handler, "key": key, "outcome": outcome }));
        }
        output(&json!({ "character": character, "ownership_id": key, "effects": effects }))
    }
}

stagehand_sdk::export_stage!(Reward);
