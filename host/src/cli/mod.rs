//! The `stagehand` command: one subcommand per file.

mod inspect;
mod plugin;
mod run;
mod serve;

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
    /// Serve the HTTP API: submit jobs, follow them over SSE, read results, cancel.
    Serve(serve::ServeArgs),
    /// Print what the store holds (jobs, results, effects, handler records) as JSON lines.
    Inspect(inspect::InspectArgs),
    /// Tools for plugin authors: `plugin check <file.wasm>`.
    Plugin(plugin::PluginArgs),
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
            Command::Plugin(args) => plugin::plugin(args).await,
        }
    }
}
