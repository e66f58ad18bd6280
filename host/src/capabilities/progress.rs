//! `progress`: a running stage says how far it has come (once: a replay's reports were made
//! by its first run).

use std::sync::Arc;

use super::HostState;
use crate::runtime::bindings::progress::Host;

/// One report from a guest.
#[derive(Debug, Clone)]
pub struct ProgressUpdate {
    pub item_index: u64,
    pub stage: String,
    pub fraction: f32,
    pub message: String,
}

/// Where reports go (the job's event log, a progress bar); `None` drops them.
pub type ProgressSink = Arc<dyn Fn(ProgressUpdate) + Send + Sync>;

impl Host for HostState {
    async fn report(&mut self, fraction: f32, message: String) -> wasmtime::Result<()> {
        let limit = self.budgets.progress_bytes;
        self.fits("progress_bytes", "a progress message", message.len(), limit)?;
        if self.journal.replaying() {
            return Ok(());
        }
        if let Some(sink) = &self.progress {
            let fraction = if fraction.is_nan() {
                0.0
            } else {
                fraction.clamp(0.0, 1.0)
            };
            sink(ProgressUpdate {
                item_index: self.context.item_index,
                stage: self.context.stage.clone(),
                fraction,
                message,
            });
        }
        Ok(())
    }
}
