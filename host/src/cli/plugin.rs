//! `stagehand plugin check <file.wasm>`: for plugin authors, what a component imports and
//! exports, and whether it can run as a stage or a handler (and if not, what is missing), before
//! it goes near a pipeline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::default_data_dir;
use crate::runtime::{Runtime, RuntimeOptions, describe};

#[derive(Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Check a component against the worlds of wit/pipeline.wit and list its imports and
    /// exports. Exit status 0 if it implements at least one world.
    Check {
        component: PathBuf,
        /// Where compiled components are cached.
        #[arg(long, default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
    },
}

pub async fn plugin(args: PluginArgs) -> Result<ExitCode> {
    let PluginCommand::Check {
        component,
        data_dir,
    } = args.command;
    let runtime = Runtime::new(RuntimeOptions {
        max_instances: 4,
        max_memory_bytes: 64 << 20,
        cache_dir: data_dir.join("compiled"),
    })?;
    let description = describe(&runtime, &component).await?;
    println!("{}", component.display());
    println!("  sha256  {}", description.digest);
    println!("  imports");
    for import in &description.imports {
        println!("    {import}");
    }
    println!("  exports");
    for export in &description.exports {
        println!("    {export}");
    }
    let mut implements_one = false;
    for (world, verdict) in &description.worlds {
        match verdict {
            Ok(()) => {
                implements_one = true;
                println!("  world `{}`: ok", world.name());
            }
            Err(why) => println!("  world `{}`: no: {why}", world.name()),
        }
    }
    Ok(if implements_one {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
