//! `stagehand serve <pipeline.toml> [--addr 127.0.0.1:8080]`: the HTTP API.
//!
//! The first line on stdout is `listening on http://ADDR` (so `--addr 127.0.0.1:0` can be used
//! by scripts and tests). SIGTERM or Ctrl-C: stop accepting, give running jobs `--drain-secs`
//! to finish, stop the effect runner and the retention sweeper, flush the store.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::default_data_dir;
use super::worker::{Node, RedisArgs};
use crate::api::{App, router};
use crate::config::PipelineConfig;
use crate::events::EventLog;
use crate::jobs::{EffectRunner, Embedded, JobBackend, JobManager};
use crate::pipeline::Pipeline;
use crate::store::Store;
use crate::versions::StageVersions;

#[derive(Args)]
pub struct ServeArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Seconds between keep-alive comments on an idle event stream (proxies close idle
    /// connections; 1 to 3,600).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    sse_keep_alive_secs: u64,
    /// Testing only: no background flush of the store, so that only the flushes the code
    /// makes (before each acknowledgement) make writes durable.
    #[arg(long, hide = true)]
    explicit_flushes_only: bool,
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Where the store and the compiled components are kept.
    #[arg(long, default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Send every provider's requests to this LLM API root instead of its `base_url`.
    #[arg(long, env = "STAGEHAND_LLM_BASE_URL")]
    llm_base_url: Option<String>,
    /// Largest request body accepted, in MiB.
    #[arg(long, default_value_t = 32)]
    max_body_mib: usize,
    /// Largest image an item may carry (base64, data URL or multipart upload), in MiB.
    #[arg(long, default_value_t = 10)]
    max_image_mib: usize,
    /// On shutdown, how long running jobs get to finish.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// Finished jobs, their results and event logs are removed this long after they end.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    retention_secs: u64,
    /// How often the retention sweeper runs.
    #[arg(long, default_value_t = 600)]
    sweep_interval_secs: u64,
    /// Install a stage's component file as its new version whenever the file changes.
    #[arg(long)]
    watch: bool,
    /// Bearer token of the admin routes (stages, kv reload, dead-letter discard and reprocess);
    /// they are off without one.
    #[arg(long, env = "STAGEHAND_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Bearer token every other route needs (`/metrics` included); open without one.
    #[arg(long, env = "STAGEHAND_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    #[command(flatten)]
    redis: RedisArgs,
    /// Reprocess dead letters whose failure may pass (outages, timeouts) this often
    /// (seed 002 used 300); off when absent.
    #[arg(long)]
    reprocess_every_secs: Option<u64>,
    /// ... at most this many times each: then a dead letter waits for a person (its failure
    /// only looked retryable).
    #[arg(long, default_value_t = 5)]
    reprocess_max_rounds: u32,
}

pub async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let mut config = PipelineConfig::load(&args.pipeline)?;
    if let Some(url) = args.llm_base_url {
        config.llm.point_all_at(&url);
    }
    let retention = Duration::from_secs(args.retention_secs);
    let drain = Duration::from_secs(args.drain_secs);
    // Before anything is loaded, so that what loading records (the memory budget) is kept.
    let metrics = crate::metrics::install()?;
    // In Redis mode the node (pipeline on the shared backends, effect runner, work loop) is
    // the one `stagehand worker` runs; HTTP comes on top.
    let node = match &args.redis.redis {
        Some(url) => Some(
            Node::start(
                config.clone(),
                url,
                &args.redis,
                &args.data_dir,
                retention,
                drain,
            )
            .await?,
        ),
        None => None,
    };
    let (store, pipeline, versions) = match &node {
        Some(node) => (
            node.store.clone(),
            node.pipeline.clone(),
            node.versions.clone(),
        ),
        None => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
            let store =
                Store::open_with(&args.data_dir.join("store"), !args.explicit_flushes_only)?;
            let runtime = Pipeline::runtime_for(&config, &args.data_dir)?;
            let pipeline = Pipeline::load(config, runtime, store.clone()).await?;
            let versions = StageVersions::open(&store, &args.data_dir)?;
            let restored = versions.restore(&pipeline).await?;
            if restored > 0 {
                tracing::info!(
                    restored,
                    "stages run the versions installed before the restart"
                );
            }
            // Effects cut short by a crash may have happened: not run again (at most once).
            let interrupted = store.interrupt_running_effects()?;
            if interrupted > 0 {
                tracing::warn!(
                    interrupted,
                    "effects were running when the server stopped; marked interrupted"
                );
            }
            (store, pipeline, versions)
        }
    };
    let events = EventLog::new(&store)?;
    let jobs = JobManager::new(pipeline.clone(), events.clone());
    let stop_effects = CancellationToken::new();
    // A node runs its own effect runner.
    let effects_task = node.is_none().then(|| {
        EffectRunner::spawn(
            pipeline.caps.clone(),
            pipeline.config.run.effect_concurrency,
            stop_effects.clone(),
        )
        .1
    });
    let sweeper = crate::jobs::retention::spawn_sweeper(
        store.clone(),
        events.clone(),
        retention,
        Duration::from_secs(args.sweep_interval_secs.max(1)),
        stop_effects.clone(),
    );
    let auto_reprocess = args.reprocess_every_secs.map(|secs| {
        crate::jobs::auto_reprocess::spawn(
            jobs.clone(),
            Duration::from_secs(secs.max(1)),
            args.reprocess_max_rounds,
            stop_effects.clone(),
        )
    });
    let watcher = if args.watch {
        Some(versions.watch(pipeline.clone(), stop_effects.clone())?)
    } else {
        None
    };
    // kv files are always watched: refreshing a lookup table must not need a restart.
    let kv_watcher = pipeline.caps.kv.clone().watch(stop_effects.clone())?;
    let backend: Arc<dyn JobBackend> = match &node {
        Some(node) => Arc::new(node.cluster.clone()),
        None => Arc::new(Embedded {
            manager: jobs.clone(),
            store: store.clone(),
            events: events.clone(),
        }),
    };
    let app = Arc::new(App {
        store: store.clone(),
        events,
        jobs: jobs.clone(),
        backend,
        max_body_bytes: args.max_body_mib << 20,
        max_image_bytes: args.max_image_mib << 20,
        metrics: Some(metrics),
        versions,
        tokens: crate::api::auth::Tokens::new(args.admin_token, args.api_token),
        sse_keep_alive: Duration::from_secs(args.sse_keep_alive_secs),
    });

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    // Jobs a crash or an impatient shutdown left running go on where they stopped.
    let resumed = jobs.resume_unfinished().await?;
    if resumed > 0 {
        tracing::info!(resumed, "resumed unfinished jobs");
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{}", listener.local_addr()?)?;
    stdout.flush()?;
    drop(stdout);
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await?;

    let still_running = jobs.wait(drain).await;
    if still_running > 0 {
        tracing::warn!(
            still_running,
            "jobs still running at shutdown; they stay `running` in the store"
        );
    }
    if let Some(node) = node {
        node.stop().await?;
    }
    stop_effects.cancel();
    if let Some(effects_task) = effects_task {
        effects_task.await??;
    }
    let _ = sweeper.await;
    for task in [auto_reprocess, watcher, Some(kv_watcher)]
        .into_iter()
        .flatten()
    {
        let _ = task.await;
    }
    store.flush().await?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
