//! `stagehand inspect jobs|results|checkpoints|journals|effects|records`: the store's contents as JSON lines, for
//! operators and scripts. (The store is opened exclusively: not while a server uses it.)

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
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

pub fn inspect(args: InspectArgs) -> Result<ExitCode> {
    let store = Store::open(&args.data_dir.join("store"))?;
    let mut out = std::io::stdout().lock();
    let mut line = |value: &dyn erased::Line| -> Result<()> {
        value.write(&mut out)?;
        out.write_all(b"\n")?;
        Ok(())
    };
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
            let value: serde_json::Value = serde_json::from_slice(&value)?;
            line(&serde_json::json!({ "key": key, "value": value }))
        })?,
    }
    Ok(ExitCode::SUCCESS)
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
