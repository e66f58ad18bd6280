//! A job's log as the frames an SSE client receives.
//!
//! `item.finished` events are coalesced into `job.progress` frames of at most `max_items` items,
//! sent when that many are pending or `interval` has passed since the last frame, whichever
//! comes first; other events pass through. A frame's id is the log number of the last event it
//! covers, so resuming after it neither repeats nor skips an event. After a terminal event the
//! view ends.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Entry, Event};
use crate::backend::Events;

/// When progress frames go out.
#[derive(Debug, Clone, Copy)]
pub struct Coalescing {
    pub max_items: usize,
    pub interval: Duration,
}

impl Default for Coalescing {
    fn default() -> Self {
        Self {
            max_items: 10,
            interval: Duration::from_millis(3000),
        }
    }
}

/// One SSE message: `id:`, `event:` and JSON `data:`.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub id: u64,
    pub event: &'static str,
    pub data: Value,
}

/// Events read from the log per step; bounds the memory of a view that catches up.
const READ_AHEAD: usize = 256;

/// A cursor over one job's log. Memory: the pending progress items (at most `max_items`) and
/// the frames of one read-ahead, whatever the job's size.
pub struct JobView {
    log: Events,
    job: Uuid,
    total: u64,
    coalescing: Coalescing,
    cursor: u64,
    pending: Vec<Value>,
    pending_counts: (u64, u64),
    /// Number and time of the last pending item event.
    pending_last: (u64, u64),
    last_frame: Instant,
    ready: VecDeque<Frame>,
    wake: watch::Receiver<u64>,
    ended: bool,
    /// The job had ended when the view was opened.
    finished_job: bool,
}

impl JobView {
    /// A view of `job` (which has `total` items) starting after event `after`.
    pub async fn new(
        log: Events,
        job: Uuid,
        total: u64,
        after: u64,
        coalescing: Coalescing,
    ) -> Result<Self> {
        let wake = log.watch(job)?;
        let end = log.ended_at(job).await?;
        // A client resuming after the job's last event gets nothing more: end at once.
        let ended = end.is_some_and(|end| after >= end);
        Ok(Self {
            log,
            job,
            total,
            coalescing: Coalescing {
                max_items: coalescing.max_items.max(1),
                ..coalescing
            },
            cursor: after,
            pending: Vec::new(),
            pending_counts: (0, 0),
            pending_last: (after, 0),
            last_frame: Instant::now(),
            ready: VecDeque::new(),
            wake,
            ended,
            finished_job: end.is_some(),
        })
    }

    /// The next frame, waiting for events as needed; `None` after the terminal frame.
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(Some(frame));
            }
            if self.ended {
                return Ok(None);
            }
            // Mark the wake-up channel seen before reading, so an event published after the
            // read wakes us; read only what is durable.
            let durable = *self.wake.borrow_and_update();
            let mut read = 0;
            let entries = self
                .log
                .read(self.job, self.cursor, durable, READ_AHEAD)
                .await?;
            for (seq, entry) in entries {
                self.cursor = seq;
                // A job's log can go on after its end (reprocessed dead letters append to
                // it): only the log's last event ends a view.
                let last = if entry.event.is_terminal() {
                    self.log
                        .ended_at(self.job)
                        .await?
                        .is_none_or(|end| end == seq)
                } else {
                    false
                };
                self.take(seq, entry, last);
                read += 1;
                if self.ended {
                    break;
                }
            }
            if read > 0 || !self.ready.is_empty() {
                continue;
            }
            if self.pending.is_empty() {
                if self.wake.changed().await.is_err() {
                    return Ok(None);
                }
                continue;
            }
            let deadline = self.last_frame + self.coalescing.interval;
            tokio::select! {
                changed = self.wake.changed() => if changed.is_err() { return Ok(None) },
                () = tokio::time::sleep_until(deadline) => self.flush(),
            }
        }
    }

    /// Take one event; `last`: it is a terminal event that ends the log.
    fn take(&mut self, seq: u64, Entry { at, event }: Entry, last: bool) {
        match event {
            Event::ItemFinished {
                index,
                status,
                preview,
                completed,
                failed,
            } => {
                self.pending
                    .push(json!({ "index": index, "status": status, "preview": preview }));
                self.pending_counts = (completed, failed);
                self.pending_last = (seq, at);
                if self.pending.len() >= self.coalescing.max_items
                    || self.last_frame.elapsed() >= self.coalescing.interval
                {
                    self.flush();
                }
            }
            other => {
                self.flush();
                self.ended = last;
                let (event, mut data) = frame_of(&other);
                data["at"] = at.into();
                self.ready.push_back(Frame {
                    id: seq,
                    event,
                    data,
                });
            }
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let (completed, failed) = self.pending_counts;
        let percent = if self.total == 0 {
            100.0
        } else {
            ((completed + failed) as f64 * 10_000.0 / self.total as f64).round() / 100.0
        };
        let items = std::mem::take(&mut self.pending);
        let (id, at) = self.pending_last;
        self.ready.push_back(Frame {
            id,
            event: "job.progress",
            data: json!({ "completed": completed, "failed": failed, "total": self.total, "percent": percent, "items": items, "at": at }),
        });
        self.last_frame = Instant::now();
    }
}

impl Drop for JobView {
    /// A view of a finished job is the only reason its wake-up channel is in memory (after a
    /// restart, or once the job ended): let it go with the last view.
    fn drop(&mut self) {
        if self.ended || self.finished_job {
            // Drop our receiver first: `release` keeps channels somebody still watches.
            self.wake = watch::Sender::new(0).subscribe();
            self.log.release(self.job);
        }
    }
}

/// The SSE `event:` name and `data:` of a pass-through event.
fn frame_of(event: &Event) -> (&'static str, Value) {
    let mut data = serde_json::to_value(event).expect("events serialise");
    let name = match data
        .as_object_mut()
        .and_then(|o| o.remove("type"))
        .as_ref()
        .and_then(Value::as_str)
    {
        Some("job.started") => "job.started",
        Some("job.completed") => "job.completed",
        Some("job.cancelled") => "job.cancelled",
        Some("job.failed") => "job.failed",
        Some("item.stage") => "item.stage",
        _ => "item.finished",
    };
    (name, data)
}
