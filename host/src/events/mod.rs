//! A job's events: an append-only log per job, numbered 1, 2, 3..., kept in sled.
//!
//! The log is the truth; an SSE stream is a view of it. A subscriber holds a cursor (the last
//! number it sent) and a wake-up signal, never a buffer, so its memory does not grow with the
//! rate of events, and a client that reconnects with `Last-Event-ID: N` gets exactly the events
//! after N. Coalescing of progress happens in the view ([`view`]), so the log keeps every event.

mod log;
mod source;
mod tokens;
pub mod view;

use serde::{Deserialize, Serialize};

pub use log::{Entry, EventLog};
pub use source::{EventSource, Events};
pub use tokens::{Token, TokenHub, TokenSubscription};

/// What happened. Serialised as `{"type": "...", ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// The job was accepted with `total` items.
    #[serde(rename = "job.started")]
    JobStarted { total: u64 },
    /// One item finished; `preview` is the start of its output or error. `completed` and
    /// `failed` count the job's finished items up to this event, so a view that starts in the
    /// middle of the log knows the totals without reading what came before.
    #[serde(rename = "item.finished")]
    ItemFinished {
        index: u64,
        status: String,
        preview: String,
        completed: u64,
        failed: u64,
    },
    /// A stage started (`duration_ms` absent) or ended for an item, logged when the job asked
    /// for `detail: "stages"` and always for one-item jobs; or a try failed and will be retried
    /// (`status: "retrying"`, with `error` and `retry_in_ms`), always logged.
    #[serde(rename = "item.stage")]
    ItemStage {
        index: u64,
        stage: String,
        status: String,
        /// The try: 1, 2, ... (a `retrying` event says try `attempt` failed).
        #[serde(default = "first_attempt")]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_in_ms: Option<u64>,
    },
    #[serde(rename = "job.completed")]
    JobCompleted {
        succeeded: u64,
        failed: u64,
        total: u64,
    },
    #[serde(rename = "job.cancelled")]
    JobCancelled {
        succeeded: u64,
        failed: u64,
        not_run: u64,
        total: u64,
    },
    #[serde(rename = "job.failed")]
    JobFailed { error: String },
}

fn first_attempt() -> u32 {
    1
}

impl Event {
    /// The last event of a job: a stream that sent it closes.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::JobCompleted { .. } | Event::JobCancelled { .. } | Event::JobFailed { .. }
        )
    }
}
