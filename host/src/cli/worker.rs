//! `stagehand worker <pipeline.toml> --redis redis://...`: a node that runs items from the
//! shared work stream and serves no HTTP (seed 002 scaled workers apart from the API). Also
//! the Redis options `serve` shares.
//!
//! The first line on stdout is `worker NODE joined redis://...`, once the node reads work.
//! SIGTERM or Ctrl-C: stop taking work, give items in flight `--drain-secs`; what is left is
//! reclaimed by the other nodes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::default_data_dir;
use crate::cluster::{Cluster, WorkerSettings, run_worker};
use crate::config::PipelineConfig;
use crate::jobs::EffectRunner;
use crate::pipeline::Pipeline;
use crate::store::Store;
use crate::versions::StageVersions;

/// How a node joins the others through Redis.
#[derive(Args, Clone)]
pub struct RedisArgs {
    /// Share jobs, items, results, event logs, work and cancels with other nodes through the
    /// Redis at this URL (`redis://host:port/db`); without it, everything stays in this
    /// process's embedded store.
    #[arg(long, env = "STAGEHAND_REDIS_URL")]
    pub redis: Option<String>,
    /// Items this node runs at once (default: the pipeline's `[run] concurrency`); `serve`
    /// with 0 is an API node that runs none.
    #[arg(long)]
    pub slots: Option<usize>,
    /// Work pending this long on a node that stopped refreshing it is taken over (ms).
    #[arg(long, default_value_t = 30_000)]
    pub reclaim_idle_ms: u64,
}

impl RedisArgs {
    pub fn settings(&self, config: &PipelineConfig, drain: Duration) -> WorkerSettings {
        WorkerSettings {
            slots: self.slots.unwrap_or(config.run.concurrency),
            reclaim_idle: Duration::from_millis(self.reclaim_idle_ms.max(100)),
            drain,
        }
    }
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The pipeline file (the same on every node).
    pipeline: PathBuf,
    #[command(flatten)]
    redis: RedisArgs,
    /// Where this node keeps compiled components, stage versions and its handlers' records.
    #[arg(long, default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Send every provider's requests to this LLM API root instead of its `base_url`.
    #[arg(long, env = "STAGEHAND_LLM_BASE_URL")]
    llm_base_url: Option<String>,
    /// On shutdown, how long items in flight get to finish.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// Finished jobs' keys expire from Redis this long after they end.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    retention_secs: u64,
}

/// What a node in Redis mode runs besides HTTP: the pipeline on the shared backends, its
/// effect runner, and the work loop.
pub struct Node {
    pub cluster: Cluster,
    pub pipeline: Arc<Pipeline>,
    pub store: Store,
    pub versions: StageVersions,
    /// The work loop; `None` on an API node (`--slots 0`).
    worker: Option<tokio::task::JoinHandle<Result<()>>>,
    effects: tokio::task::JoinHandle<Result<()>>,
    stop: CancellationToken,
}

impl Node {
    /// Connect to Redis, load the pipeline on the shared backends, and start taking work.
    pub async fn start(
        config: PipelineConfig,
        url: &str,
        redis: &RedisArgs,
        data_dir: &std::path::Path,
        retention: Duration,
        drain: Duration,
    ) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let stop = CancellationToken::new();
        let cluster = Cluster::connect(url, &config.name, retention, stop.clone()).await?;
        let store = Store::open(&data_dir.join("store"))?;
        let settings = redis.settings(&config, drain);
        let runtime = Pipeline::runtime_for(&config, data_dir)?;
        let pipeline =
            Pipeline::load_shared(config, runtime, store.clone(), cluster.shared()).await?;
        let versions = StageVersions::open(&store, data_dir)?;
        versions.restore(&pipeline).await?;
        store.interrupt_running_effects()?;
        let (_runner, effects) = EffectRunner::spawn(
            pipeline.caps.clone(),
            pipeline.config.run.effect_concurrency,
            stop.clone(),
        );
        let worker = (settings.slots > 0).then(|| {
            tokio::spawn(run_worker(
                cluster.clone(),
                pipeline.clone(),
                settings,
                stop.clone(),
            ))
        });
        Ok(Self {
            cluster,
            pipeline,
            store,
            versions,
            worker,
            effects,
            stop,
        })
    }

    /// Stop taking work, let items in flight finish (up to the drain time), flush.
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        if let Some(worker) = self.worker {
            worker.await.context("the work loop panicked")??;
        }
        self.effects.await.context("the effect runner panicked")??;
        self.store.flush().await
    }
}

pub async fn worker(args: WorkerArgs) -> Result<ExitCode> {
    let mut config = PipelineConfig::load(&args.pipeline)?;
    if let Some(url) = args.llm_base_url {
        config.llm.point_all_at(&url);
    }
    let url = args
        .redis
        .redis
        .clone()
        .context("`stagehand worker` needs `--redis URL` (or STAGEHAND_REDIS_URL)")?;
    if args.redis.slots == Some(0) {
        anyhow::bail!("a worker with `--slots 0` would run nothing");
    }
    let node = Node::start(
        config,
        &url,
        &args.redis,
        &args.data_dir,
        Duration::from_secs(args.retention_secs),
        Duration::from_secs(args.drain_secs),
    )
    .await?;
    let kv_watcher = node.pipeline.caps.kv.clone().watch(node.stop.clone())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "worker {} joined {url}", node.cluster.node())?;
    stdout.flush()?;
    drop(stdout);
    super::serve::shutdown_signal().await;
    node.stop().await?;
    let _ = kv_watcher.await;
    Ok(ExitCode::SUCCESS)
}
