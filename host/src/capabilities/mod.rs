//! The host side of each WIT import, and the per-invocation state they run in.
//!
//! A guest gets nothing but these: `llm` (the provider, its key and its limits stay here), `kv`
//! (read-only JSON namespaces), `dispatch` (handlers and durable effects), `progress`, `log`,
//! and for handlers `records`. WASI is linked only because Rust's std imports it; its context
//! is empty (no files, sockets, name lookups, environment or arguments), its clocks are frozen
//! ([`FrozenClock`]), and stderr is captured so that a panicking guest's message ends up in the
//! item's error. Random bytes are the one thing WASI gives as it is. docs/SANDBOX.md lists it all.

mod budget;
mod dispatch;
mod kv;
mod llm;
mod log;
mod progress;
mod records;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub(crate) use self::budget::Counted;
pub use self::kv::{KvNamespaces, NamespaceInfo, ReloadError};
pub use self::llm::{LlmProviders, LlmUsage, Provider};
pub use self::progress::{ProgressSink, ProgressUpdate};
use crate::events::TokenHub;
use crate::runtime::bindings::types::Context;
use crate::runtime::{EpochClock, HandlerComponent, Runtime};
use crate::store::Store;

/// What the imports reach: shared by every invocation of a pipeline.
pub struct Capabilities {
    pub runtime: Arc<Runtime>,
    pub llm: LlmProviders,
    pub kv: Arc<KvNamespaces>,
    pub handlers: BTreeMap<String, Arc<HandlerComponent>>,
    pub store: Store,
    /// Checkpoints, results and dead letters of items: `store`, or a shared backend.
    pub items: Arc<dyn crate::store::ItemStore>,
    /// Where effect keys are claimed across nodes (Redis mode), before `store` records them.
    pub effect_keys: Option<Arc<dyn EffectKeys>>,
    /// Woken when an effect is recorded, so the effect runner need not poll.
    pub effects_waiting: Notify,
    /// Where `llm.chat-stream` sends the pieces of an answer as they arrive.
    pub tokens: TokenHub,
}

/// Claims of effect keys that several nodes see: the first claim of (handler, key) wins, so an
/// effect runs at most once whichever node's item emits it.
#[async_trait::async_trait]
pub trait EffectKeys: Send + Sync {
    /// `true` when this claim is the first.
    async fn claim(&self, handler: &str, key: &str) -> anyhow::Result<bool>;
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
    pub(crate) meter: CpuMeter,
    /// Set by the epoch callback when it stops the guest, to say why.
    pub(crate) interrupted: Option<Interrupt>,
    /// What this try may do through host calls, and what it has used.
    pub(crate) budgets: crate::limits::Budgets,
    pub(crate) spent: budget::Spent,
    /// Set by a host call that found a budget used up: why the try failed.
    pub(crate) exceeded: Option<String>,
    /// The job's LLM token budget, if it has one.
    pub(crate) job_max_tokens: Option<u64>,
    /// The LLM requests this try made, for its result.
    pub(crate) llm_calls: Vec<crate::store::LlmCall>,
    /// Why the last LLM answer is incomplete, when it was cut at `max_tokens`.
    pub(crate) cut_answer: Option<String>,
    stderr: MemoryOutputPipe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    Cancelled,
    CpuBudget,
}

/// Guest time accounting: elapsed time minus the time spent awaiting async host calls (the
/// LLM, handlers). Kept twice: in epoch ticks, which the epoch callback reads cheaply to enforce
/// the budget, and precisely, for what results report.
pub(crate) struct CpuMeter {
    clock: Arc<EpochClock>,
    started_tick: u64,
    host_ticks: u64,
    started: Instant,
    host_time: Duration,
    pub(crate) budget_ticks: u64,
}

impl CpuMeter {
    pub(crate) fn guest_ticks(&self) -> u64 {
        (self.clock.now() - self.started_tick).saturating_sub(self.host_ticks)
    }

    pub(crate) fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.host_time)
    }

    /// Time spent awaiting `future` is not the guest's.
    pub(crate) async fn host_call<F: Future>(&mut self, future: F) -> F::Output {
        let (tick, instant) = (self.clock.now(), Instant::now());
        let output = future.await;
        self.host_ticks += self.clock.now() - tick;
        self.host_time += instant.elapsed();
        output
    }
}

impl HostState {
    pub(crate) fn new(
        caps: Arc<Capabilities>,
        context: Context,
        limits: &crate::config::Limits,
        cancel: CancellationToken,
        progress: Option<ProgressSink>,
        job_max_tokens: Option<u64>,
    ) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let frozen = FrozenClock::at_creation_of(&context.job_id);
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .wall_clock(frozen)
            .monotonic_clock(frozen)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let clock = caps.runtime.clock().clone();
        let budget = (limits.cpu.as_millis() / crate::runtime::TICK.as_millis()).max(1) as u64;
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: crate::runtime::Limiter::new(limits.memory_bytes),
            meter: CpuMeter {
                started_tick: clock.now(),
                clock,
                host_ticks: 0,
                started: Instant::now(),
                host_time: Duration::ZERO,
                budget_ticks: budget,
            },
            caps,
            context,
            cancel,
            progress,
            interrupted: None,
            budgets: limits.budgets,
            spent: budget::Spent::default(),
            exceeded: None,
            job_max_tokens,
            llm_calls: Vec::new(),
            cut_answer: None,
            stderr,
        }
    }

    /// What the guest wrote to stderr (a Rust panic message, typically), trimmed.
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.contents())
            .trim()
            .to_string()
    }
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
