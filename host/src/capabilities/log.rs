//! `log`: guest messages into the host's tracing, tagged with where they came from, within the
//! try's log budget (`log_lines`, `log_kib`); once per try, not again when the try is replayed.

use super::HostState;
use crate::runtime::bindings::log::{Host, Level};

/// Longest guest log message kept; a guest must not flood the host's log.
const MAX_MESSAGE: usize = 4096;

impl Host for HostState {
    async fn write(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        // A replay says again what its first run said: it was logged then.
        if self.journal.replaying() {
            return Ok(());
        }
        let message = crate::text::truncate(&message, MAX_MESSAGE);
        if !self.log_allowed(message.len()) {
            return Ok(());
        }
        let c = &self.context;
        macro_rules! emit {
            ($level:ident) => {
                tracing::$level!(target: "stagehand::guest", job = %c.job_id, item = c.item_index, stage = %c.stage, "{message}")
            };
        }
        match level {
            Level::Trace => emit!(trace),
            Level::Debug => emit!(debug),
            Level::Info => emit!(info),
            Level::Warn => emit!(warn),
            Level::Error => emit!(error),
        }
        Ok(())
    }
}
