//! Handler `slow-effect`, for the recovery tests: it records that it started, says so in the
//! log (at `warn`, so a test reading the server's stderr sees it), then works on the CPU until
//! its budget stops it. A test kills the server while it works, deterministically.

use stagehand_sdk::handler::Guest;
use stagehand_sdk::{Context, HandlerError, log, records};

struct SlowEffect;

impl Guest for SlowEffect {
    fn handle(_ctx: Context, key: Option<String>, payload: String) -> Result<String, HandlerError> {
        let key = key.unwrap_or_default();
        records::put("slow", &key, &payload).map_err(HandlerError::Retryable)?;
        log::write(log::Level::Warn, &format!("slow effect {key}: working"));
        let mut x: u64 = 1;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

stagehand_sdk::export_handler!(SlowEffect);
