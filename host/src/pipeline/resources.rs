//! What every pipeline of a node shares: one runtime (engine and instance pool), one store,
//! one memory budget, one set of instance slots, one effect queue and one live-token hub.
//! A pipeline file's `[run]` sizing settings are the node's: with several files the node takes
//! the largest each asks for ([`NodeSizing::of`]), so no pipeline gets less than its file says.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::Semaphore;

use crate::backend::{EffectQueue, ItemStore, Records};
use crate::config::PipelineConfig;
use crate::events::TokenHub;
use crate::memory::MemoryBudget;
use crate::runtime::{Runtime, RuntimeOptions};
use crate::store::Store;

/// The node-wide sizes, from the pipeline files' `[run]` sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSizing {
    /// `[run] max_stage_calls`: stage instances alive at once across every pipeline.
    pub max_stage_calls: usize,
    /// `[run] memory_budget_mib`: what items in flight are charged against.
    pub memory_budget_mib: u64,
    /// `[run] effect_concurrency`: effects running at once.
    pub effect_concurrency: usize,
    /// The largest memory any component may use: the size of an instance slot.
    pub max_memory_bytes: usize,
}

impl NodeSizing {
    /// The largest of each setting over `configs`.
    pub fn of<'a>(configs: impl IntoIterator<Item = &'a PipelineConfig>) -> Self {
        let mut sizing = Self {
            max_stage_calls: 1,
            memory_budget_mib: crate::memory::MIN_MEMORY_BUDGET_MIB,
            effect_concurrency: 1,
            max_memory_bytes: crate::config::Limits::default().memory_bytes,
        };
        for config in configs {
            sizing.max_stage_calls = sizing.max_stage_calls.max(config.run.max_stage_calls);
            sizing.memory_budget_mib = sizing.memory_budget_mib.max(config.run.memory_budget_mib);
            sizing.effect_concurrency =
                sizing.effect_concurrency.max(config.run.effect_concurrency);
            sizing.max_memory_bytes = sizing.max_memory_bytes.max(config.max_memory_bytes());
        }
        sizing
    }

    /// Why a node of this size cannot give `config` what its file asks for (a pipeline
    /// deployed while the node runs): the node's sizes are fixed when it starts.
    pub fn refuses(&self, config: &PipelineConfig) -> Option<String> {
        let run = &config.run;
        let over = [
            (
                "[run] max_stage_calls",
                run.max_stage_calls as u64,
                self.max_stage_calls as u64,
            ),
            (
                "[run] memory_budget_mib",
                run.memory_budget_mib,
                self.memory_budget_mib,
            ),
            (
                "[run] effect_concurrency",
                run.effect_concurrency as u64,
                self.effect_concurrency as u64,
            ),
            (
                "component memory (bytes)",
                config.max_memory_bytes() as u64,
                self.max_memory_bytes as u64,
            ),
        ]
        .into_iter()
        .filter(|(_, asked, node)| asked > node)
        .map(|(what, asked, node)| format!("{what} {asked} (the node's: {node})"))
        .collect::<Vec<_>>();
        (!over.is_empty()).then(|| {
            format!(
                "the pipeline asks for more than this node was started with: {}; a node's sizes \
                 are fixed at start (the largest over its pipeline files): lower them, or restart \
                 the node with this pipeline among its files",
                over.join(", ")
            )
        })
    }
}

/// Backends for the state that several nodes share (Redis mode); what is `None` stays in the
/// embedded store.
#[derive(Clone, Default)]
pub struct Shared {
    pub items: Option<Arc<dyn ItemStore>>,
    pub effects: Option<Arc<dyn EffectQueue>>,
    pub records: Option<Arc<dyn Records>>,
}

/// See the module's doc comment. Cheap to clone.
#[derive(Clone)]
pub struct NodeResources {
    pub sizing: NodeSizing,
    pub runtime: Arc<Runtime>,
    pub store: Store,
    /// Checkpoints, results and dead letters of items: `store`, or a shared backend.
    pub items: Arc<dyn ItemStore>,
    /// Where effects are queued and claimed: `store`, or a shared backend.
    pub effects: Arc<dyn EffectQueue>,
    /// Handlers' records: `store`, or a shared backend.
    pub records: Arc<dyn Records>,
    /// Where `llm.chat-stream` sends the pieces of an answer as they arrive.
    pub tokens: TokenHub,
    /// A stage run holds one while its instance is alive, so the instance pool is never
    /// exhausted however many jobs run (waiting beats failing).
    pub stage_calls: Arc<Semaphore>,
    /// Handlers running for `dispatch.call` at once: each holds an instance too.
    pub handler_calls: Arc<Semaphore>,
    pub memory: MemoryBudget,
    /// Where every pipeline loaded on this node sends its LLM requests instead of its
    /// providers' `base_url`, if somewhere (`--llm-base-url`).
    pub llm_base_url: Option<String>,
}

impl NodeResources {
    /// A runtime with enough instance slots for every stage run, as many `dispatch.call`
    /// handlers and every running effect, compiling into `<data_dir>/compiled`.
    pub fn new(sizing: NodeSizing, data_dir: &Path, store: Store, shared: Shared) -> Result<Self> {
        let max_instances = (sizing.max_stage_calls * 2 + sizing.effect_concurrency + 16) as u32;
        let runtime = Runtime::new(RuntimeOptions {
            max_instances,
            max_memory_bytes: sizing.max_memory_bytes,
            cache_dir: data_dir.join("compiled"),
        })?;
        Ok(Self {
            sizing,
            runtime,
            items: shared.items.unwrap_or_else(|| Arc::new(store.clone())),
            effects: shared.effects.unwrap_or_else(|| Arc::new(store.clone())),
            records: shared.records.unwrap_or_else(|| Arc::new(store.clone())),
            store,
            tokens: TokenHub::default(),
            stage_calls: Arc::new(Semaphore::new(sizing.max_stage_calls)),
            handler_calls: Arc::new(Semaphore::new(sizing.max_stage_calls)),
            memory: MemoryBudget::new(sizing.memory_budget_mib),
            llm_base_url: None,
        })
    }

    /// Resources for `config` alone, on the embedded store (tests, `stagehand run`).
    pub fn for_one(config: &PipelineConfig, data_dir: &Path, store: Store) -> Result<Self> {
        Self::new(NodeSizing::of([config]), data_dir, store, Shared::default())
    }
}
