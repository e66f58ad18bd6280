//! `stagehand deploy PATH`: build a bundle of a pipeline file and the files it names, show how
//! it differs from what the server serves, and deploy it (`PUT /v1/pipelines/{name}`).
//!
//! A file named by a path that leaves the pipeline file's folder (`../../target/...`) goes into
//! the bundle as `files/<its name>`, and the pipeline file in the bundle names it so; the
//! bundle is checked here the way the server checks it before anything is sent.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use reqwest::Method;
use serde_json::Value;

use super::remote::{Remote, RemoteArgs};
use crate::config::PipelineConfig;
use crate::deploy::bundle::{self, PIPELINE_FILE, normalise};
use crate::pipeline::Manifest;
use crate::pipeline::revisions::short;
use crate::store::blobs::digest;

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// The pipeline file, or a folder holding `pipeline.toml`.
    path: PathBuf,
    /// Show what would change, deploy nothing.
    #[arg(long)]
    dry_run: bool,
}

/// A bundle ready to send, and what it holds.
struct Built {
    config: PipelineConfig,
    /// Path in the bundle -> bytes, `pipeline.toml` included.
    files: BTreeMap<PathBuf, Vec<u8>>,
    revision: String,
}

pub async fn deploy(args: DeployArgs) -> Result<ExitCode> {
    let path = match args.path.is_dir() {
        true => args.path.join(PIPELINE_FILE),
        false => args.path.clone(),
    };
    let built = build(&path)?;
    let name = built.config.name.clone();
    let remote = Remote::new(&args.remote)?;
    let response = remote
        .request(Method::GET, &format!("/v1/pipelines/{name}"))
        .send()
        .await
        .context("cannot reach the server")?;
    let served = match response.status() {
        reqwest::StatusCode::NOT_FOUND => None,
        _ => Some(
            remote
                .json(remote.request(Method::GET, &format!("/v1/pipelines/{name}")))
                .await?,
        ),
    };
    let mut out = std::io::stdout().lock();
    let changes = differences(&built, served.as_ref());
    match &served {
        None => writeln!(
            out,
            "pipeline `{name}` is new: revision {}",
            short(&built.revision)
        )?,
        Some(served) if served["revision"] == built.revision.as_str() => {
            writeln!(
                out,
                "pipeline `{name}` already serves revision {}: nothing to deploy",
                short(&built.revision)
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(served) => writeln!(
            out,
            "pipeline `{name}`: revision {} -> {}",
            short(served["revision"].as_str().unwrap_or("?")),
            short(&built.revision)
        )?,
    }
    for change in &changes {
        writeln!(out, "  {change}")?;
    }
    if args.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    out.flush()?;
    let tar = bundle::write(&built.files).context("cannot build the bundle")?;
    let answer = remote
        .json(
            remote
                .request(Method::PUT, &format!("/v1/pipelines/{name}"))
                .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                .body(tar),
        )
        .await?;
    writeln!(
        out,
        "deployed: new jobs of `{name}` get revision {}; running ones finish on theirs",
        short(answer["revision"].as_str().unwrap_or("?"))
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Read and check the pipeline file at `path`, and gather its bundle.
fn build(path: &Path) -> Result<Built> {
    let config = PipelineConfig::load(path)?;
    let mut text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut files = BTreeMap::new();
    let mut on_disk = BTreeMap::new();
    for (written, found) in &config.files {
        let bytes =
            std::fs::read(found).with_context(|| format!("cannot read {}", found.display()))?;
        let inside = normalise(written).filter(|p| p != Path::new(PIPELINE_FILE));
        let in_bundle = match inside {
            Some(inside) => inside,
            None => {
                let file_name = found
                    .file_name()
                    .with_context(|| format!("{} names no file", written.display()))?;
                let moved = unique(&files, Path::new("files").join(file_name));
                text = rename(&text, written, &moved)?;
                moved
            }
        };
        on_disk.insert(in_bundle.clone(), found.clone());
        files.insert(in_bundle, bytes);
    }
    // The bundle as the server will read it: every path found, the same revision computed.
    let bundled = PipelineConfig::parse_with(&text, Path::new(PIPELINE_FILE), &|written| {
        normalise(written)
            .and_then(|p| on_disk.get(&p).cloned())
            .ok_or_else(|| format!("the bundle has no file {}", written.display()))
    })
    .with_context(|| {
        format!(
            "the bundle built from {} does not hold together",
            path.display()
        )
    })?;
    let manifest = Manifest {
        name: bundled.name.clone(),
        pipeline_file: digest(text.as_bytes()),
        files: bundled
            .files
            .keys()
            .map(|written| {
                (
                    written.clone(),
                    digest(&files[&normalise(written).expect("found")]),
                )
            })
            .collect(),
    };
    files.insert(PathBuf::from(PIPELINE_FILE), text.into_bytes());
    Ok(Built {
        revision: manifest.revision(),
        config: bundled,
        files,
    })
}

/// `wanted`, or `wanted` with a number before its extension if the bundle has it already.
fn unique(files: &BTreeMap<PathBuf, Vec<u8>>, wanted: PathBuf) -> PathBuf {
    let mut candidate = wanted.clone();
    let mut n = 2;
    while files.contains_key(&candidate) {
        let stem = wanted.file_stem().unwrap_or_default().to_string_lossy();
        let ext = wanted
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        candidate = wanted.with_file_name(format!("{stem}-{n}{ext}"));
        n += 1;
    }
    candidate
}

/// The pipeline file's text with the string `written` (quoted either way) naming `moved`.
fn rename(text: &str, written: &Path, moved: &Path) -> Result<String> {
    let written = written.display().to_string();
    let moved = moved.display().to_string();
    let mut renamed = text.to_string();
    for quote in ['"', '\''] {
        renamed = renamed.replace(
            &format!("{quote}{written}{quote}"),
            &format!("{quote}{moved}{quote}"),
        );
    }
    if renamed == text {
        bail!(
            "cannot put {written} into the bundle: write its path in the pipeline file as a plain \
             quoted string, or move the file beside the pipeline file"
        );
    }
    Ok(renamed)
}

/// Each entry of the server's `list` by its `name`, with the digest at JSON `pointer`.
fn digests_by_name(list: &Value, pointer: &str) -> BTreeMap<String, String> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    list.as_array()
        .into_iter()
        .flatten()
        .map(|entry| (text(entry.get("name")), text(entry.pointer(pointer))))
        .collect()
}

/// What deploying `built` changes, stage by stage, against the server's answer for the
/// pipeline (`None`: a new pipeline).
fn differences(built: &Built, served: Option<&Value>) -> Vec<String> {
    let names = |list: &Value, field: Option<&str>| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| match field {
                Some(field) => v[field].as_str(),
                None => v.as_str(),
            })
            .map(str::to_string)
            .collect()
    };
    let digest_of = |path: &Path| {
        std::fs::read(path)
            .map(|bytes| digest(&bytes))
            .unwrap_or_default()
    };
    let empty = Value::Null;
    let served = served.unwrap_or(&empty);
    let mut changes = Vec::new();
    let served_stages = digests_by_name(&served["stages"], "/current/digest");
    for stage in &built.config.stages {
        let new = digest_of(&stage.component);
        match served_stages.get(&stage.name) {
            None => changes.push(format!("+ stage {} {}", stage.name, short(&new))),
            Some(old) if *old != new => changes.push(format!(
                "~ stage {} {} -> {}",
                stage.name,
                short(old),
                short(&new)
            )),
            Some(_) => changes.push(format!(
                "  stage {} {} (unchanged)",
                stage.name,
                short(&new)
            )),
        }
    }
    for old in served_stages.keys() {
        if !built.config.stages.iter().any(|s| s.name == *old) {
            changes.push(format!("- stage {old}"));
        }
    }
    let order: Vec<String> = built.config.stages.iter().map(|s| s.name.clone()).collect();
    let served_order = names(&served["stages"], Some("name"));
    if !served_order.is_empty() && served_order != order {
        changes.push(format!(
            "~ stage order {} -> {}",
            served_order.join(", "),
            order.join(", ")
        ));
    }
    let served_handlers = names(&served["handlers"], None);
    for name in built.config.handlers.keys() {
        if !served_handlers.contains(name) {
            changes.push(format!("+ handler {name}"));
        }
    }
    for name in &served_handlers {
        if !built.config.handlers.contains_key(name) {
            changes.push(format!("- handler {name}"));
        }
    }
    let served_kv = digests_by_name(&served["kv"], "/digest");
    for (name, file) in &built.config.kv {
        let new = digest_of(file);
        match served_kv.get(name) {
            None => changes.push(format!("+ kv {name}")),
            Some(old) if *old != new => changes.push(format!("~ kv {name} (new contents)")),
            Some(_) => {}
        }
    }
    for name in served_kv.keys() {
        if !built.config.kv.contains_key(name) {
            changes.push(format!("- kv {name}"));
        }
    }
    changes
}
