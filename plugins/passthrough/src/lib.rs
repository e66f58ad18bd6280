//! Passes the item through unchanged: the host's own overhead, measured by `stagehand bench`.

use serde_json::value::RawValue;
use stagehand_sdk::{Context, Envelope, StageError, stage::Guest};

struct Passthrough;

impl Guest for Passthrough {
    fn run(_ctx: Context, input: String) -> Result<String, StageError> {
        let envelope: Envelope<Box<RawValue>> = Envelope::parse(&input)?;
        Ok(envelope.item.get().to_string())
    }
}

stagehand_sdk::export_stage!(Passthrough);
