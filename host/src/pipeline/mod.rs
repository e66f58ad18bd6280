//! A pipeline, loaded: its stages and handlers compiled and pre-instantiated, its capabilities
//! (LLM client, kv namespaces) ready, on the resources the node shares between its pipelines.
//!
//! - [`stage`]: one stage: current version, the ones kept for rollback, a canary.
//! - [`resources`]: what every pipeline of a node shares (runtime, store, budgets, slots).
//! - [`registry`]: the pipelines a node serves, by name, and the older revisions jobs still run.
//! - [`revisions`]: every revision served, by content, kept on disk.

mod registry;
mod resources;
pub mod revisions;
mod stage;

use std::sync::Arc;

use anyhow::{Context as _, Result};
use futures::future::try_join_all;
use tokio::sync::Semaphore;

pub use self::registry::{PipelineLookup, Pipelines};
pub use self::resources::{NodeResources, NodeSizing, Shared};
pub use self::revisions::{Manifest, Revisions};
pub use self::stage::{Canary, KEPT_VERSIONS, Stage};
use crate::backend::ItemStore;
use crate::capabilities::http::{Asker, Secrets};
use crate::capabilities::{Capabilities, HttpGrant, Journal, KvNamespaces, LlmProviders};
use crate::config::PipelineConfig;
use crate::memory::MemoryBudget;
use crate::runtime::bindings::types::Context;
use crate::runtime::{Call, HandlerComponent, StageComponent};
use crate::store::Store;

pub struct Pipeline {
    pub config: PipelineConfig,
    /// The content digest of the files this was loaded from (see [`revisions`]).
    pub revision: String,
    pub caps: Arc<Capabilities>,
    pub stages: Vec<Stage>,
    /// The node's instance slots (see [`NodeResources::stage_calls`]).
    stage_calls: Arc<Semaphore>,
    /// The node's memory budget, which items of every pipeline are charged against.
    pub memory: MemoryBudget,
}

impl Pipeline {
    /// Load every component (in parallel) and the capabilities of `config`, which is
    /// `revision`, on the node's `resources`.
    pub async fn load(
        mut config: PipelineConfig,
        revision: String,
        resources: &NodeResources,
    ) -> Result<Arc<Self>> {
        if let Some(url) = &resources.llm_base_url {
            config.llm.point_all_at(url);
        }
        let runtime = &resources.runtime;
        let secrets = Arc::new(
            Secrets::load(&config.secrets)
                .with_context(|| format!("pipeline `{}`", config.name))?,
        );
        let handlers = try_join_all(config.handlers.iter().map(|(name, h)| {
            let asker = Asker {
                pipeline: config.name.clone(),
                component: format!("handler:{name}"),
            };
            let grant = HttpGrant::new(
                h.allowed_hosts.clone(),
                h.limits.http,
                asker,
                secrets.clone(),
            );
            async move {
                Ok::<_, anyhow::Error>((
                    name.clone(),
                    HandlerComponent::load(runtime, name, &h.component, h.limits, Arc::new(grant))
                        .await?,
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
                .map(|s| StageComponent::load(runtime, &s.name, &s.component)),
        )
        .await?;
        let stages = config
            .stages
            .iter()
            .zip(components)
            .map(|(config, component)| Stage::new(config.clone(), component))
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
            pipeline: config.name.clone(),
            revision: revision.clone(),
            runtime: runtime.clone(),
            llm,
            kv,
            handlers,
            items: resources.items.clone(),
            effects: resources.effects.clone(),
            records: resources.records.clone(),
            store: resources.store.clone(),
            tokens: resources.tokens.clone(),
            grants: config
                .stages
                .iter()
                .map(|s| {
                    let asker = Asker {
                        pipeline: config.name.clone(),
                        component: s.name.clone(),
                    };
                    let grant = HttpGrant::new(
                        s.allowed_hosts.clone(),
                        s.limits.http,
                        asker,
                        secrets.clone(),
                    );
                    (s.name.clone(), Arc::new(grant))
                })
                .collect(),
            settings: config
                .stages
                .iter()
                .map(|s| (s.name.clone(), s.settings.clone()))
                .collect(),
            handler_calls: resources.handler_calls.clone(),
        });
        Ok(Arc::new(Self {
            stage_calls: resources.stage_calls.clone(),
            memory: resources.memory.clone(),
            config,
            revision,
            caps,
            stages,
        }))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// A call of a stage of this pipeline in `context`, with the node's instance slots and the
    /// pipeline's eviction; the other fields are the job's.
    pub fn stage_call(&self, context: Context, limits: crate::config::Limits) -> Call {
        Call {
            caps: self.caps.clone(),
            limits,
            cancel: tokio_util::sync::CancellationToken::new(),
            progress: None,
            job_max_tokens: None,
            slots: Some(self.stage_calls.clone()),
            evict_after: self.config.run.evict_after(),
            journal: Journal::default(),
            http: self
                .caps
                .grants
                .get(&context.stage)
                .cloned()
                .unwrap_or_else(HttpGrant::none),
            context,
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
