//! Where jobs live, and what the rest of the engine asks of that place: the seams, in one file.
//!
//! - [`JobBackend`]: jobs as the HTTP API sees them (submit, read, list, cancel, events).
//! - [`ItemStore`]: what running one item reads and writes (checkpoints, journals, results,
//!   dead letters, token counts).
//! - [`EventSource`]: what a view of a job's log needs (read after a number, wake-ups).
//! - [`EffectQueue`]: effects emitted by stages, queued and run at most once per key.
//! - [`Records`]: the collections handlers write.
//! - [`Changes`]: operators' changes (deploys, stage versions, kv reloads) that every node of a
//!   cluster applies.
//!
//! Two backends implement them: [`embedded`] (this process's sled store; this process runs
//! the jobs) and [`redis`] (Redis shared by several nodes, each running items from a shared
//! work stream). The seams sit below the job runner (`crate::jobs` imports them); the
//! backends sit above it (each runs items with `crate::jobs::run_item`).

pub mod auto_reprocess;
pub mod embedded;
pub mod redis;

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::Entry;
use crate::model::{
    CancelOutcome, Idempotency, ItemResult, JobOptions, JobRecord, JobState, Reprocess, Submitted,
};
use crate::pipeline::Pipeline;
use crate::store::{DeadLetter, EffectRecord, EmitOutcome};

/// The backend a node was built with, once: the API sees it as a [`JobBackend`], the node's
/// services use the parts only one backend has.
#[derive(Clone)]
pub enum Backend {
    Embedded(Arc<embedded::Embedded>),
    Redis(redis::Cluster),
}

impl Backend {
    /// Jobs as the HTTP API sees them.
    pub fn jobs(&self) -> Arc<dyn JobBackend> {
        match self {
            Backend::Embedded(embedded) => embedded.clone(),
            Backend::Redis(cluster) => Arc::new(cluster.clone()),
        }
    }
}

/// Which jobs a listing shows: those in `state` and of `pipeline`, where given.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub pipeline: Option<String>,
}

impl JobFilter {
    pub fn lets_through(&self, job: &JobRecord) -> bool {
        self.state.is_none_or(|state| state == job.state)
            && self
                .pipeline
                .as_ref()
                .is_none_or(|name| *name == job.pipeline)
    }
}

/// Which dead letters a listing shows: those of `job`, `pipeline` and `stage`, where given.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub job: Option<Uuid>,
    pub pipeline: Option<String>,
    pub stage: Option<String>,
}

impl DeadLetterFilter {
    pub fn lets_through(&self, letter: &DeadLetter) -> bool {
        self.job.is_none_or(|job| job == letter.job_id)
            && self
                .pipeline
                .as_ref()
                .is_none_or(|name| *name == letter.pipeline)
            && self
                .stage
                .as_ref()
                .is_none_or(|stage| *stage == letter.stage)
    }
}

#[async_trait]
pub trait JobBackend: Send + Sync {
    /// Persist a job of `pipeline` (its current revision) and queue its items; when this
    /// returns the job survives a crash.
    async fn submit(
        &self,
        pipeline: &Arc<Pipeline>,
        items: Vec<Vec<u8>>,
        options: JobOptions,
        idempotency: Option<Idempotency>,
    ) -> Result<Submitted>;

    /// A job with its counts up to now.
    async fn job(&self, id: Uuid) -> Result<Option<JobRecord>>;

    /// Up to `limit` jobs created before `before` (all, for `None`), newest first, that
    /// `filter` lets through.
    async fn jobs(
        &self,
        before: Option<Uuid>,
        filter: &JobFilter,
        limit: usize,
    ) -> Result<Vec<JobRecord>>;

    /// Up to `limit` results with an index above `after` (all, for `None`), in index order.
    async fn results(&self, id: Uuid, after: Option<u64>, limit: usize) -> Result<Vec<ItemResult>>;

    /// Stop a job wherever its items run.
    async fn cancel(&self, id: Uuid) -> Result<CancelOutcome>;

    /// Results `skip..skip + limit` in index order (offset paging: it walks what it skips).
    async fn results_from(&self, id: Uuid, skip: usize, limit: usize) -> Result<Vec<ItemResult>>;

    /// Up to `limit` dead letters after `after` (job, index) that `filter` lets through, in
    /// (job, index) order.
    async fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: Option<(Uuid, u64)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>>;

    async fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>>;

    /// Give up on a dead letter (the item's failed result stays); `false` if there was none.
    async fn discard_dead_letter(&self, job: Uuid, index: u64) -> Result<bool>;

    /// Run a finished job's dead letters again: those of `indices`, or all.
    async fn reprocess(&self, job: Uuid, indices: Option<Vec<u64>>) -> Result<Reprocess>;

    /// Whether this node is the one to run the cluster-wide task `task` (e.g. automatic
    /// reprocessing) for the next `ttl`: always in embedded mode; one node at a time in Redis
    /// mode, by a lease that passes to another node when its holder stops renewing it.
    async fn lead(&self, task: &'static str, ttl: std::time::Duration) -> Result<bool>;

    /// Items of running jobs not finished yet, when this backend counts them cheaply.
    async fn unfinished_items(&self) -> Result<Option<u64>>;

    /// The jobs' event logs.
    fn events(&self) -> Events;
}

#[async_trait]
pub trait ItemStore: Send + Sync {
    /// An item's input as submitted; `None` once its job is gone.
    async fn item(&self, job: Uuid, index: u64) -> Result<Option<Vec<u8>>>;

    /// A checkpointed output of `stage` for item `index`.
    async fn stage_output(&self, job: Uuid, index: u64, stage: &str) -> Result<Option<Vec<u8>>>;

    /// Checkpoint several stage outputs of one item at once.
    async fn put_stage_outputs(
        &self,
        job: Uuid,
        index: u64,
        outputs: &[(&str, &[u8])],
    ) -> Result<()>;

    /// Drop an item's checkpoints once its result holds them.
    async fn remove_stage_outputs(&self, job: Uuid, index: u64, stages: &[&str]) -> Result<()>;

    /// The journal of `stage` for item `index` (`capabilities/journal.rs`): its entries in order.
    async fn journal(&self, job: Uuid, index: u64, stage: &str) -> Result<Vec<Vec<u8>>>;

    /// Make the journal's entries from position `from` on be `entries`; those the store holds
    /// past them are dropped. `held` is how many entries the store holds, as the caller's
    /// journal knows from reading or writing them (so that a backend need not look).
    async fn put_journal(
        &self,
        job: Uuid,
        index: u64,
        stage: &str,
        from: usize,
        entries: &[Vec<u8>],
        held: usize,
    ) -> Result<()>;

    /// Drop a journal of `held` entries once the stage's output is kept.
    async fn remove_journal(&self, job: Uuid, index: u64, stage: &str, held: usize) -> Result<()>;

    /// Store an item's result. A backend may leave this to whoever runs the item (Redis
    /// writes the result together with its event and the job's counts, in one step).
    async fn put_result(&self, job: Uuid, result: &ItemResult) -> Result<()>;

    async fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>>;

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<()>;

    async fn remove_dead_letter(&self, job: Uuid, index: u64) -> Result<()>;

    /// LLM tokens (prompt and completion) the job's items have used so far.
    async fn llm_tokens(&self, job: Uuid) -> Result<u64>;

    /// Count `tokens` more for the job; the new total.
    async fn add_llm_tokens(&self, job: Uuid, tokens: u64) -> Result<u64>;
}

#[async_trait]
pub trait EventSource: Send + Sync {
    /// A receiver that changes when `job` gets new readable events; its value is the last
    /// readable number, which readers must not read past.
    fn watch(&self, job: Uuid) -> Result<watch::Receiver<u64>>;

    /// Up to `limit` events numbered above `after` and up to `upto`, in order.
    async fn read(
        &self,
        job: Uuid,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Entry)>>;

    /// The number of `job`'s last event if that event ends the job.
    async fn ended_at(&self, job: Uuid) -> Result<Option<u64>>;

    /// The last view of a finished job went away: its wake-up channel may go.
    fn release(&self, job: Uuid);
}

/// A shared event source.
pub type Events = Arc<dyn EventSource>;

/// Effects that stages emit (`dispatch.emit`), each run at most once per (handler, key)
/// whichever node's item emits it. Recording an effect claims its key and queues it in one
/// step; a runner takes it, marked running durably *before* it runs, so that an effect whose
/// runner died is found running and marked interrupted instead of being run a second time.
#[async_trait]
pub trait EffectQueue: Send + Sync {
    /// Record `effect` (pending) and queue it, unless its (handler, key) is known.
    async fn emit(&self, effect: &EffectRecord) -> Result<EmitOutcome>;

    /// Up to `limit` effects for this node to run now, each marked running for it; when there
    /// are none, waits a little (a second at most, less if one is emitted or at `shutdown`)
    /// and answers none.
    async fn take(&self, limit: usize, shutdown: &CancellationToken) -> Result<Vec<EffectRecord>>;

    /// Store the outcome of a taken effect (`done` or `failed`), which leaves the queue.
    async fn finish(&self, effect: &EffectRecord) -> Result<()>;

    /// Whether no effect waits or runs (`stagehand run` ends once none does).
    async fn is_empty(&self) -> Result<bool>;
}

/// The durable collections that handlers write through the `records` import (ownerships,
/// awards...): the domain's state, kept apart from jobs and never expired with them.
#[async_trait]
pub trait Records: Send + Sync {
    /// Insert or replace `collection`/`key`.
    async fn put(&self, collection: &str, key: &str, value: &[u8]) -> Result<()>;

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Vec<u8>>>;
}

/// A record of the cluster's about one thing of a pipeline (see [`pipeline_records`]).
pub struct PipelineRecord<'a, R> {
    pub pipeline: Arc<Pipeline>,
    /// What in the pipeline: the key past `<prefix><pipeline>/`.
    pub name: &'a str,
    pub record: R,
    pub raw: &'a [u8],
}

/// The records among `all` (a [`Changes::records`] answer) under `<prefix><pipeline>/` of a
/// pipeline `pipelines` serves, parsed: the pipeline, the rest of the key, the record and its
/// bytes. A record that does not parse is skipped with a warning naming `what` it is.
pub fn pipeline_records<'a, R: serde::de::DeserializeOwned>(
    all: &'a [(String, Vec<u8>)],
    prefix: &str,
    what: &str,
    pipelines: &crate::pipeline::Pipelines,
) -> Vec<PipelineRecord<'a, R>> {
    all.iter()
        .filter_map(|(key, raw)| {
            let (pipeline, rest) = key.strip_prefix(prefix)?.split_once('/')?;
            let pipeline = pipelines.get(pipeline)?;
            match serde_json::from_slice(raw) {
                Ok(record) => Some(PipelineRecord {
                    pipeline,
                    name: rest,
                    record,
                    raw,
                }),
                Err(error) => {
                    tracing::warn!(%key, %error, "a corrupt {what} record in the cluster");
                    None
                }
            }
        })
        .collect()
}

/// `files` as [`Changes`] takes them: (digest, bytes) borrowed.
pub fn file_refs(files: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    files
        .iter()
        .map(|(digest, bytes)| (digest.as_str(), bytes.as_slice()))
        .collect()
}

/// Changes an operator makes on one node that every node of a cluster applies (Redis mode): a
/// record per key, the files records name (stored once, by sha256), and a counter that moves
/// with every change so that a node that missed a wake-up, started late or was cut off sees
/// that it is behind.
#[async_trait::async_trait]
pub trait Changes: Send + Sync {
    /// Make `record` the value of `key`, with `files` (digest, bytes) kept, in one step, and
    /// tell every node; the counter after the change. With `expected` (`Some(None)`: no value
    /// yet), only if `key` holds that value: `None` when it does not (another node changed it
    /// since this one last saw it), and nothing changed.
    async fn publish(
        &self,
        key: &str,
        expected: Option<Option<&[u8]>>,
        record: &[u8],
        files: &[(&str, &[u8])],
    ) -> Result<Option<u64>>;

    /// Every record whose key starts with `prefix`, with the counter they were read at.
    async fn records(&self, prefix: &str) -> Result<(u64, Vec<(String, Vec<u8>)>)>;

    /// Tell the cluster this node serves every change up to counter `n` (`sh:changes:applied`:
    /// how an operator, a test or a benchmark sees a change reach every node).
    async fn applied(&self, n: u64) -> Result<()>;

    /// A file a record names, by digest.
    async fn file(&self, digest: &str) -> Result<Option<Vec<u8>>>;

    /// Keep `files` (digest, bytes) where every node can fetch them, without a change (what a
    /// node serves from its own files, for a job submitted there and run elsewhere).
    async fn keep_files(&self, files: &[(&str, &[u8])]) -> Result<()>;

    /// The counter as this node last heard of it (pub/sub, backed by a poll): it changes when
    /// any node publishes a change.
    fn counter(&self) -> watch::Receiver<u64>;
}
