//! A pipeline, loaded: its stages and handlers compiled and pre-instantiated, its capabilities
//! (LLM client, kv namespaces, store) ready. What the job runner and the server share.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use arc_swap::{ArcSwap, ArcSwapOption};
use futures::future::try_join_all;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::capabilities::Journal;
use crate::runtime::Call;
use crate::runtime::bindings::types::Context;

use crate::backend::EffectKeys;
use crate::backend::ItemStore;
use crate::capabilities::{Capabilities, KvNamespaces, LlmProviders};
use crate::config::{PipelineConfig, StageConfig};
use crate::events::TokenHub;
use crate::memory::MemoryBudget;
use crate::runtime::{HandlerComponent, Runtime, RuntimeOptions, StageComponent};
use crate::store::Store;

pub struct Pipeline {
    pub config: PipelineConfig,
    pub caps: Arc<Capabilities>,
    pub stages: Vec<Stage>,
    /// `[run] max_stage_calls`: a stage run holds one while its instance is alive, so the
    /// instance pool is never exhausted however many jobs run (waiting beats failing).
    stage_calls: Arc<Semaphore>,
    /// `[run] memory_budget_mib`: what items in flight are charged against, across every job.
    pub memory: MemoryBudget,
}

/// One stage of the pipeline: its configuration and the version new items get.
pub struct Stage {
    pub config: StageConfig,
    /// Read once at stage entry: a later swap affects the next entry, never a running item.
    current: ArcSwap<StageComponent>,
    /// Versions swapped out, oldest first, for rollback; at most [`KEPT_VERSIONS`].
    previous: Mutex<Vec<Arc<StageComponent>>>,
    /// A version on trial: a share of the items get it instead of `current`.
    canary: ArcSwapOption<Canary>,
    permits: Option<Semaphore>,
}

/// A version that `percent` % of the items entering the stage get, chosen by item id so that an
/// item keeps its version across retries, restarts and reprocessing.
pub struct Canary {
    pub version: Arc<StageComponent>,
    pub percent: u8,
}

impl Canary {
    /// Whether `item` is in the canary's share. Item ids are UUID v5 (a hash), so their low bits
    /// spread items evenly.
    pub fn takes(&self, item: uuid::Uuid) -> bool {
        (item.as_u128() % 100) < u128::from(self.percent)
    }
}

/// Previous versions kept per stage for rollback.
pub const KEPT_VERSIONS: usize = 5;

impl Stage {
    /// The version most items entering the stage now get.
    pub fn current(&self) -> Arc<StageComponent> {
        self.current.load_full()
    }

    /// The version `item` gets entering the stage now: the canary's if it is in its share.
    pub fn version_for(&self, item: uuid::Uuid) -> Arc<StageComponent> {
        match &*self.canary.load() {
            Some(canary) if canary.takes(item) => canary.version.clone(),
            _ => self.current(),
        }
    }

    pub fn canary(&self) -> Option<Arc<Canary>> {
        self.canary.load_full()
    }

    /// Put `canary` on trial (replacing any other), or end the trial with `None`.
    pub fn set_canary(&self, canary: Option<Canary>) {
        self.canary.store(canary.map(Arc::new));
    }

    /// Versions that can be rolled back to, newest last.
    pub fn previous(&self) -> Vec<Arc<StageComponent>> {
        self.previous.lock().expect("not poisoned").clone()
    }

    /// Make `version` the one new entries get (ending any canary trial); items already in the
    /// stage finish on theirs.
    pub fn swap(&self, version: Arc<StageComponent>) {
        let mut previous = self.previous.lock().expect("not poisoned");
        let old = self.current.swap(version);
        self.canary.store(None);
        previous.push(old);
        if previous.len() > KEPT_VERSIONS {
            previous.remove(0);
        }
    }

    /// Set the current version and the ones before it (restoring installed versions).
    pub fn restore(&self, current: Arc<StageComponent>, previous: Vec<Arc<StageComponent>>) {
        let mut kept = self.previous.lock().expect("not poisoned");
        *kept = previous;
        self.current.store(current);
    }

    /// Go back to the version before the current one; `None` if there is none.
    pub fn rollback(&self) -> Option<Arc<StageComponent>> {
        let mut previous = self.previous.lock().expect("not poisoned");
        let back = previous.pop()?;
        self.current.store(back.clone());
        Some(back)
    }

    /// Wait for room under the stage's own concurrency limit, if it has one.
    pub async fn enter(&self) -> Option<SemaphorePermit<'_>> {
        match &self.permits {
            Some(permits) => Some(
                permits
                    .acquire()
                    .await
                    .expect("stage semaphores are never closed"),
            ),
            None => None,
        }
    }
}

/// Backends for the state that several nodes share (Redis mode); what is `None` stays in the
/// embedded store.
#[derive(Clone, Default)]
pub struct Shared {
    pub items: Option<Arc<dyn ItemStore>>,
    pub effect_keys: Option<Arc<dyn EffectKeys>>,
}

impl Pipeline {
    /// The runtime sized for `config`: enough instance slots for every stage run, as many
    /// `dispatch.call` handlers (`Capabilities::handler_calls`) and every running effect.
    pub fn runtime_for(config: &PipelineConfig, data_dir: &Path) -> Result<Arc<Runtime>> {
        let max_instances =
            (config.run.max_stage_calls * 2 + config.run.effect_concurrency + 16) as u32;
        Runtime::new(RuntimeOptions {
            max_instances,
            max_memory_bytes: config.max_memory_bytes(),
            cache_dir: data_dir.join("compiled"),
        })
    }

    /// Load every component (in parallel) and the capabilities, on the embedded store alone.
    pub async fn load(
        config: PipelineConfig,
        runtime: Arc<Runtime>,
        store: Store,
    ) -> Result<Arc<Self>> {
        Self::load_shared(config, runtime, store, Shared::default()).await
    }

    /// [`Pipeline::load`], with the state several nodes share kept in `shared` (Redis mode).
    pub async fn load_shared(
        config: PipelineConfig,
        runtime: Arc<Runtime>,
        store: Store,
        shared: Shared,
    ) -> Result<Arc<Self>> {
        let handlers = try_join_all(config.handlers.iter().map(|(name, h)| {
            let runtime = &runtime;
            async move {
                Ok::<_, anyhow::Error>((
                    name.clone(),
                    HandlerComponent::load(runtime, name, &h.component, h.limits).await?,
                ))
            }
        }))
        .await?
        .into_iter()
        .collect();
        let components = try_join_all(
            config
                .stages
                .iter()
                .map(|s| StageComponent::load(&runtime, &s.name, &s.component)),
        )
        .await?;
        let stages = config
            .stages
            .iter()
            .zip(components)
            .map(|(config, component)| Stage {
                config: config.clone(),
                current: ArcSwap::new(component),
                previous: Mutex::default(),
                canary: ArcSwapOption::empty(),
                permits: config.concurrency.map(Semaphore::new),
            })
            .collect();
        let llm = LlmProviders::new(
            &config.llm,
            config
                .stages
                .iter()
                .map(|s| (s.name.as_str(), s.providers.as_slice())),
        )?;
        let kv = Arc::new(KvNamespaces::load(&config.kv)?);
        let caps = Arc::new(Capabilities {
            runtime,
            llm,
            kv,
            handlers,
            items: shared.items.unwrap_or_else(|| Arc::new(store.clone())),
            effect_keys: shared.effect_keys,
            store,
            effects_waiting: Notify::new(),
            tokens: TokenHub::default(),
            handler_calls: Arc::new(Semaphore::new(config.run.max_stage_calls)),
        });
        Ok(Arc::new(Self {
            stage_calls: Arc::new(Semaphore::new(config.run.max_stage_calls)),
            memory: MemoryBudget::new(config.run.memory_budget_mib),
            config,
            caps,
            stages,
        }))
    }

    /// A call of a stage of this pipeline in `context`, with the pipeline's instance slots and
    /// eviction; the other fields are the job's.
    pub fn stage_call(&self, context: Context, limits: crate::config::Limits) -> Call {
        Call {
            caps: self.caps.clone(),
            context,
            limits,
            cancel: tokio_util::sync::CancellationToken::new(),
            progress: None,
            job_max_tokens: None,
            slots: Some(self.stage_calls.clone()),
            evict_after: self.config.run.evict_after(),
            journal: Journal::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.caps.store
    }

    /// Where items keep their checkpoints, results and dead letters.
    pub fn items(&self) -> &dyn ItemStore {
        self.caps.items.as_ref()
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.config.name == name)
    }
}
