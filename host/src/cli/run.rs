//! `stagehand run <pipeline.toml> <items.jsonl> [--out results.jsonl]`

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::{EXIT_ITEMS_FAILED, default_data_dir};
use crate::config::PipelineConfig;
use crate::jobs::{RunSettings, run_job};
use crate::model::{ItemStatus, JobRecord};
use crate::node::{BackendSettings, Node, NodeSettings};
use crate::pipeline::Pipeline;
use crate::store::Store;

#[derive(Args)]
pub struct RunArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Items, one JSON value per line.
    items: PathBuf,
    /// Also write every result, in item order, to this JSONL file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the store and the compiled components are kept.
    #[arg(long, default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Items in flight at once (default: the pipeline's `[run] concurrency`).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Send every provider's requests to this LLM API root instead of its `base_url`.
    #[arg(long, env = "STAGEHAND_LLM_BASE_URL")]
    llm_base_url: Option<String>,
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let mut config = PipelineConfig::load(&args.pipeline)?;
    let concurrency = args.concurrency.unwrap_or(config.run.concurrency);
    if concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    config.run.concurrency = concurrency;
    let node = Node::start(
        vec![config],
        NodeSettings {
            data_dir: args.data_dir.clone(),
            backend: BackendSettings::Embedded {
                background_flush: true,
            },
            drain: Duration::ZERO,
            retention: Duration::MAX,
            restore_versions: false,
            llm_base_url: args.llm_base_url.clone(),
        },
    )
    .await?;
    let pipeline = node.pipelines.only().expect("started with one pipeline");
    let store = node.store.clone();

    let job = JobRecord::new(&pipeline.config.name);
    let job = store.create_job(job, read_items(&args.items)?).await?;
    eprintln!(
        "job {} of pipeline `{}`: {} items",
        job.id, job.pipeline, job.total
    );

    let cancel = CancellationToken::new();
    let on_ctrl_c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("cancelling: no new stage starts, running guests are interrupted");
            on_ctrl_c.cancel();
        }
    });

    let bar = ProgressBar::new(job.total).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} items ({per_sec}, eta {eta}) {msg}")
            .expect("a valid template"),
    );
    let started = Instant::now();
    let failures = std::sync::atomic::AtomicU64::new(0);
    let progress_bar = bar.clone();
    let show = move |result: &crate::model::ItemResult| {
        progress_bar.inc(1);
        if result.status == ItemStatus::Failed {
            let failed = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress_bar.set_message(format!("{failed} failed"));
        }
    };
    let outcome = run_job(
        pipeline.clone(),
        job,
        RunSettings {
            limits: crate::jobs::ItemLimits {
                max_tokens: pipeline.config.llm.max_tokens_per_job,
                ..Default::default()
            },
            ..RunSettings::fresh(concurrency)
        },
        cancel,
        crate::jobs::ItemHooks::default(),
        show,
    )
    .await?;
    bar.finish_and_clear();
    if let Some(effects) = &node.effects {
        effects.wait_idle().await;
    }
    node.shutdown().await?;

    let job = &outcome.job;
    if let Some(out) = &args.out {
        write_results(&store, job.id, out)?;
    }
    print_summary(
        &pipeline,
        &store,
        job.id,
        started.elapsed(),
        outcome.not_run,
    )?;
    Ok(if job.failed > 0 || outcome.not_run > 0 {
        ExitCode::from(EXIT_ITEMS_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Each non-blank line, checked to be JSON, as it was written.
fn read_items(path: &PathBuf) -> Result<impl Iterator<Item = Result<Vec<u8>>> + use<>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read items from {}", path.display()))?;
    let path = path.display().to_string();
    let lines = BufReader::new(file).lines().enumerate();
    Ok(lines.filter_map(move |(n, line)| {
        let line = match line {
            Ok(line) => line,
            Err(e) => return Some(Err(anyhow::anyhow!("{path}:{}: {e}", n + 1))),
        };
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        Some(match serde_json::from_str::<serde::de::IgnoredAny>(line) {
            Ok(_) => Ok(line.as_bytes().to_vec()),
            Err(e) => Err(anyhow::anyhow!("{path}:{}: not JSON: {e}", n + 1)),
        })
    }))
}

fn write_results(store: &Store, job: uuid::Uuid, out: &PathBuf) -> Result<()> {
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot write {}", out.display()))?;
    let mut writer = BufWriter::new(file);
    for result in store.results(job, None) {
        serde_json::to_writer(&mut writer, &result?)?;
        writer.write_all(b"\n")?;
    }
    writer.flush()?;
    Ok(())
}

fn print_summary(
    pipeline: &Arc<Pipeline>,
    store: &Store,
    job: uuid::Uuid,
    elapsed: std::time::Duration,
    not_run: u64,
) -> Result<()> {
    let record = store.job(job)?.context("the job vanished from the store")?;
    let secs = elapsed.as_secs_f64();
    println!(
        "{} succeeded, {} failed{} of {} items in {:.2}s ({:.1} items/s); job {}",
        record.succeeded,
        record.failed,
        if not_run > 0 {
            format!(", {not_run} not run (cancelled)")
        } else {
            String::new()
        },
        record.total,
        secs,
        (record.succeeded + record.failed) as f64 / secs.max(1e-9),
        record.id,
    );
    // Per-stage time and the first few failures, read back from the store.
    let names: Vec<&str> = pipeline
        .stages
        .iter()
        .map(|s| s.config.name.as_str())
        .collect();
    let mut totals = vec![(0.0f64, 0u64); names.len()];
    let mut shown = 0;
    for result in store.results(job, None) {
        let result = result?;
        for run in result.stages.iter().filter(|r| !r.reused) {
            if let Some(i) = names.iter().position(|n| *n == run.stage) {
                totals[i].0 += run.duration_ms;
                totals[i].1 += 1;
            }
        }
        if let (Some(error), true) = (&result.error, shown < 5) {
            println!(
                "  item {}: {} ({})",
                result.index, error.message, error.kind
            );
            shown += 1;
        }
    }
    let all: f64 = totals.iter().map(|t| t.0).sum();
    for (name, (ms, n)) in names.iter().zip(&totals) {
        if *n > 0 {
            println!(
                "  {name:<12} avg {:>8.1} ms  share {:>5.1}%",
                ms / *n as f64,
                100.0 * ms / all.max(1e-9)
            );
        }
    }
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    for provider in pipeline.caps.llm.providers() {
        let usage = &provider.usage;
        let estimated = match load(&usage.estimated) {
            0 => String::new(),
            n => format!(" ({n} answers without usage: estimated)"),
        };
        println!(
            "  llm {}: {} requests, {} rate-limited, {} failed, {} prompt + {} completion tokens{estimated}",
            provider.name,
            load(&usage.requests),
            load(&usage.rate_limited),
            load(&usage.failures),
            load(&usage.prompt_tokens),
            load(&usage.completion_tokens)
        );
    }
    Ok(())
}
