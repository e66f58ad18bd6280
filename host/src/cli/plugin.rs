//! For plugin authors. `stagehand plugin check <file.wasm>`: what a component imports and
//! exports, and whether it can run as a stage or a handler (and if not, what is missing), before
//! it goes near a pipeline. `stagehand plugin new <name>`: a Rust stage crate to start from,
//! with its own copy of the WIT, that builds and runs as it is (tests/tests/plugin_new.rs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
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
    /// Write a new Rust stage crate, `<dir>/<name>/`, that builds into a component of the
    /// `stage` world with `cargo build --release --target wasm32-wasip2`.
    New {
        /// The crate's name: lowercase letters, digits, `-` and `_`, starting with a letter.
        name: String,
        /// Where to create the crate's directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

pub async fn plugin(args: PluginArgs) -> Result<ExitCode> {
    let (component, data_dir) = match args.command {
        PluginCommand::Check {
            component,
            data_dir,
        } => (component, data_dir),
        PluginCommand::New { name, dir } => {
            let created = new_stage(&name, &dir)?;
            println!("created {}", created.display());
            println!(
                "  build: cd {} && cargo build --release --target wasm32-wasip2",
                created.display()
            );
            println!(
                "  check: stagehand plugin check target/wasm32-wasip2/release/{}.wasm",
                name.replace('-', "_")
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
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

/// The template's files: path in the new crate, and text with `{{name}}` and `{{crate}}` (the
/// name as Rust spells it, which is also the `.wasm` file's name).
const TEMPLATE: [(&str, &str); 4] = [
    (
        "Cargo.toml",
        include_str!("../../templates/stage/Cargo.toml.template"),
    ),
    (
        "src/lib.rs",
        include_str!("../../templates/stage/src/lib.rs.template"),
    ),
    (
        "README.md",
        include_str!("../../templates/stage/README.md.template"),
    ),
    (
        "wit/pipeline.wit",
        include_str!("../../../wit/pipeline.wit"),
    ),
];

fn new_stage(name: &str, dir: &Path) -> Result<PathBuf> {
    let well_formed = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !well_formed || name.len() > 64 {
        bail!(
            "{name:?} is not a usable name: lowercase letters, digits, `-` and `_`, starting \
             with a letter, at most 64"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists; nothing was written", root.display());
    }
    let crate_name = name.replace('-', "_");
    for (path, text) in TEMPLATE {
        let path = root.join(path);
        let text = text
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_name);
        std::fs::create_dir_all(path.parent().expect("template paths have a parent"))
            .with_context(|| format!("cannot create {}", root.display()))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(root)
}
