//! `stagehand worker <PIPELINE>... --redis redis://...`: a node that runs items from the
//! shared work stream and serves no HTTP (seed 002 scaled workers apart from the API).
//!
//! The first line on stdout is `worker NODE joined redis://...`, once the node reads work.
//! SIGTERM or Ctrl-C: stop taking work, give items in flight `--drain-secs`; what is left is
//! reclaimed by the other nodes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::{RedisArgs, default_data_dir, load_pipelines, shutdown_signal, start_serving_node};

#[derive(Args)]
pub struct WorkerArgs {
    /// Pipeline files, or directories of them (`*.toml`); the same on every node.
    #[arg(required = true, num_args = 1..)]
    pipelines: Vec<PathBuf>,
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

pub async fn worker(args: WorkerArgs) -> Result<ExitCode> {
    let configs = load_pipelines(&args.pipelines)?;
    let url = args
        .redis
        .redis
        .clone()
        .context("`stagehand worker` needs `--redis URL` (or STAGEHAND_REDIS_URL)")?;
    if args.redis.slots == Some(0) {
        anyhow::bail!("a worker with `--slots 0` would run nothing");
    }
    let backend = args.redis.backend(&configs, true);
    let node = start_serving_node(
        configs,
        args.data_dir,
        backend,
        args.drain_secs,
        args.retention_secs,
        args.llm_base_url,
    )
    .await?;
    let crate::backend::Backend::Redis(cluster) = &node.backend else {
        anyhow::bail!("a worker runs items of a Redis node: give it `--redis`");
    };
    let name = cluster.node().to_owned();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "worker {} joined {url}", name)?;
    stdout.flush()?;
    drop(stdout);
    shutdown_signal().await;
    node.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}
