//! The `stagehand` command: one subcommand per file.

mod deploy;
mod dlq;
mod inspect;
mod jobs;
mod plugin;
mod remote;
mod run;
mod serve;
mod submit;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::PipelineConfig;
use crate::node::{BackendSettings, Node, NodeSettings, RedisSettings};

#[derive(Parser)]
#[command(
    name = "stagehand",
    version,
    about = "Run multi-step LLM pipelines built from WebAssembly stages"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines (stderr) are written: `text` for people, `json` (one object per line,
    /// with the job, item and stage spans) for log collectors. The level is `RUST_LOG`'s.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Colours in text logs: `auto` (only when stderr is a terminal), `always` or `never`.
    #[arg(long, global = true, value_enum, default_value_t = LogColor::Auto)]
    pub log_color: LogColor,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogColor {
    Auto,
    Always,
    Never,
}

impl LogColor {
    /// Whether log lines carry ANSI colour codes: a file or a pipe gets plain text.
    pub fn ansi(self) -> bool {
        use std::io::IsTerminal;
        match self {
            LogColor::Auto => std::io::stderr().is_terminal(),
            LogColor::Always => true,
            LogColor::Never => false,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every item of a JSONL file through a pipeline, offline, and store the results.
    Run(run::RunArgs),
    /// Serve the HTTP API: submit jobs, follow them over SSE, read results, cancel. With
    /// `--redis`, also a node of a Redis cluster.
    Serve(serve::ServeArgs),
    /// Run items from the Redis work stream, without HTTP (a node of a Redis cluster).
    Worker(worker::WorkerArgs),
    /// Print what the store holds (jobs, results, effects, handler records) as JSON lines.
    Inspect(inspect::InspectArgs),
    /// Tools for plugin authors: `plugin check <file.wasm>`.
    Plugin(plugin::PluginArgs),
    /// Send a JSONL file of items to a running server as one job; `--follow` draws its progress.
    Submit(submit::SubmitArgs),
    /// A running server's pipelines: stages and their versions, handlers, kv namespaces.
    Pipelines(jobs::PipelinesArgs),
    /// A running server's jobs, newest first.
    Jobs(jobs::JobsArgs),
    /// A job's results as JSON lines (stdout or `--out`).
    Results(jobs::ResultsArgs),
    /// Cancel a job on a running server.
    Cancel(jobs::CancelArgs),
    /// A running server's dead letters: list, show, discard, reprocess.
    Dlq(dlq::DlqArgs),
    /// Deploy a pipeline file and the files it names to a running server (shows what changes
    /// first; `--dry-run` only shows).
    Deploy(deploy::DeployArgs),
}

/// Exit status when the run finished but some items failed.
pub const EXIT_ITEMS_FAILED: u8 = 3;

/// Where the store and compiled components live unless `--data-dir` says otherwise.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from(".stagehand")
}

/// How a node joins the others through Redis (`serve` and `worker`).
#[derive(Args, Clone)]
pub struct RedisArgs {
    /// Share jobs, items, results, event logs, work, cancels, effects and operators' changes
    /// with other nodes through the Redis at this URL (`redis://host:port/db`); without it, everything stays in this
    /// process's embedded store.
    #[arg(long, env = "STAGEHAND_REDIS_URL")]
    pub redis: Option<String>,
    /// Items this node runs at once (default: the largest `[run] concurrency` of its
    /// pipelines); `serve` with 0 is an API node that runs none.
    #[arg(long)]
    pub slots: Option<usize>,
    /// Work (and effects) pending this long on a node that stopped refreshing it is taken
    /// over (ms).
    #[arg(long, default_value_t = 30_000)]
    pub reclaim_idle_ms: u64,
}

impl RedisArgs {
    /// Redis when `--redis` is given, else the embedded store.
    pub fn backend(&self, configs: &[PipelineConfig], background_flush: bool) -> BackendSettings {
        let concurrency = configs.iter().map(|c| c.run.concurrency).max();
        match &self.redis {
            Some(url) => BackendSettings::Redis(RedisSettings {
                url: url.clone(),
                slots: self.slots.or(concurrency).unwrap_or(1),
                reclaim_idle: std::time::Duration::from_millis(self.reclaim_idle_ms.max(100)),
            }),
            None => BackendSettings::Embedded { background_flush },
        }
    }
}

/// The pipeline files `paths` name: each a file, or a directory whose `*.toml` files are
/// taken in name order.
fn load_pipelines(paths: &[PathBuf]) -> anyhow::Result<Vec<PipelineConfig>> {
    use anyhow::Context;
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read the directory {}", path.display()))?
            .filter_map(|entry| Some(entry.ok()?.path()))
            .filter(|file| file.is_file() && file.extension().is_some_and(|e| e == "toml"))
            .collect();
        if found.is_empty() {
            anyhow::bail!("{} holds no pipeline file (`*.toml`)", path.display());
        }
        found.sort();
        files.extend(found);
    }
    files
        .iter()
        .map(|file| PipelineConfig::load(file))
        .collect()
}

/// A long-running node (`serve`, `worker`): it runs the stage versions installed while
/// serving, and reloads kv files when they change.
async fn start_serving_node(
    configs: Vec<PipelineConfig>,
    data_dir: PathBuf,
    backend: BackendSettings,
    drain_secs: u64,
    retention_secs: u64,
    llm_base_url: Option<String>,
) -> anyhow::Result<Node> {
    let mut node = Node::start(
        configs,
        NodeSettings {
            data_dir,
            backend,
            llm_base_url,
            drain: std::time::Duration::from_secs(drain_secs),
            retention: std::time::Duration::from_secs(retention_secs),
            restore_versions: true,
        },
    )
    .await?;
    node.watch_kv()?;
    Ok(node)
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
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

impl Cli {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Run(args) => run::run(args).await,
            Command::Inspect(args) => inspect::inspect(args).await,
            Command::Serve(args) => serve::serve(args).await,
            Command::Worker(args) => worker::worker(args).await,
            Command::Plugin(args) => plugin::plugin(args).await,
            Command::Submit(args) => submit::submit(args).await,
            Command::Pipelines(args) => jobs::pipelines(args).await,
            Command::Jobs(args) => jobs::jobs(args).await,
            Command::Results(args) => jobs::results(args).await,
            Command::Cancel(args) => jobs::cancel(args).await,
            Command::Dlq(args) => dlq::dlq(args).await,
            Command::Deploy(args) => deploy::deploy(args).await,
        }
    }
}
