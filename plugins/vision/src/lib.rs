//! Vision: ask the LLM to classify the item's photo into a `{major, middle, minor}` category.

use serde::{Deserialize, Serialize};
use stagehand_sdk::llm::{ChatRequest, ContentPart, Message, Role};
use stagehand_sdk::{
    Context, Envelope, StageError, chat_json, fatal, output, progress, retryable, stage::Guest,
    text_message,
};

const SYSTEM_PROMPT: &str = "You classify photos of household waste for disposal. \
Answer with a JSON object {\"major\": ..., \"middle\": ..., \"minor\": ...} of lowercase snake_case ids, \
for example {\"major\": \"recyclable\", \"middle\": \"plastic\", \"minor\": \"pet_bottle\"}. \
major is one of recyclable, food_waste, general_waste, hazardous.";

#[derive(Deserialize)]
struct Item {
    image_url: Option<String>,
    image_base64: Option<String>,
    image_mime: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Category {
    major: String,
    middle: String,
    minor: String,
}

impl Category {
    /// A model can answer anything; only well-formed ids go on to the rule lookup.
    fn validate(self) -> Result<Self, StageError> {
        for (field, value) in [
            ("major", &self.major),
            ("middle", &self.middle),
            ("minor", &self.minor),
        ] {
            let well_formed = !value.is_empty()
                && value.len() <= 64
                && value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !well_formed {
                return Err(retryable(format!(
                    "model gave an invalid {field} category id {value:?}"
                )));
            }
        }
        Ok(self)
    }
}

struct Vision;

impl Guest for Vision {
    fn run(_ctx: Context, input: String) -> Result<String, StageError> {
        let item = Envelope::<Item>::parse(&input)?.item;
        let image = match (item.image_url, item.image_base64) {
            (Some(url), _) => url,
            (None, Some(data)) => {
                format!(
                    "data:{};base64,{data}",
                    item.image_mime.as_deref().unwrap_or("image/jpeg")
                )
            }
            (None, None) => {
                return Err(fatal("the item has neither `image_url` nor `image_base64`"));
            }
        };
        progress::report(0.1, "classifying the photo");
        let request = ChatRequest {
            model: None,
            messages: vec![
                text_message(Role::System, SYSTEM_PROMPT),
                Message {
                    role: Role::User,
                    content: vec![
                        ContentPart::Text("Classify this item.".into()),
                        ContentPart::ImageUrl(image),
                    ],
                },
            ],
            max_tokens: Some(100),
            temperature: Some(0.0),
            json_mode: true,
        };
        let (category, _) = chat_json::<Category>(&request)?;
        output(&serde_json::json!({ "category": category.validate()? }))
    }
}

stagehand_sdk::export_stage!(Vision);
