//! The host side of each WIT import, and the per-invocation state they run in.
//!
//! A guest gets nothing but these: `llm` (the provider, its key and its limits stay here), `kv`
//! (read-only JSON namespaces), `dispatch` (handlers and durable effects), `progress`, `log`,
//! `config` (the stage's settings), and for handlers `records`. WASI is linked only because Rust's std imports it; its context
//! is empty (no files, sockets, name lookups, environment or arguments), its clocks are frozen
//! ([`FrozenClock`]), and stderr is captured so that a panicking guest's message ends up in the
//! item's error. Its random bytes are seeded per job, item, stage and try, so that a try run
//! again gives the same answers; a seed is no secret from the guest's own operator, so stages
//! must not mint credentials from it. docs/SANDBOX.md lists it all.
//!
//! The answers a try's host calls got are kept in its [`Journal`], which is what lets a try
//! waiting on the LLM give up its instance (see `journal.rs`).

mod budget;
mod config;
mod dispatch;
pub(crate) mod http;
mod journal;
mod kv;
mod llm;
mod log;
mod progress;
mod records;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub(crate) use self::budget::Counted;
pub use self::http::HttpGrant;
pub use self::journal::{Answer, CallKind, Diverged, Durable, Journal, Request};
pub use self::kv::{KvNamespaces, NamespaceInfo, ReloadError};
pub use self::llm::{LlmProviders, LlmUsage, Provider};
pub use self::progress::{ProgressSink, ProgressUpdate};
use crate::events::TokenHub;
use crate::runtime::bindings::types::Context;
use crate::runtime::{Call, CpuMeter, HandlerComponent, Runtime};
use crate::store::Store;

/// What the imports reach: shared by every invocation of a pipeline.
pub struct Capabilities {
    /// The pipeline's name: effects and metrics carry it.
    pub pipeline: String,
    /// The pipeline's revision: an effect runs on the handlers of the revision that emitted it.
    pub revision: String,
    pub runtime: Arc<Runtime>,
    pub llm: LlmProviders,
    pub kv: Arc<KvNamespaces>,
    pub handlers: BTreeMap<String, Arc<HandlerComponent>>,
    pub store: Store,
    /// Checkpoints, results and dead letters of items: `store`, or a shared backend.
    pub items: Arc<dyn crate::backend::ItemStore>,
    /// Where `dispatch.emit` records and queues effects: `store`, or a shared backend.
    pub effects: Arc<dyn crate::backend::EffectQueue>,
    /// Where the `records` import keeps handlers' records: `store`, or a shared backend.
    pub records: Arc<dyn crate::backend::Records>,
    /// Where `llm.chat-stream` sends the pieces of an answer as they arrive.
    pub tokens: TokenHub,
    /// Each stage's outbound HTTP grant (`allowed_hosts`), by stage name.
    pub grants: BTreeMap<String, Arc<HttpGrant>>,
    /// Each stage's `[stage.config]`, by stage name (the `config` import).
    pub settings: BTreeMap<String, crate::config::StageSettings>,
    /// Handlers running for `dispatch.call` at once: each holds an instance, which the pool
    /// keeps room for (see `NodeResources::new`).
    pub handler_calls: Arc<Semaphore>,
}

/// Bytes of a guest's stderr kept for its error message.
const STDERR_CAPTURE: usize = 4096;

/// The data of one wasmtime `Store`: one component invocation for one item.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: crate::runtime::Limiter,
    pub(crate) caps: Arc<Capabilities>,
    pub(crate) context: Context,
    pub(crate) cancel: CancellationToken,
    pub(crate) progress: Option<ProgressSink>,
    pub(crate) meter: Arc<CpuMeter>,
    pub(crate) cpu_budget: Duration,
    /// Set by the epoch callback when it stops the guest, to say why.
    pub(crate) interrupted: Option<Interrupt>,
    /// What this try may do through host calls (what it used is in the journal).
    pub(crate) budgets: crate::limits::Budgets,
    /// Set by a host call that found a budget used up: why the try failed.
    pub(crate) exceeded: Option<String>,
    /// Set by a host call that found the guest asking for another call than its journal holds.
    pub(crate) diverged: Option<Diverged>,
    /// The job's LLM token budget, if it has one.
    pub(crate) job_max_tokens: Option<u64>,
    /// The try's host calls and their answers, carried from run to run.
    pub(crate) journal: Journal,
    /// How long a host call may keep the instance waiting before the run is evicted; `None`
    /// waits as long as the call takes (handlers, which are never replayed).
    evict_after: Option<Duration>,
    /// Why the last LLM answer is incomplete, when it was cut at `max_tokens`.
    pub(crate) cut_answer: Option<String>,
    /// `wasi:http`: the grant, the requests waiting for the run's eviction.
    pub(crate) outbound: http::Outbound,
    stderr: MemoryOutputPipe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    Cancelled,
    CpuBudget,
}

impl HostState {
    /// The state of one run of `call`, going on from `journal`.
    pub(crate) fn new(call: &Call, journal: Journal) -> Self {
        let (caps, context, limits) = (call.caps.clone(), call.context.clone(), &call.limits);
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let frozen = FrozenClock::at_creation_of(&context.job_id);
        let seed = random_seed(&context);
        let insecure_seed = u128::from_le_bytes(seed[..16].try_into().expect("16 bytes"));
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .wall_clock(frozen)
            .monotonic_clock(frozen)
            .secure_random(StdRng::from_seed(seed))
            .insecure_random(StdRng::from_seed(Sha256::digest(seed).into()))
            .insecure_random_seed(insecure_seed)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: crate::runtime::Limiter::new(limits.memory_bytes),
            meter: Arc::default(),
            cpu_budget: limits.cpu,
            caps,
            context,
            cancel: call.cancel.clone(),
            progress: call.progress.clone(),
            interrupted: None,
            budgets: limits.budgets,
            exceeded: None,
            diverged: None,
            job_max_tokens: call.job_max_tokens,
            journal,
            evict_after: call.evict_after,
            cut_answer: None,
            outbound: http::Outbound::new(call.http.clone(), call.evict_after.is_some()),
            stderr,
        }
    }

    /// The journaled answer to `request` when this run replays an earlier one's calls, `None`
    /// when the call is to be made; another call than the journaled one fails the try.
    pub(crate) fn replayed(&mut self, request: &Request) -> wasmtime::Result<Option<Answer>> {
        if self.outbound.has_pending() {
            // Its place in the journal is after the pending requests' answers.
            self.outbound.evict();
            return Err(wasmtime::Error::msg(
                "evicted while an outbound request waits (not a failure: the stage runs again)",
            ));
        }
        self.journal.replay(request).map_err(|diverged| {
            let error = wasmtime::Error::msg(diverged.to_string());
            self.diverged = Some(diverged);
            error
        })
    }

    /// The answer of a call started in `task`, if it comes within `evict_after`. Past that the
    /// task is left in the journal and the guest is stopped, so that its instance can go; the
    /// runner awaits the answer and runs the stage again (`runtime::invoke`).
    pub(crate) async fn answer_of(
        &mut self,
        request: Request,
        mut task: AbortOnDropHandle<journal::Answered>,
    ) -> wasmtime::Result<Answer> {
        let joined = match self.evict_after {
            None => Some((&mut task).await),
            Some(after) => tokio::time::timeout(after, &mut task).await.ok(),
        };
        let Some(joined) = joined else {
            self.journal.waiting = Some(journal::Waiting { request, task });
            return Err(wasmtime::Error::msg(
                "evicted while a host call waits (not a failure: the stage runs again)",
            ));
        };
        let answered =
            joined.map_err(|e| wasmtime::Error::msg(format!("a host call failed: {e}")))?;
        self.journal.llm_calls.extend(answered.llm_calls);
        self.journal.record(request, answered.answer.clone());
        // An answer that cost something is kept before the guest sees it.
        self.journal
            .flush()
            .await
            .map_err(|e| wasmtime::Error::msg(format!("{e:#}")))?;
        Ok(answered.answer)
    }

    /// What the guest wrote to stderr (a Rust panic message, typically), trimmed.
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.contents())
            .trim()
            .to_string()
    }
}

/// The seed of a try's random bytes: the same for every run of the try (a replay must see the
/// bytes its first run saw), another for every try, item and stage.
fn random_seed(context: &Context) -> [u8; 32] {
    let mut seed = Sha256::new();
    for part in [&context.job_id, &context.item_id, &context.stage] {
        seed.update((part.len() as u64).to_le_bytes());
        seed.update(part.as_bytes());
    }
    seed.update(context.item_index.to_le_bytes());
    seed.update(context.attempt.to_le_bytes());
    seed.finalize().into()
}

/// The only clock a guest sees: the job's creation time (from its UUIDv7 id), frozen, and a
/// monotonic clock that stays at 0. Time is the host's to measure and limit (`cpu_ms`,
/// `timeout_ms`); a stage that read the real clock would also give other answers on a retry or
/// a replay after a crash.
#[derive(Clone, Copy)]
struct FrozenClock {
    since_epoch: Duration,
}

impl FrozenClock {
    fn at_creation_of(job_id: &str) -> Self {
        let since_epoch = uuid::Uuid::parse_str(job_id)
            .ok()
            .and_then(|id| id.get_timestamp())
            .map_or(Duration::ZERO, |t| {
                let (secs, nanos) = t.to_unix();
                Duration::new(secs, nanos)
            });
        Self { since_epoch }
    }
}

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        self.since_epoch
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl crate::runtime::bindings::types::Host for HostState {}
