//! A job's events: what happened ([`Event`]), as a log keeps it ([`Entry`]): numbered 1, 2, 3...
//! per job, in sled (`crate::backend::embedded::EventLog`) or a Redis stream.
//!
//! The log is the truth; an SSE stream is a view of it ([`view`]). A subscriber holds a cursor
//! (the last number it sent) and a wake-up signal, never a buffer, so its memory does not grow
//! with the rate of events, and a client that reconnects with `Last-Event-ID: N` gets exactly
//! the events after N. Coalescing of progress happens in the view, so the log keeps every event.

mod tokens;
pub mod view;

use serde::{Deserialize, Serialize};

pub use tokens::{Token, TokenHub, TokenRelay, TokenSubscription};

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

/// An event as the log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When it was logged, ms since the Unix epoch: lets a client measure how late it hears of it.
    pub at: u64,
    #[serde(flatten)]
    pub event: Event,
}

fn first_attempt() -> u32 {
    1
}

/// A job's item counts at one of its events. They are decided where the event is numbered
/// (the sled log's tail, or the Redis script that appends it), so the event is built here
/// without them and [`Event::with_counts`] fills them in there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub succeeded: u64,
    pub failed: u64,
    pub not_run: u64,
    pub total: u64,
}

impl Counts {
    /// As Redis scripts write them next to an event: `"<succeeded> <failed> <not_run> <total>"`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut numbers = text.split(' ').map(str::parse::<u64>);
        let mut next = || numbers.next()?.ok();
        Some(Self {
            succeeded: next()?,
            failed: next()?,
            not_run: next()?,
            total: next()?,
        })
    }
}

impl Event {
    /// Item `index` finished; the job's counts are filled in where it is logged.
    pub fn item_finished(index: u64, succeeded: bool, preview: String) -> Self {
        let status = if succeeded { "succeeded" } else { "failed" };
        Event::ItemFinished {
            index,
            status: status.to_string(),
            preview,
            completed: 0,
            failed: 0,
        }
    }

    /// The job ended with every item settled (`cancelled`: some were not run because it was
    /// cancelled); the counts are filled in where it is logged.
    pub fn job_ended(cancelled: bool) -> Self {
        if cancelled {
            Event::JobCancelled {
                succeeded: 0,
                failed: 0,
                not_run: 0,
                total: 0,
            }
        } else {
            Event::JobCompleted {
                succeeded: 0,
                failed: 0,
                total: 0,
            }
        }
    }

    /// This event with the job's counts written into the fields it has for them.
    pub fn with_counts(mut self, counts: Counts) -> Self {
        match &mut self {
            Event::ItemFinished {
                completed, failed, ..
            } => (*completed, *failed) = (counts.succeeded, counts.failed),
            Event::JobCompleted {
                succeeded,
                failed,
                total,
            } => (*succeeded, *failed, *total) = (counts.succeeded, counts.failed, counts.total),
            Event::JobCancelled {
                succeeded,
                failed,
                not_run,
                total,
            } => {
                (*succeeded, *failed, *not_run, *total) = (
                    counts.succeeded,
                    counts.failed,
                    counts.not_run,
                    counts.total,
                )
            }
            Event::JobStarted { .. } | Event::ItemStage { .. } | Event::JobFailed { .. } => {}
        }
        self
    }

    /// The last event of a job: a stream that sent it closes.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::JobCompleted { .. } | Event::JobCancelled { .. } | Event::JobFailed { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_written_into_the_fields_an_event_has_for_them() {
        let counts = Counts::parse("3 2 1 6").unwrap();
        assert_eq!(
            Event::job_ended(true).with_counts(counts),
            Event::JobCancelled {
                succeeded: 3,
                failed: 2,
                not_run: 1,
                total: 6
            }
        );
        assert_eq!(
            Event::job_ended(false).with_counts(counts),
            Event::JobCompleted {
                succeeded: 3,
                failed: 2,
                total: 6
            }
        );
        let Event::ItemFinished {
            completed, failed, ..
        } = Event::item_finished(4, true, "ok".into()).with_counts(counts)
        else {
            panic!("not an item event")
        };
        assert_eq!((completed, failed), (3, 2));
        let started = Event::JobStarted { total: 6 };
        assert_eq!(started.clone().with_counts(counts), started);
    }

    #[test]
    fn malformed_counts_are_refused() {
        for text in ["", "1 2 3", "1 2 3 x", "1  2 3 4", "-1 2 3 4"] {
            assert_eq!(Counts::parse(text), None, "{text:?}");
        }
    }
}
