//! `stagehand inspect jobs|results|checkpoints|journals|effects|records`: the store's contents
//! as JSON lines, for operators and scripts. (The store is opened exclusively: not while a
//! server uses it.) With `--redis`, effects and records are the cluster's, read from Redis
//! while it serves; jobs there are the HTTP API's.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::default_data_dir;
use crate::store::Store;

#[derive(Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    what: What,
    /// Where the store is kept.
    #[arg(long, global = true, default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Read effects or records of the Redis-mode cluster at this URL instead of the store.
    #[arg(long, global = true, value_name = "URL")]
    redis: Option<String>,
}

#[derive(Subcommand)]
enum What {
    /// Every job.
    Jobs,
    /// A job's results in item order.
    Results { job: uuid::Uuid },
    /// A job's checkpointed stage outputs (of items not finished), as {"index", "stage", "bytes"}.
    Checkpoints { job: uuid::Uuid },
    /// A job's journaled host-call answers (of stages with no output kept yet), as {"index",
    /// "stage", "position", "bytes"}.
    Journals { job: uuid::Uuid },
    /// Every emitted effect with its state.
    Effects,
    /// The records handlers wrote in a collection, as {"key", "value"}.
    Records { collection: String },
}

pub async fn inspect(args: InspectArgs) -> Result<ExitCode> {
    if let Some(url) = &args.redis {
        return inspect_redis(url, args.what).await;
    }
    let store = Store::open(&args.data_dir.join("store"))?;
    let mut out = std::io::stdout().lock();
    let mut line = |value: &dyn erased::Line| line(&mut out, value);
    match args.what {
        What::Jobs => store.jobs().try_for_each(|j| line(&j?))?,
        What::Results { job } => store.results(job, None).try_for_each(|r| line(&r?))?,
        What::Checkpoints { job } => store.checkpoints(job).try_for_each(|entry| {
            let (index, stage, bytes) = entry?;
            line(&serde_json::json!({ "index": index, "stage": stage, "bytes": bytes }))
        })?,
        What::Journals { job } => store.journal_entries(job).try_for_each(|entry| {
            let (index, stage, position, bytes) = entry?;
            line(&serde_json::json!({
                "index": index, "stage": stage, "position": position, "bytes": bytes
            }))
        })?,
        What::Effects => store.effects().try_for_each(|e| line(&e?))?,
        What::Records { collection } => store.records(&collection).try_for_each(|entry| {
            let (key, value) = entry?;
            line(&record_line(key, &value)?)
        })?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn inspect_redis(url: &str, what: What) -> Result<ExitCode> {
    use crate::backend::redis::{effects, records};
    let client = redis::Client::open(url).with_context(|| format!("bad Redis URL `{url}`"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot connect to Redis at {url}"))?;
    let mut out = std::io::stdout().lock();
    match what {
        What::Effects => effects::each_effect(&mut conn, |e| line(&mut out, &e)).await?,
        What::Records { collection } => {
            records::each_record(&mut conn, &collection, |key, value| {
                line(&mut out, &record_line(key, &value)?)
            })
            .await?
        }
        _ => bail!(
            "with --redis, `inspect` reads effects and records; jobs, results and the rest are \
             the HTTP API's (`stagehand jobs`, `stagehand results`)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// A record as one line shows it: {"key", "value"}.
fn record_line(key: String, value: &[u8]) -> Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_slice(value)?;
    Ok(serde_json::json!({ "key": key, "value": value }))
}

fn line(out: &mut impl Write, value: &dyn erased::Line) -> Result<()> {
    value.write(out)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Lets one closure print any serialisable row.
mod erased {
    pub trait Line {
        fn write(&self, out: &mut dyn std::io::Write) -> serde_json::Result<()>;
    }
    impl<T: super::Serialize> Line for T {
        fn write(&self, out: &mut dyn std::io::Write) -> serde_json::Result<()> {
            serde_json::to_writer(out, self)
        }
    }
}
