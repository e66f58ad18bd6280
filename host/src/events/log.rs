//! The `events` tree: key = job id (16 bytes) + sequence number (u64 big-endian, the layout of
//! `store::keys::item`), value = the event's JSON with `at`, the time it was logged (ms since the
//! Unix epoch). Appends to one job are serialised by a per-job lock held across numbering and
//! insert, so a reader that sees event N has seen every event before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::sync::watch;
use uuid::Uuid;

use serde::{Deserialize, Serialize};

use super::Event;
use crate::store::{keys, now_ms};

/// An event as the log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When it was logged, ms since the Unix epoch: lets a client measure how late it hears of it.
    pub at: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// [`Entry`] for writing, without copying the event.
#[derive(Serialize)]
struct EntryRef<'a> {
    at: u64,
    #[serde(flatten)]
    event: &'a Event,
}

/// The event logs of every job, and a wake-up channel per job being watched or written.
#[derive(Clone)]
pub struct EventLog {
    tree: sled::Tree,
    heads: Arc<Mutex<HashMap<Uuid, Arc<Head>>>>,
}

/// The tail of one job's log.
struct Head {
    /// The last number given out and the item counts so far; the lock also orders the inserts.
    tail: Mutex<Tail>,
    /// The last number written, for subscribers to wait on.
    written: watch::Sender<u64>,
}

#[derive(Default)]
struct Tail {
    seq: u64,
    completed: u64,
    failed: u64,
}

impl EventLog {
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            heads: Arc::default(),
        }
    }

    /// Where `job`'s stored log ends: its last number and the counts of its last item event.
    fn stored_tail(&self, job: Uuid) -> Result<Tail> {
        let mut tail = Tail::default();
        for entry in self.tree.scan_prefix(job.as_bytes()).rev() {
            let (k, v) = entry?;
            if tail.seq == 0 {
                tail.seq = keys::index_of(&k)?;
            }
            if let Ok(Entry {
                event:
                    Event::ItemFinished {
                        completed, failed, ..
                    },
                ..
            }) = serde_json::from_slice(&v)
            {
                (tail.completed, tail.failed) = (completed, failed);
                break;
            }
        }
        Ok(tail)
    }

    fn head(&self, job: Uuid) -> Result<Arc<Head>> {
        let mut heads = self.heads.lock().expect("not poisoned");
        if let Some(head) = heads.get(&job) {
            return Ok(head.clone());
        }
        // After a restart the numbering continues where the stored log ends.
        let tail = self.stored_tail(job)?;
        let head = Arc::new(Head {
            written: watch::Sender::new(tail.seq),
            tail: Mutex::new(tail),
        });
        heads.insert(job, head.clone());
        Ok(head)
    }

    /// Append `event` to `job`'s log; its number.
    pub fn append(&self, job: Uuid, event: &Event) -> Result<u64> {
        let head = self.head(job)?;
        let mut tail = head.tail.lock().expect("not poisoned");
        self.write(job, &head, &mut tail, event)
    }

    /// Append an `item.finished` event, with the job's running counts filled in.
    pub fn append_item(
        &self,
        job: Uuid,
        index: u64,
        succeeded: bool,
        preview: String,
    ) -> Result<u64> {
        let head = self.head(job)?;
        let mut tail = head.tail.lock().expect("not poisoned");
        let (completed, failed) = if succeeded {
            (tail.completed + 1, tail.failed)
        } else {
            (tail.completed, tail.failed + 1)
        };
        let status = if succeeded { "succeeded" } else { "failed" }.to_string();
        let seq = self.write(
            job,
            &head,
            &mut tail,
            &Event::ItemFinished {
                index,
                status,
                preview,
                completed,
                failed,
            },
        )?;
        (tail.completed, tail.failed) = (completed, failed);
        Ok(seq)
    }

    fn write(&self, job: Uuid, head: &Head, tail: &mut Tail, event: &Event) -> Result<u64> {
        let seq = tail.seq + 1;
        self.tree
            .insert(
                keys::item(job, seq),
                serde_json::to_vec(&EntryRef {
                    at: now_ms(),
                    event,
                })?,
            )
            .context("cannot append an event")?;
        tail.seq = seq;
        head.written.send_replace(seq);
        Ok(seq)
    }

    /// Events of `job` numbered above `after`, in order, read lazily from the store.
    pub fn read(
        &self,
        job: Uuid,
        after: u64,
    ) -> impl Iterator<Item = Result<(u64, Entry)>> + Send + use<> {
        self.tree
            .range(keys::item(job, after.saturating_add(1)).to_vec()..keys::job_end(job))
            .map(|entry| {
                let (k, v) = entry?;
                let seq = keys::index_of(&k)?;
                Ok((seq, serde_json::from_slice(&v).context("corrupt event")?))
            })
    }

    /// The last event of `job`, if it has any.
    pub fn last(&self, job: Uuid) -> Result<Option<(u64, Entry)>> {
        let Some((k, v)) = self
            .tree
            .scan_prefix(job.as_bytes())
            .next_back()
            .transpose()?
        else {
            return Ok(None);
        };
        let seq = keys::index_of(&k)?;
        Ok(Some((
            seq,
            serde_json::from_slice(&v).context("corrupt event")?,
        )))
    }

    /// Items finished so far (succeeded, failed), as the log counts them.
    pub fn counts(&self, job: Uuid) -> Result<(u64, u64)> {
        let head = self.head(job)?;
        let tail = head.tail.lock().expect("not poisoned");
        Ok((tail.completed, tail.failed))
    }

    /// A receiver that changes whenever `job` gets a new event; its value is the last number.
    pub fn watch(&self, job: Uuid) -> Result<watch::Receiver<u64>> {
        Ok(self.head(job)?.written.subscribe())
    }

    /// Remove `job`'s log.
    pub fn delete(&self, job: Uuid) -> Result<()> {
        crate::store::remove_prefix(&self.tree, job.as_bytes())?;
        self.heads.lock().expect("not poisoned").remove(&job);
        Ok(())
    }

    /// Forget the wake-up channel of a finished job nobody watches or writes (the log stays;
    /// a later append or watch starts a new one from the stored tail).
    pub fn release(&self, job: Uuid) {
        let mut heads = self.heads.lock().expect("not poisoned");
        // Heads are cloned out of the map under this lock, so a count of one means no append
        // is under way on this head.
        if heads
            .get(&job)
            .is_some_and(|h| h.written.receiver_count() == 0 && Arc::strong_count(h) == 1)
        {
            heads.remove(&job);
        }
    }

    /// Jobs with a wake-up channel in memory.
    pub fn heads_in_memory(&self) -> usize {
        self.heads.lock().expect("not poisoned").len()
    }
}
