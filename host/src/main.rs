use std::process::ExitCode;

use clap::Parser;
use stagehand::cli::{Cli, LogFormat};

/// jemalloc instead of glibc's malloc: with thousands of items in flight the server spent a fifth
/// of its CPU in malloc and free, part of it waiting on glibc's arena locks; jemalloc's
/// per-thread caches took CPU per item down by a quarter (docs/BENCHMARKS.md, issue 17).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(cli.log_color.ansi());
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // Every LLM request in flight is a connection: ten thousand waiting items need more files
    // than the usual soft limit of 1,024. Take what the hard limit allows.
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%error, "cannot raise the open-files limit");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.execute()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
