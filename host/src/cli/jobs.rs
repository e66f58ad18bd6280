//! `stagehand pipelines`, `stagehand jobs`, `stagehand results <job>`, `stagehand cancel <job>`:
//! a running server's pipelines and jobs from the command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use reqwest::Method;
use serde_json::Value;

use super::remote::{Remote, RemoteArgs};

#[derive(Args)]
pub struct JobsArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Only jobs in this state: running, completed, cancelled or failed.
    #[arg(long)]
    state: Option<String>,
    /// Only jobs of this pipeline.
    #[arg(long)]
    pipeline: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn jobs(args: JobsArgs) -> Result<ExitCode> {
    let remote = Remote::new(&args.remote)?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<36}  {:<9}  {:>15}  {:>7}  {:<16}  created",
            "job", "state", "done/total", "failed", "pipeline"
        )?;
    }
    let (mut listed, mut before) = (0, None::<String>);
    while listed < args.limit {
        let page = (args.limit - listed).min(1000);
        let mut path = format!("/v1/jobs?limit={page}");
        if let Some(state) = &args.state {
            path += &format!("&state={state}");
        }
        if let Some(pipeline) = &args.pipeline {
            path += &format!("&pipeline={pipeline}");
        }
        if let Some(before) = &before {
            path += &format!("&before={before}");
        }
        let answer = remote.get(&path).await?;
        for job in answer["jobs"].as_array().into_iter().flatten() {
            listed += 1;
            if args.json {
                writeln!(out, "{job}")?;
                continue;
            }
            let count = |field: &str| job[field].as_u64().unwrap_or(0);
            writeln!(
                out,
                "{:<36}  {:<9}  {:>15}  {:>7}  {:<16}  {}",
                job["id"].as_str().unwrap_or("?"),
                job["state"].as_str().unwrap_or("?"),
                format!(
                    "{}/{}",
                    count("succeeded") + count("failed"),
                    count("total")
                ),
                count("failed"),
                job["pipeline"].as_str().unwrap_or("?"),
                ago(count("created_at")),
            )?;
        }
        match answer["next_before"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct PipelinesArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// The server's answer (`GET /v1/pipelines`) as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Each pipeline the server serves: its stages in order with their current versions (and a
/// canary on trial), its handlers and kv namespaces.
pub async fn pipelines(args: PipelinesArgs) -> Result<ExitCode> {
    let remote = Remote::new(&args.remote)?;
    let answer = remote.get("/v1/pipelines").await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{answer}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let names = |list: &Value, field: &str| -> String {
        let names: Vec<&str> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                if field.is_empty() {
                    v.as_str()
                } else {
                    v[field].as_str()
                }
            })
            .collect();
        if names.is_empty() {
            "-".to_string()
        } else {
            names.join(", ")
        }
    };
    for pipeline in answer["pipelines"].as_array().into_iter().flatten() {
        let revision = pipeline["revision"].as_str().unwrap_or("?");
        writeln!(
            out,
            "{}  revision {}{}",
            pipeline["name"].as_str().unwrap_or("?"),
            &revision[..revision.len().min(12)],
            if pipeline["deployed"] == true {
                " (deployed)"
            } else {
                ""
            }
        )?;
        for stage in pipeline["stages"].as_array().into_iter().flatten() {
            let digest = |version: &Value| {
                let digest = version["digest"].as_str().unwrap_or("?");
                digest[..digest.len().min(12)].to_string()
            };
            let mut line = format!(
                "  stage {:<20} {}",
                stage["name"].as_str().unwrap_or("?"),
                digest(&stage["current"])
            );
            if stage["canary"].is_object() {
                line += &format!(
                    "  canary {} at {} %",
                    digest(&stage["canary"]),
                    stage["canary"]["percent"]
                );
            }
            writeln!(out, "{line}")?;
        }
        writeln!(out, "  handlers: {}", names(&pipeline["handlers"], ""))?;
        writeln!(out, "  kv: {}", names(&pipeline["kv"], "name"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// "5 s ago", "3 min ago"... from ms since the epoch.
fn ago(at_ms: u64) -> String {
    let secs = crate::model::now_ms().saturating_sub(at_ms) / 1000;
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

#[derive(Args)]
pub struct ResultsArgs {
    job: String,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Write the results here, one JSON object per line, instead of to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Page through the results (keyset, 1,000 at a time) so memory stays flat for any job size.
pub async fn results(args: ResultsArgs) -> Result<ExitCode> {
    let remote = Remote::new(&args.remote)?;
    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let (mut written, mut after) = (0u64, None::<u64>);
    loop {
        let mut path = format!("/v1/jobs/{}/results?limit=1000", args.job);
        if let Some(after) = after {
            path += &format!("&after={after}");
        }
        let page = remote.get(&path).await?;
        for result in page["results"].as_array().into_iter().flatten() {
            writeln!(out, "{result}")?;
            written += 1;
        }
        match page["next_after"].as_u64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    out.flush()?;
    if let Some(path) = &args.out {
        eprintln!("{written} results written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct CancelArgs {
    job: String,
    #[command(flatten)]
    remote: RemoteArgs,
}

pub async fn cancel(args: CancelArgs) -> Result<ExitCode> {
    let remote = Remote::new(&args.remote)?;
    let answer: Value = remote
        .json(remote.request(Method::POST, &format!("/v1/jobs/{}/cancel", args.job)))
        .await?;
    match answer["state"].as_str() {
        Some("cancelling") => println!("job {} cancelling", args.job),
        Some(state) => println!("job {} had already ended: {state}", args.job),
        None => println!("{answer}"),
    }
    Ok(ExitCode::SUCCESS)
}
