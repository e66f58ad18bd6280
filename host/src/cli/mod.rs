//! The `stagehand` command: one subcommand per file.

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

use clap::{Parser, Subcommand};

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
    /// A running server's jobs, newest first.
    Jobs(jobs::JobsArgs),
    /// A job's results as JSON lines (stdout or `--out`).
    Results(jobs::ResultsArgs),
    /// Cancel a job on a running server.
    Cancel(jobs::CancelArgs),
    /// A running server's dead letters: list, show, discard, reprocess.
    Dlq(dlq::DlqArgs),
}

/// Exit status when the run finished but some items failed.
pub const EXIT_ITEMS_FAILED: u8 = 3;

/// Where the store and compiled components live unless `--data-dir` says otherwise.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from(".stagehand")
}

impl Cli {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Run(args) => run::run(args).await,
            Command::Inspect(args) => inspect::inspect(args),
            Command::Serve(args) => serve::serve(args).await,
            Command::Worker(args) => worker::worker(args).await,
            Command::Plugin(args) => plugin::plugin(args).await,
            Command::Submit(args) => submit::submit(args).await,
            Command::Jobs(args) => jobs::jobs(args).await,
            Command::Results(args) => jobs::results(args).await,
            Command::Cancel(args) => jobs::cancel(args).await,
            Command::Dlq(args) => dlq::dlq(args).await,
        }
    }
}
