//! The composition root: a node is built here once, whatever command runs it.
//!
//! [`Node::start`] opens the store, sets up the resources every pipeline shares (runtime,
//! memory budget, instance slots), loads the pipelines on the chosen backend (the embedded
//! store, or Redis shared with other nodes), puts back the stage versions installed while
//! serving, and starts what every mode needs: the effect runner, and either the embedded job
//! manager or the Redis work loop. The services only some commands
//! want (file watchers, the retention sweeper, dead-letter reprocessing) are added by the
//! command with the `Node` methods of the same name, so a mode starts only what it uses.
//!
//! [`Node::shutdown`] stops everything in one order: no new work and the drain of items in
//! flight first, then the services, then a flush of the store.
//! Commands (`cli/`) parse their arguments into [`NodeSettings`] and put their own front on
//! top: HTTP (`serve`), nothing (`worker`), one job and a progress bar (`run`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::embedded::{Embedded, EventLog, JobManager};
use crate::backend::redis::{Cluster, WorkerSettings, run_worker};
use crate::backend::{Backend, Changes};
use crate::config::PipelineConfig;
use crate::deploy::Deployer;
use crate::follow::Follower;
use crate::jobs::EffectRunner;
use crate::kv_reloads::KvReloads;
use crate::pipeline::revisions::short;
use crate::pipeline::{NodeResources, NodeSizing, Pipeline, Pipelines, Revisions, Shared};
use crate::store::Store;
use crate::versions::StageVersions;

/// What a command decides about the node it runs.
pub struct NodeSettings {
    /// Where the store, compiled components and installed stage versions are kept.
    pub data_dir: PathBuf,
    pub backend: BackendSettings,
    /// At shutdown, how long items in flight get to finish.
    pub drain: Duration,
    /// Finished jobs are removed (embedded) or expire from Redis this long after they end.
    pub retention: Duration,
    /// Run the stage versions installed while serving (hot swaps) instead of the pipeline
    /// file's; `stagehand run` runs the file as written.
    pub restore_versions: bool,
    /// Send every pipeline's LLM requests here instead of its providers' `base_url`
    /// (`--llm-base-url`): pipelines deployed later and older revisions included.
    pub llm_base_url: Option<String>,
}

/// Where jobs, items, results and event logs live.
pub enum BackendSettings {
    /// This process's sled store; `background_flush: false` is for tests that check only the
    /// flushes the code makes itself.
    Embedded { background_flush: bool },
    /// Redis, shared with other nodes.
    Redis(RedisSettings),
}

/// How a node joins the others through Redis.
pub struct RedisSettings {
    /// `redis://host:port/db`.
    pub url: String,
    /// Items this node runs at once; 0 makes a node that serves the API and runs none.
    pub slots: usize,
    /// Work pending this long on a node that stopped refreshing it is taken over.
    pub reclaim_idle: Duration,
}

/// A running node: its pipelines, its backend, and the services started for it.
pub struct Node {
    pub pipelines: Arc<Pipelines>,
    /// What the pipelines share.
    pub resources: NodeResources,
    /// This node's embedded store (in Redis mode: stage versions, effects and handler records).
    pub store: Store,
    pub versions: StageVersions,
    /// Every revision served, and which ones were deployed.
    pub revisions: Revisions,
    /// Deploys pipelines while the node runs (in Redis mode, on every node).
    pub deployer: Arc<Deployer>,
    /// Reloads kv namespaces (in Redis mode, on every node).
    pub kv_reloads: KvReloads,
    /// Where jobs live.
    pub backend: Backend,
    /// Runs the effects of the node's queue (not on a Redis-mode node that runs no work).
    pub effects: Option<Arc<EffectRunner>>,
    drain: Duration,
    retention: Duration,
    /// Ends the Redis work loop (first, at shutdown).
    stop_work: CancellationToken,
    work: Option<JoinHandle<Result<()>>>,
    /// Ends every other service.
    stop_services: CancellationToken,
    effects_task: Option<JoinHandle<Result<()>>>,
    /// The services a command added, named for the log.
    services: Vec<(&'static str, JoinHandle<()>)>,
}

impl Node {
    /// Build the node serving `configs` (distinct names, at least one) and start what every
    /// mode needs; see the module's doc comment.
    pub async fn start(mut configs: Vec<PipelineConfig>, settings: NodeSettings) -> Result<Self> {
        check_distinct_names(&configs)?;
        let data_dir = &settings.data_dir;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let stop_work = CancellationToken::new();
        let stop_services = CancellationToken::new();
        // `work`: how the Redis work loop runs, when this node runs items (started once the
        // stage versions are restored).
        let (store, shared, cluster, work) = match &settings.backend {
            BackendSettings::Embedded { background_flush } => {
                let store = Store::open_with(&data_dir.join("store"), *background_flush)?;
                (store, Shared::default(), None, None)
            }
            BackendSettings::Redis(redis) => {
                let cluster =
                    Cluster::connect(&redis.url, settings.retention, stop_work.clone()).await?;
                let store = Store::open(&data_dir.join("store"))?;
                let work = (redis.slots > 0).then_some(WorkerSettings {
                    slots: redis.slots,
                    reclaim_idle: redis.reclaim_idle,
                    drain: settings.drain,
                });
                let shared = cluster.shared(redis.reclaim_idle, stop_services.clone());
                (store, shared, Some(cluster), work)
            }
        };
        // Redis mode: operators' changes are the cluster's (see `crate::follow`).
        let changes = cluster
            .as_ref()
            .map(|cluster| Arc::new(cluster.clone()) as Arc<dyn Changes>);
        let revisions = Revisions::open(&store, data_dir, changes.clone())?;
        // Pipelines the cluster deleted are not served, but still size the node: a deploy of
        // one of them must fit.
        let mut set_aside = Vec::new();
        for removed in crate::deploy::adopt(&revisions).await? {
            if let Some(at) = configs.iter().position(|c| c.name == removed) {
                let config = configs.remove(at);
                tracing::warn!(pipeline = %removed, file = %config.source.display(), "the cluster deleted this pipeline: not served (deploy it to serve it again)");
                set_aside.push(config);
            }
        }
        let served = what_to_serve(configs, &revisions)?;
        for (_, revision) in &served {
            revisions.share_kept(revision).await?;
        }
        let sizing = NodeSizing::of(served.iter().map(|(config, _)| config).chain(&set_aside));
        let mut resources = NodeResources::new(sizing, data_dir, store.clone(), shared)?;
        resources.llm_base_url = settings.llm_base_url.clone();
        let loaded = futures::future::try_join_all(served.into_iter().map(|(config, revision)| {
            let name = config.name.clone();
            let resources = &resources;
            async move {
                Pipeline::load(config, revision, resources)
                    .await
                    .with_context(|| format!("pipeline `{name}`"))
            }
        }))
        .await?;
        let pipelines = Arc::new(Pipelines::new(loaded, revisions.clone(), resources.clone()));
        let backend = match cluster {
            Some(cluster) => {
                cluster.serve(pipelines.clone());
                cluster.carry_tokens(&resources.tokens, stop_services.clone());
                Backend::Redis(cluster)
            }
            None => {
                let events = EventLog::new(&store)?;
                Backend::Embedded(Arc::new(Embedded {
                    manager: JobManager::new(pipelines.clone(), store.clone(), events.clone()),
                    store: store.clone(),
                    events,
                }))
            }
        };
        let versions = StageVersions::open(&store, data_dir, changes.clone())?;
        if settings.restore_versions {
            let only = pipelines.only().is_some();
            let deployed = revisions.deployed()?;
            for pipeline in pipelines.all() {
                let is_deployed = deployed.get(pipeline.name()) == Some(&pipeline.revision);
                let restored = versions.restore(&pipeline, only, is_deployed).await?;
                if restored > 0 {
                    tracing::info!(
                        pipeline = %pipeline.name(),
                        restored,
                        "stages run the versions installed before the restart"
                    );
                }
            }
        }
        let deployer = Arc::new(Deployer::new(
            pipelines.clone(),
            revisions.clone(),
            resources.clone(),
        ));
        let kv_reloads = KvReloads::new(changes.clone());
        // Redis mode: the cluster's changes win over this node's, before it takes work.
        let mut services = Vec::new();
        if let Some(changes) = changes {
            let follower = Follower {
                changes,
                pipelines: pipelines.clone(),
                deployer: deployer.clone(),
                versions: versions.clone(),
                kv: kv_reloads.clone(),
            };
            let task = follower.start(stop_services.clone()).await?;
            services.push(("the change follower", task));
        }
        // Effects cut short by a crash may have happened: not run again (at most once). In
        // Redis mode the cluster's queue does this for a node that stopped (see
        // `backend::redis::effects`), and only nodes that run work run effects.
        let runs_effects = match &backend {
            Backend::Embedded(_) => {
                let interrupted = store.interrupt_running_effects()?;
                if interrupted > 0 {
                    tracing::warn!(
                        interrupted,
                        "effects were running when the node stopped; marked interrupted"
                    );
                }
                true
            }
            Backend::Redis(_) => work.is_some(),
        };
        let (effects, effects_task) = if runs_effects {
            let (runner, task) =
                EffectRunner::spawn(&resources, pipelines.clone(), stop_services.clone());
            (Some(runner), Some(task))
        } else {
            (None, None)
        };
        let work = match (&backend, work) {
            (Backend::Redis(cluster), Some(work)) => Some(tokio::spawn(run_worker(
                cluster.clone(),
                pipelines.clone(),
                work,
                stop_work.clone(),
            ))),
            _ => None,
        };
        Ok(Self {
            pipelines,
            resources,
            store,
            versions,
            deployer,
            kv_reloads,
            revisions,
            backend,
            effects,
            drain: settings.drain,
            retention: settings.retention,
            work,
            stop_work,
            effects_task,
            stop_services,
            services,
        })
    }

    /// The pipelines served from files of the command line: a deployed revision's files are
    /// kept by content and never change.
    fn served_from_files(&self) -> Result<Vec<Arc<Pipeline>>> {
        let deployed = self.revisions.deployed()?;
        let mut pipelines = self.pipelines.all();
        pipelines.retain(|p| deployed.get(p.name()) != Some(&p.revision));
        Ok(pipelines)
    }

    /// Reload each kv namespace of each pipeline when its file changes (refreshing a lookup
    /// table must not need a restart).
    pub fn watch_kv(&mut self) -> Result<()> {
        for pipeline in self.served_from_files()? {
            let task = self
                .kv_reloads
                .watch(pipeline, self.stop_services.clone())?;
            self.add_service("a kv watcher", task);
        }
        Ok(())
    }

    /// Install a stage's component file as its new version whenever the file changes.
    pub fn watch_components(&mut self) -> Result<()> {
        for pipeline in self.served_from_files()? {
            let task = self.versions.watch(pipeline, self.stop_services.clone())?;
            self.add_service("a component watcher", task);
        }
        Ok(())
    }

    /// Remove finished jobs, their results and event logs `retention` after they end, checking
    /// every `every`. Embedded mode only: in Redis mode a finished job's keys expire by
    /// themselves, so nothing is started.
    pub fn sweep_finished_jobs(&mut self, every: Duration) {
        let Backend::Embedded(embedded) = &self.backend else {
            return;
        };
        let task = crate::backend::embedded::retention::spawn_sweeper(
            self.store.clone(),
            embedded.events.clone(),
            self.retention,
            every,
            self.stop_services.clone(),
        );
        self.add_service("the retention sweeper", task);
    }

    /// Reprocess dead letters whose failure may pass, every `every`, at most `max_rounds`
    /// times each (in Redis mode, one node of those asked at a time).
    pub fn reprocess_dead_letters(&mut self, every: Duration, max_rounds: u32) {
        let task = crate::backend::auto_reprocess::spawn(
            self.backend.jobs(),
            every,
            max_rounds,
            self.stop_services.clone(),
        );
        self.add_service("dead-letter reprocessing", task);
    }

    /// Jobs a crash or an impatient shutdown left running go on where they stopped (embedded
    /// mode; in Redis mode other nodes reclaim them). Returns how many.
    pub async fn resume_unfinished_jobs(&self) -> Result<usize> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.manager.resume_unfinished().await,
            Backend::Redis(_) => Ok(0),
        }
    }

    /// Stop taking work and give items in flight the drain time, then stop every service
    /// and flush the store.
    pub async fn shutdown(self) -> Result<()> {
        if let Backend::Embedded(embedded) = &self.backend {
            let still_running = embedded.manager.wait(self.drain).await;
            if still_running > 0 {
                tracing::warn!(
                    still_running,
                    "jobs still running at shutdown; they stay `running` in the store"
                );
            }
        }
        self.stop_work.cancel();
        if let Some(work) = self.work {
            work.await.context("the work loop panicked")??;
        }
        self.stop_services.cancel();
        let effects = match self.effects_task {
            Some(task) => Some(task.await),
            None => None,
        };
        for (name, task) in self.services {
            if let Err(panic) = task.await {
                tracing::error!(%panic, "{name} panicked");
            }
        }
        self.store.flush().await?;
        match effects {
            Some(ended) => ended.context("the effect runner panicked")?,
            None => Ok(()),
        }
    }

    fn add_service(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.services.push((name, task));
    }
}

/// The pipelines a node starts with, each with its revision: the files of the command line
/// (kept as revisions, so a job submitted to one can resume on it whatever the files become),
/// except where a deploy replaced one, and the pipelines deployed at run time.
fn what_to_serve(
    configs: Vec<PipelineConfig>,
    revisions: &Revisions,
) -> Result<Vec<(PipelineConfig, String)>> {
    let mut deployed = revisions.deployed()?;
    let mut served = Vec::new();
    for config in configs {
        let text = std::fs::read(&config.source)
            .with_context(|| format!("cannot read {}", config.source.display()))?;
        let revision = revisions
            .keep_files(&config, &text)
            .with_context(|| format!("cannot keep the files of {}", config.source.display()))?;
        match deployed.remove(&config.name) {
            Some(deployed) if deployed != revision => {
                tracing::warn!(
                    pipeline = %config.name,
                    file = %config.source.display(),
                    revision = %short(&deployed),
                    "a deploy replaced this pipeline's file: the deployed revision is served \
                     (delete the pipeline, or deploy the file, to serve the file again)"
                );
                served.push((revisions.config(&deployed)?, deployed));
            }
            _ => served.push((config, revision)),
        }
    }
    for (name, revision) in deployed {
        let config = revisions
            .config(&revision)
            .with_context(|| format!("deployed pipeline `{name}`"))?;
        served.push((config, revision));
    }
    Ok(served)
}

/// Two pipelines of one node cannot share a name: jobs, routes and stage versions find them by
/// it.
fn check_distinct_names(configs: &[PipelineConfig]) -> Result<()> {
    if configs.is_empty() {
        bail!("a node needs at least one pipeline file");
    }
    for (at, config) in configs.iter().enumerate() {
        if let Some(other) = configs[..at].iter().find(|c| c.name == config.name) {
            bail!(
                "{} and {} both name their pipeline `{}`: a node serves one pipeline per name",
                other.source.display(),
                config.source.display(),
                config.name
            );
        }
    }
    Ok(())
}
