//! `stagehand serve <PIPELINE>... [--addr 127.0.0.1:8080]`: the HTTP API for one or more
//! pipelines (files, or directories of `*.toml` files).
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

use super::{RedisArgs, default_data_dir, load_pipelines, shutdown_signal, start_serving_node};
use crate::api::{App, router};

#[derive(Args)]
pub struct ServeArgs {
    /// Pipeline files, or directories of them (`*.toml`); each is served by its `name`.
    #[arg(required = true, num_args = 1..)]
    pipelines: Vec<PathBuf>,
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
    let configs = load_pipelines(&args.pipelines)?;
    // Before anything is loaded, so that what loading records (the memory budget) is kept.
    let metrics = crate::metrics::install()?;
    let backend = args.redis.backend(&configs, !args.explicit_flushes_only);
    let mut node = start_serving_node(
        configs,
        args.data_dir,
        backend,
        args.drain_secs,
        args.retention_secs,
        args.llm_base_url,
    )
    .await?;
    if args.watch {
        node.watch_components()?;
    }
    node.sweep_finished_jobs(Duration::from_secs(args.sweep_interval_secs.max(1)));
    if let Some(secs) = args.reprocess_every_secs {
        node.reprocess_dead_letters(Duration::from_secs(secs.max(1)), args.reprocess_max_rounds);
    }
    let app = Arc::new(App {
        pipelines: node.pipelines.clone(),
        live_tokens: node.resources.tokens.clone(),
        backend: node.backend.jobs(),
        max_body_bytes: args.max_body_mib << 20,
        max_image_bytes: args.max_image_mib << 20,
        metrics: Some(metrics),
        versions: node.versions.clone(),
        deployer: node.deployer.clone(),
        kv_reloads: node.kv_reloads.clone(),
        tokens: crate::api::auth::Tokens::new(args.admin_token, args.api_token),
        sse_keep_alive: Duration::from_secs(args.sse_keep_alive_secs),
    });

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let resumed = node.resume_unfinished_jobs().await?;
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
    node.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}
