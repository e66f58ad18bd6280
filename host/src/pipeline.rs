//! A pipeline, loaded: its stages and handlers compiled and pre-instantiated, its capabilities
//! (LLM client, kv namespaces, store) ready. What the job runner and the server share.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use futures::future::try_join_all;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::capabilities::{Capabilities, KvNamespaces, LlmClient};
use crate::config::{PipelineConfig, StageConfig};
use crate::events::TokenHub;
use crate::runtime::{HandlerComponent, Runtime, RuntimeOptions, StageComponent};
use crate::store::Store;

pub struct Pipeline {
    pub config: PipelineConfig,
    pub caps: Arc<Capabilities>,
    pub stages: Vec<Stage>,
}

/// One stage of the pipeline: its configuration and the version new items get.
pub struct Stage {
    pub config: StageConfig,
    /// Read once at stage entry: a later swap affects the next entry, never a running item.
    current: ArcSwap<StageComponent>,
    /// Versions swapped out, oldest first, for rollback; at most [`KEPT_VERSIONS`].
    previous: Mutex<Vec<Arc<StageComponent>>>,
    permits: Option<Semaphore>,
}

/// Previous versions kept per stage for rollback.
pub const KEPT_VERSIONS: usize = 5;

impl Stage {
    /// The version to use for an item entering the stage now.
    pub fn current(&self) -> Arc<StageComponent> {
        self.current.load_full()
    }

    /// Versions that can be rolled back to, newest last.
    pub fn previous(&self) -> Vec<Arc<StageComponent>> {
        self.previous.lock().expect("not poisoned").clone()
    }

    /// Make `version` the one new entries get; items already in the stage finish on theirs.
    pub fn swap(&self, version: Arc<StageComponent>) {
        let mut previous = self.previous.lock().expect("not poisoned");
        let old = self.current.swap(version);
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

impl Pipeline {
    /// The runtime sized for `config`: enough instance slots for every item in flight (a
    /// stage plus the handler it calls) and every running effect.
    pub fn runtime_for(config: &PipelineConfig, data_dir: &Path) -> Result<Arc<Runtime>> {
        let max_instances =
            (config.run.concurrency * 2 + config.run.effect_concurrency + 16) as u32;
        Runtime::new(RuntimeOptions {
            max_instances,
            max_memory_bytes: config.max_memory_bytes(),
            cache_dir: data_dir.join("compiled"),
        })
    }

    /// Load every component (in parallel) and the capabilities.
    pub async fn load(
        config: PipelineConfig,
        runtime: Arc<Runtime>,
        store: Store,
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
                permits: config.concurrency.map(Semaphore::new),
            })
            .collect();
        let llm = LlmClient::new(&config.llm).context("`[llm]`")?;
        let kv = Arc::new(KvNamespaces::load(&config.kv)?);
        let caps = Arc::new(Capabilities {
            runtime,
            llm,
            kv,
            handlers,
            store,
            effects_waiting: Notify::new(),
            tokens: TokenHub::default(),
        });
        Ok(Arc::new(Self {
            config,
            caps,
            stages,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.caps.store
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.config.name == name)
    }
}
