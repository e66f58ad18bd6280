//! Everything durable, in one embedded sled database.
//!
//! | tree              | key                               | value                         |
//! |-------------------|-----------------------------------|-------------------------------|
//! | `jobs`            | job id (16 bytes)                 | [`JobRecord`] JSON            |
//! | `items`           | job id, item index (u64 BE)       | the item's JSON as submitted  |
//! | `stage_outputs`   | job id, index, stage name         | a checkpointed stage output   |
//! | `journals`        | job id, index, stage name, 0, position (u64 BE) | a journaled host call's answer |
//! | `results`         | job id, index                     | [`ItemResult`] JSON           |
//! | `effects`         | handler, 0, idempotency key       | [`EffectRecord`] JSON         |
//! | `effects_pending` | same as `effects`                 | empty: effects not yet run    |
//! | `effects_running` | same as `effects`                 | empty: effects claimed, running |
//! | `records`         | collection, 0, key                | a handler's record JSON       |
//! | `idempotency`     | a client's idempotency key        | the job id it names           |
//! | `dead_letters`    | job id, index                     | [`DeadLetter`] JSON           |
//! | `job_tokens`      | job id                            | LLM tokens used (u64 BE)      |
//! | `stage_versions`  | `<pipeline>/<stage>`              | installed versions (`versions.rs`) |
//! | `pipeline_revisions` | revision (sha256 hex)          | its manifest (`pipeline/revisions.rs`) |
//! | `deployed_pipelines` | pipeline name                  | the revision a deploy made current |
//!
//! Files kept by content (components, pipeline and kv files) are in [`Blobs`], beside the
//! database.
//!
//! Big-endian indexes make sled's key order the item order, so results stream in order and a
//! page after index N is a range scan, whatever the job's size.

pub mod blobs;
mod dead_letters;
mod effects;
mod journals;
pub(crate) mod keys;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::{ItemResult, JobRecord};
use anyhow::{Context, Result};
use serde::Serialize;
use sled::{Batch, IVec, Tree};
use uuid::Uuid;

pub use blobs::Blobs;
pub use dead_letters::DeadLetter;
pub use effects::{EffectRecord, EffectState, EmitOutcome};

/// Items are written in batches of this many, so a large job neither holds all its items in
/// one sled batch nor pays a write per item.
const ITEM_BATCH: usize = 1024;

/// How long an idempotency claim without a job is taken for a submission in progress.
const CLAIM_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The embedded store. Cheap to clone: sled trees are reference-counted.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    jobs: Tree,
    items: Tree,
    stage_outputs: Tree,
    journals: Tree,
    results: Tree,
    effects: Tree,
    effects_pending: Tree,
    effects_running: Tree,
    records: Tree,
    idempotency: Tree,
    dead_letters: Tree,
    job_tokens: Tree,
    flusher: Arc<Flusher>,
    /// Woken when an effect is recorded, so the effect runner need not poll.
    effects_added: Arc<tokio::sync::Notify>,
}

/// The shortest time between two flushes. Each flush writes and syncs sled's log buffer (a
/// `sync_file_range` that waits for the disk), and at hundreds a second they were most of the
/// server's CPU under load (docs/BENCHMARKS.md); a flush that waits for this shares the sync
/// with every write made meanwhile. It is what an acknowledgement may wait at most, beyond the
/// flush itself, when flushes are back to back.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Group commit: one flush at a time, at most one per [`FLUSH_INTERVAL`], and a caller whose
/// writes an already finished flush covered returns at once. sled 0.34's `flush_async`
/// deadlocks when many run at once (its issue #1308; seen here with 1,000 concurrent submits),
/// so flushes run `flush` on a blocking thread, one by one, and a burst of submits shares a few
/// fsyncs instead of queueing one each.
#[derive(Default)]
struct Flusher {
    /// Tickets handed out: a caller takes one after its writes.
    requested: AtomicU64,
    /// Every ticket up to this one is durable.
    durable: AtomicU64,
    /// When the last flush started; held by the caller whose turn it is.
    turn: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// [`Store::open`], with sled's background flush (every 500 ms) on or off. Off, nothing is
    /// durable until [`Store::flush`]: how the tests show that an acknowledgement is durable by
    /// itself and not saved by a background flush that happened to come first.
    pub fn open_with(path: &Path, background_flush: bool) -> Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 << 20)
            .flush_every_ms(background_flush.then_some(500))
            .open()
            .with_context(|| format!("cannot open the store at {}", path.display()))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .with_context(|| format!("cannot open tree `{name}`"))
        };
        Ok(Self {
            jobs: tree("jobs")?,
            items: tree("items")?,
            stage_outputs: tree("stage_outputs")?,
            journals: tree("journals")?,
            results: tree("results")?,
            effects: tree("effects")?,
            effects_pending: tree("effects_pending")?,
            effects_running: tree("effects_running")?,
            records: tree("records")?,
            idempotency: tree("idempotency")?,
            dead_letters: tree("dead_letters")?,
            job_tokens: tree("job_tokens")?,
            flusher: Arc::default(),
            effects_added: Arc::default(),
            db,
        })
    }

    /// Another tree of the same database (for the event log).
    pub fn tree(&self, name: &str) -> Result<Tree> {
        self.db
            .open_tree(name)
            .with_context(|| format!("cannot open tree `{name}`"))
    }

    /// Make everything written so far durable.
    pub async fn flush(&self) -> Result<()> {
        let flusher = &self.flusher;
        let ticket = flusher.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut last_started = flusher.turn.lock().await;
        if flusher.durable.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        // Under load, callers arriving within the interval share the next flush.
        if let Some(last) = *last_started {
            tokio::time::sleep_until(last + FLUSH_INTERVAL).await;
        }
        *last_started = Some(tokio::time::Instant::now());
        crate::metrics::store_flushed();
        // Read before flushing: every ticket up to here was taken after its writes.
        let covered = flusher.requested.load(Ordering::SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .context("the flush thread failed")?
            .context("cannot flush the store")?;
        flusher.durable.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    /// Write a job's items, then the job itself, and flush: once this returns the job exists
    /// completely or (after a crash during it) not at all, since a job is found through its record.
    pub async fn create_job<I>(&self, mut job: JobRecord, items: I) -> Result<JobRecord>
    where
        I: IntoIterator<Item = Result<Vec<u8>>>,
    {
        let mut batch = Batch::default();
        let mut in_batch = 0;
        let mut total = 0u64;
        for item in items {
            batch.insert(keys::item(job.id, total).as_slice(), item?);
            total += 1;
            in_batch += 1;
            if in_batch == ITEM_BATCH {
                self.items.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        self.items.apply_batch(batch)?;
        job.total = total;
        self.put_job(&job)?;
        self.flush().await?;
        Ok(job)
    }

    pub fn put_job(&self, job: &JobRecord) -> Result<()> {
        self.jobs.insert(job.id.as_bytes(), json(job)?)?;
        Ok(())
    }

    /// Every job, oldest first (job ids are time-ordered UUIDs).
    pub fn jobs(&self) -> impl Iterator<Item = Result<JobRecord>> + use<> {
        self.jobs.iter().values().map(|v| parse(&v?))
    }

    /// Every job record with its id, oldest first; a record that cannot be read is an error
    /// next to its id, so that a caller can tell which job it was.
    pub fn job_entries(&self) -> impl Iterator<Item = (Uuid, Result<JobRecord>)> + use<> {
        self.jobs.iter().filter_map(|entry| {
            let (key, value) = entry.ok()?;
            let id = Uuid::from_slice(&key).ok()?;
            Some((id, parse(&value)))
        })
    }

    /// Jobs created before `before` (all, for `None`), newest first.
    pub fn jobs_before(
        &self,
        before: Option<Uuid>,
    ) -> impl Iterator<Item = Result<JobRecord>> + use<> {
        let end = before
            .map(|id| id.as_bytes().to_vec())
            .unwrap_or_else(|| vec![0xff; 17]);
        self.jobs.range(..end).rev().map(|entry| parse(&entry?.1))
    }

    pub fn job(&self, id: Uuid) -> Result<Option<JobRecord>> {
        self.jobs.get(id.as_bytes())?.map(|v| parse(&v)).transpose()
    }

    /// A job's items in index order, read lazily from sled.
    /// One item as submitted.
    pub fn item(&self, job: Uuid, index: u64) -> Result<Option<IVec>> {
        Ok(self.items.get(keys::item(job, index))?)
    }

    pub fn items(&self, job: Uuid) -> impl Iterator<Item = Result<(u64, IVec)>> + Send + use<> {
        self.items.scan_prefix(job.as_bytes()).map(|entry| {
            let (key, value) = entry?;
            Ok((keys::index_of(&key)?, value))
        })
    }

    pub fn stage_output(&self, job: Uuid, index: u64, stage: &str) -> Result<Option<IVec>> {
        Ok(self
            .stage_outputs
            .get(keys::stage_output(job, index, stage))?)
    }

    /// A job's checkpoints: (item index, stage, bytes of the output), in item order.
    pub fn checkpoints(
        &self,
        job: Uuid,
    ) -> impl Iterator<Item = Result<(u64, String, usize)>> + use<> {
        self.stage_outputs.scan_prefix(job.as_bytes()).map(|entry| {
            let (key, value) = entry?;
            let (index, stage) = keys::stage_output_of(&key)?;
            Ok((index, stage, value.len()))
        })
    }

    /// Checkpoint several stage outputs of one item. One insert each, not a sled batch: each
    /// checkpoint stands alone, and every sled batch writes and syncs the log buffer twice
    /// (its `pin_log`), which under load was most of the server's CPU (docs/BENCHMARKS.md).
    pub fn put_stage_outputs<'a>(
        &self,
        job: Uuid,
        index: u64,
        outputs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<()> {
        for (stage, output) in outputs {
            self.stage_outputs
                .insert(keys::stage_output(job, index, stage), output)?;
        }
        Ok(())
    }

    /// Drop an item's checkpoints once its result holds them.
    pub fn remove_stage_outputs<'a>(
        &self,
        job: Uuid,
        index: u64,
        stages: impl IntoIterator<Item = &'a str>,
    ) -> Result<()> {
        for stage in stages {
            self.stage_outputs
                .remove(keys::stage_output(job, index, stage))?;
        }
        Ok(())
    }

    pub fn put_result(&self, job: Uuid, result: &ItemResult) -> Result<()> {
        self.results
            .insert(keys::item(job, result.index).as_slice(), json(result)?)?;
        Ok(())
    }

    /// A result as readers may show it (see [`ItemResult::read`]).
    pub fn result(&self, job: Uuid, index: u64) -> Result<Option<ItemResult>> {
        Ok(self
            .results
            .get(keys::item(job, index))?
            .map(|v| ItemResult::read(job, index, &v)))
    }

    /// Results of a job with an index greater than `after` (all, for `None`), in index order,
    /// as readers may show them (see [`ItemResult::read`]).
    pub fn results(
        &self,
        job: Uuid,
        after: Option<u64>,
    ) -> impl Iterator<Item = Result<ItemResult>> + Send + use<> {
        let start = match after {
            Some(i) => keys::item(job, i.saturating_add(1)).to_vec(),
            None => keys::item(job, 0).to_vec(),
        };
        let end = keys::job_end(job);
        self.results.range(start..end).map(move |entry| {
            let (key, value) = entry?;
            Ok(ItemResult::read(job, keys::index_of(&key)?, &value))
        })
    }

    /// LLM tokens a job's items have used so far.
    pub fn llm_tokens(&self, job: Uuid) -> Result<u64> {
        Ok(self
            .job_tokens
            .get(job.as_bytes())?
            .map_or(0, |v| tokens_of(&v)))
    }

    /// Count `tokens` more for a job (atomically: items of a job run at once); the new total.
    /// Not flushed by itself: a crash may forget the last few calls' tokens.
    pub fn add_llm_tokens(&self, job: Uuid, tokens: u64) -> Result<u64> {
        let total = self.job_tokens.update_and_fetch(job.as_bytes(), |old| {
            let sum = old.map_or(0, tokens_of).saturating_add(tokens);
            Some(sum.to_be_bytes().to_vec())
        })?;
        Ok(total.map_or(0, |v| tokens_of(&v)))
    }

    /// Remove a job and everything stored under it (items, checkpoints, journals, results, dead
    /// letters). Effects and
    /// handler records stay: they belong to the domain (an ownership outlives the scan that
    /// granted it) and their keys keep effects idempotent.
    pub fn delete_job(&self, job: Uuid) -> Result<()> {
        if let Some(key) = self.job(job)?.and_then(|j| j.idempotency_key) {
            self.idempotency.remove(key.as_bytes())?;
        }
        for tree in [
            &self.items,
            &self.stage_outputs,
            &self.journals,
            &self.results,
            &self.dead_letters,
        ] {
            remove_prefix(tree, job.as_bytes())?;
        }
        self.job_tokens.remove(job.as_bytes())?;
        self.jobs.remove(job.as_bytes())?;
        Ok(())
    }

    /// Make `key` name job `id`, unless it names a job already: then that job. A claim whose
    /// job does not exist is one being submitted right now (wait for it) or one a crash cut
    /// short before its job was written (take it over).
    pub async fn claim_idempotency_key(&self, key: &str, id: Uuid) -> Result<Option<JobRecord>> {
        let ours = Some(id.as_bytes().as_slice());
        'claim: loop {
            let current =
                match self
                    .idempotency
                    .compare_and_swap(key.as_bytes(), None::<&[u8]>, ours)?
                {
                    Ok(()) => return Ok(None),
                    Err(swap) => swap.current.context("a failed swap sees a value")?,
                };
            let holder = Uuid::from_slice(&current).context("corrupt idempotency entry")?;
            let deadline = tokio::time::Instant::now() + CLAIM_GRACE;
            loop {
                if let Some(job) = self.job(holder)? {
                    return Ok(Some(job));
                }
                if self.idempotency.get(key.as_bytes())?.as_ref() != Some(&current) {
                    continue 'claim;
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            if self
                .idempotency
                .compare_and_swap(key.as_bytes(), Some(current), ours)?
                .is_ok()
            {
                return Ok(None);
            }
        }
    }

    /// Insert or replace a handler's record.
    pub fn put_record(&self, collection: &str, key: &str, value: &[u8]) -> Result<()> {
        self.records.insert(keys::named(collection, key), value)?;
        Ok(())
    }

    pub fn record(&self, collection: &str, key: &str) -> Result<Option<IVec>> {
        Ok(self.records.get(keys::named(collection, key))?)
    }

    /// Every record of a collection, as (key, value).
    pub fn records(
        &self,
        collection: &str,
    ) -> impl Iterator<Item = Result<(String, IVec)>> + use<> {
        let prefix = keys::named(collection, "");
        let skip = prefix.len();
        self.records.scan_prefix(prefix).map(move |entry| {
            let (key, value) = entry?;
            Ok((String::from_utf8_lossy(&key[skip..]).into_owned(), value))
        })
    }
}

/// Remove every key that starts with `prefix`, a batch at a time.
pub(crate) fn remove_prefix(tree: &Tree, prefix: &[u8]) -> Result<()> {
    loop {
        let keys: Vec<IVec> = tree
            .scan_prefix(prefix)
            .keys()
            .take(ITEM_BATCH)
            .collect::<Result<_, _>>()?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        keys.into_iter().for_each(|k| batch.remove(k));
        tree.apply_batch(batch)?;
    }
}

fn tokens_of(bytes: &[u8]) -> u64 {
    bytes.try_into().map_or(0, u64::from_be_bytes)
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).context("corrupt record in the store")
}
