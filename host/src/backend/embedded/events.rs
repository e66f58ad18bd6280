//! The `events` tree: key = job id (16 bytes) + sequence number (u64 big-endian, the layout of
//! `store::keys::item`), value = the event's JSON with `at`, the time it was logged (ms since the
//! Unix epoch). Appends to one job are serialised by a per-job lock held across numbering and
//! insert, so a reader that sees event N has seen every event before it.
//!
//! Subscribers only see events that are durable: a publisher task flushes the store (group
//! commit, shared with every other writer) and only then moves each job's published number.
//! So an event a client received survives a crash, and the numbers after a restart continue
//! from it: a client resuming with `Last-Event-ID` never sees a number twice with two meanings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::sync::Weak;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use serde::Serialize;

use crate::backend::EventSource;
use crate::events::{Counts, Entry, Event};
use crate::model::now_ms;
use crate::store::{Store, keys};

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
    /// Jobs with events written but not yet published.
    unpublished: Arc<Mutex<HashMap<Uuid, Arc<Head>>>>,
    publish: Arc<Notify>,
}

/// The tail of one job's log.
struct Head {
    /// The last number given out and the item counts so far; the lock also orders the inserts.
    tail: Mutex<Tail>,
    /// The last durable number, for subscribers to wait on and read up to.
    written: watch::Sender<u64>,
}

/// Events are published at most this long after they are written (plus the flush): a burst
/// of events shares one flush.
const PUBLISH_WINDOW: Duration = Duration::from_millis(2);

#[derive(Default)]
struct Tail {
    seq: u64,
    completed: u64,
    failed: u64,
}

impl EventLog {
    /// The log in `store`'s `events` tree, and its publisher task (which needs a tokio runtime
    /// and ends when the last clone of the log is dropped).
    pub fn new(store: &Store) -> Result<Self> {
        let log = Self {
            tree: store.tree("events")?,
            heads: Arc::default(),
            unpublished: Arc::default(),
            publish: Arc::default(),
        };
        tokio::spawn(publish(
            store.clone(),
            Arc::downgrade(&log.unpublished),
            log.publish.clone(),
        ));
        Ok(log)
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
    /// `replaces_failure`: the item had failed before (a reprocessed dead letter).
    pub fn append_item(
        &self,
        job: Uuid,
        index: u64,
        succeeded: bool,
        preview: String,
        replaces_failure: bool,
    ) -> Result<u64> {
        let head = self.head(job)?;
        let mut tail = head.tail.lock().expect("not poisoned");
        let failed_before = tail.failed - u64::from(replaces_failure && tail.failed > 0);
        let (completed, failed) = if succeeded {
            (tail.completed + 1, failed_before)
        } else {
            (tail.completed, failed_before + 1)
        };
        let counts = Counts {
            succeeded: completed,
            failed,
            ..Counts::default()
        };
        let event = Event::item_finished(index, succeeded, preview).with_counts(counts);
        let seq = self.write(job, &head, &mut tail, &event)?;
        (tail.completed, tail.failed) = (completed, failed);
        Ok(seq)
    }

    fn write(&self, job: Uuid, head: &Arc<Head>, tail: &mut Tail, event: &Event) -> Result<u64> {
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
        self.unpublished
            .lock()
            .expect("not poisoned")
            .entry(job)
            .or_insert_with(|| head.clone());
        self.publish.notify_one();
        Ok(seq)
    }

    /// Events of `job` numbered above `after` and up to `upto`, in order, read lazily from the
    /// store. Subscribers read up to what [`EventLog::watch`] says is durable.
    pub fn read(
        &self,
        job: Uuid,
        after: u64,
        upto: u64,
    ) -> impl Iterator<Item = Result<(u64, Entry)>> + Send + use<> {
        let end = match upto.checked_add(1) {
            Some(next) => keys::item(job, next).to_vec(),
            None => keys::job_end(job).to_vec(),
        };
        self.tree
            .range(keys::item(job, after.saturating_add(1)).to_vec()..end)
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

    /// The number of `job`'s last event if that event ends the job (a job's log can go on
    /// after an end: reprocessed dead letters append to it).
    pub fn ended_at(&self, job: Uuid) -> Result<Option<u64>> {
        Ok(self
            .last(job)?
            .filter(|(_, entry)| entry.event.is_terminal())
            .map(|(seq, _)| seq))
    }

    /// Items finished so far (succeeded, failed), as the log counts them.
    pub fn counts(&self, job: Uuid) -> Result<(u64, u64)> {
        let head = self.head(job)?;
        let tail = head.tail.lock().expect("not poisoned");
        Ok((tail.completed, tail.failed))
    }

    /// A receiver that changes whenever `job` gets a new durable event; its value is the last
    /// durable number, which readers must not read past.
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
            && !self
                .unpublished
                .lock()
                .expect("not poisoned")
                .contains_key(&job)
        {
            heads.remove(&job);
        }
    }

    /// Jobs with a wake-up channel in memory.
    pub fn heads_in_memory(&self) -> usize {
        self.heads.lock().expect("not poisoned").len()
    }
}

/// Flush what was written, then tell subscribers: the loop behind [`EventLog::new`].
async fn publish(
    store: Store,
    unpublished: Weak<Mutex<HashMap<Uuid, Arc<Head>>>>,
    wake: Arc<Notify>,
) {
    loop {
        wake.notified().await;
        tokio::time::sleep(PUBLISH_WINDOW).await;
        let Some(unpublished) = unpublished.upgrade() else {
            return;
        };
        // The numbers written so far, taken before the flush that makes them durable.
        let taken = std::mem::take(&mut *unpublished.lock().expect("not poisoned"));
        let numbers: Vec<u64> = taken
            .values()
            .map(|head| head.tail.lock().expect("not poisoned").seq)
            .collect();
        if let Err(error) = store.flush().await {
            tracing::error!(error = %format!("{error:#}"), "cannot flush the event log; retrying");
            {
                let mut pending = unpublished.lock().expect("not poisoned");
                for (job, head) in taken {
                    pending.entry(job).or_insert(head);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            wake.notify_one();
            continue;
        }
        drop(unpublished);
        for (head, seq) in taken.into_values().zip(numbers) {
            head.written.send_if_modified(|published| {
                let newer = seq > *published;
                *published = (*published).max(seq);
                newer
            });
        }
    }
}

#[async_trait::async_trait]
impl EventSource for EventLog {
    fn watch(&self, job: Uuid) -> Result<watch::Receiver<u64>> {
        EventLog::watch(self, job)
    }

    async fn read(
        &self,
        job: Uuid,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Entry)>> {
        EventLog::read(self, job, after, upto).take(limit).collect()
    }

    async fn ended_at(&self, job: Uuid) -> Result<Option<u64>> {
        EventLog::ended_at(self, job)
    }

    fn release(&self, job: Uuid) {
        EventLog::release(self, job)
    }
}
