//! wasmtime, set up once per process: the engine, the epoch ticker, the compile cache, and
//! loading and invoking components.
//!
//! - One [`Engine`] with the pooling allocator and copy-on-write memory images: a fresh
//!   instance per item per stage costs tens of microseconds, so no state leaks between items.
//! - Guest CPU is measured with the thread's CPU clock around each poll of an invocation
//!   ([`cpu`]) and enforced by epoch interruption: a ticker advances the epoch every [`TICK`];
//!   the store's callback stops a guest past its budget, and otherwise yields to tokio, so a
//!   busy guest cannot starve the executor.
//! - Compiled components are cached on disk by content hash ([`cache`]).

pub mod bindings;
pub mod cache;
mod component;
mod cpu;
mod invoke;
mod limiter;

pub(crate) use limiter::Limiter;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Result;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use cache::{CacheOutcome, CompileCache, digest};
pub use component::{
    Description, HandlerComponent, LoadedComponent, StageComponent, World, describe,
};
pub use cpu::{CpuMeter, measured};
pub use invoke::{Call, CallStats, Failure, FailureKind};
pub use limiter::MemoryCapExceeded;

/// How often the epoch advances: the resolution of CPU budgets and of cancellation.
pub const TICK: Duration = Duration::from_millis(10);

/// Sizing of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Component instances alive at once (each item in a stage holds one; a `dispatch.call`
    /// holds a second). Instantiation past this waits in the caller's semaphore, not here.
    pub max_instances: u32,
    /// The largest linear memory any component may grow to.
    pub max_memory_bytes: usize,
    /// Where compiled components are kept.
    pub cache_dir: PathBuf,
}

/// The process-wide wasmtime state. Cheap to share: clone the `Arc`.
pub struct Runtime {
    engine: Engine,
    cache: CompileCache,
    /// Set when the runtime is dropped, to end the epoch ticker.
    ticker_stop: Arc<AtomicBool>,
    options: RuntimeOptions,
}

impl Runtime {
    pub fn new(options: RuntimeOptions) -> Result<Arc<Self>> {
        let engine = Engine::new(&engine_config(&options))?;
        let cache = CompileCache::new(&engine, &options.cache_dir)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(engine.weak(), Arc::downgrade(&ticker_stop));
        Ok(Arc::new(Self {
            engine,
            cache,
            ticker_stop,
            options,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn cache(&self) -> &CompileCache {
        &self.cache
    }

    pub fn options(&self) -> &RuntimeOptions {
        &self.options
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config(options: &RuntimeOptions) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.memory_init_cow(true);
    // A reservation the size of the largest cap, instead of wasmtime's 4 GiB + guard per slot,
    // keeps thousands of slots within the address space; the price is explicit bounds checks.
    let max_memory = options.max_memory_bytes.next_multiple_of(64 << 10);
    config.memory_reservation(max_memory as u64);
    config.memory_guard_size(2 << 20);
    config.memory_reservation_for_growth(0);

    let n = options.max_instances;
    let mut pool = PoolingAllocationConfig::default();
    // A Rust wasip2 component holds a few core instances and tables (the guest plus the
    // adapter's shims), but one linear memory.
    pool.total_component_instances(n)
        .total_core_instances(n * 4)
        .total_memories(n * 2)
        .total_tables(n * 4)
        .total_stacks(n)
        .max_memory_size(max_memory)
        // Measured on this machine (docs/BENCHMARKS.md): keeping a little of each slot
        // resident and resetting it with PAGEMAP_SCAN roughly halves instantiation cost.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// Advance the epoch every [`TICK`] until the runtime is dropped.
fn spawn_ticker(engine: wasmtime::EngineWeak, stop: Weak<AtomicBool>) {
    std::thread::Builder::new()
        .name("stagehand-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(TICK);
                let (Some(engine), Some(stop)) = (engine.upgrade(), stop.upgrade()) else {
                    return;
                };
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                engine.increment_epoch();
            }
        })
        .expect("spawn the epoch ticker thread");
}
