//! `stagehand submit <items.jsonl> [--follow]`: send a job to a running server and, with
//! `--follow`, draw its progress from the SSE stream until it ends.
//!
//! The file is read twice and never held whole: once to check every line (an error names it)
//! and count the items, once streamed into the request body. The submission carries an
//! idempotency key, so the retries after a dropped connection cannot create a second job. The
//! stream is resumed with `Last-Event-ID` after any drop (a server restart included), for as
//! long as `--reconnect-for` allows without hearing from the server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use eventsource_stream::Eventsource;
use futures::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use super::EXIT_ITEMS_FAILED;
use super::remote::{Remote, RemoteArgs};

#[derive(Args)]
pub struct SubmitArgs {
    /// One item per line (JSON); blank lines are skipped.
    items: PathBuf,
    #[command(flatten)]
    remote: RemoteArgs,
    /// The pipeline that runs the job (needed when the server serves several).
    #[arg(long)]
    pipeline: Option<String>,
    /// Follow the job's progress until it ends, then print a summary.
    #[arg(long)]
    follow: bool,
    /// Items in flight for this job (default: the pipeline's).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Also report each stage of each item (`--follow` then draws a bar per stage).
    #[arg(long)]
    stages: bool,
    /// Labels kept with the job, as `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Key of this submission; a repeat with the same key returns the same job. Default: a new
    /// one per invocation (which still makes this command's own retries safe).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Give up following after this long without reaching the server.
    #[arg(long, default_value_t = 300)]
    reconnect_for_secs: u64,
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("a label is key=value, not {raw:?}"))
}

/// Tries of the submission itself when the connection fails (never after an answer).
const SUBMIT_TRIES: u32 = 5;

pub async fn submit(args: SubmitArgs) -> Result<ExitCode> {
    let total = check_items(&args.items).await?;
    let remote = Remote::new(&args.remote)?;
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let options = json!({
        "concurrency": args.concurrency,
        "detail": if args.stages { "stages" } else { "items" },
        "labels": args.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    });
    let route = match &args.pipeline {
        Some(name) => format!("/v1/pipelines/{name}/jobs"),
        None => "/v1/jobs".to_string(),
    };
    let mut tried = 0;
    let accepted = loop {
        tried += 1;
        let body = reqwest::Body::wrap_stream(body_stream(&args.items, &options).await?);
        let request = remote
            .request(Method::POST, &route)
            .header("idempotency-key", &key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        match remote.json(request).await {
            Ok(accepted) => break accepted,
            // Only a failure to connect or to finish sending is retried: an answer is final.
            Err(error) if tried < SUBMIT_TRIES && is_transport(&error) => {
                eprintln!("submission failed ({error:#}); trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error),
        }
    };
    let job = accepted["job_id"]
        .as_str()
        .context("the server's answer has no job_id")?
        .to_string();
    println!("job {job} accepted: {total} items");
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let summary = follow(
        &remote,
        &job,
        total,
        Duration::from_secs(args.reconnect_for_secs),
    )
    .await?;
    println!("{}", summary.line(&job));
    Ok(summary.exit_code())
}

fn is_transport(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<reqwest::Error>().is_some())
}

/// Check that every non-blank line is JSON; the item count.
async fn check_items(path: &Path) -> Result<u64> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = tokio::io::BufReader::new(file).lines();
    let (mut number, mut items) = (0u64, 0u64);
    while let Some(line) = lines.next_line().await? {
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        serde_json::from_str::<serde::de::IgnoredAny>(&line)
            .with_context(|| format!("{} line {number} is not JSON", path.display()))?;
        items += 1;
    }
    if items == 0 {
        bail!("{} has no items", path.display());
    }
    Ok(items)
}

/// `{"items": [<line>, <line>, ...], "options": ...}`, a line at a time.
async fn body_stream(
    path: &Path,
    options: &Value,
) -> Result<impl futures::Stream<Item = std::io::Result<Vec<u8>>> + use<>> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let lines = tokio_stream_lines(tokio::io::BufReader::new(file));
    let head = futures::stream::once(async { Ok(b"{\"items\": [".to_vec()) });
    let tail = format!("], \"options\": {options}}}").into_bytes();
    let mut first = true;
    let items = lines
        .try_filter(|line| futures::future::ready(!line.trim().is_empty()))
        .map_ok(move |line| {
            let mut chunk = Vec::with_capacity(line.len() + 1);
            if !std::mem::take(&mut first) {
                chunk.push(b',');
            }
            chunk.extend_from_slice(line.as_bytes());
            chunk
        });
    Ok(head
        .chain(items)
        .chain(futures::stream::once(async { Ok(tail) })))
}

fn tokio_stream_lines(
    reader: tokio::io::BufReader<tokio::fs::File>,
) -> impl futures::Stream<Item = std::io::Result<String>> {
    futures::stream::try_unfold(reader.lines(), |mut lines| async move {
        Ok(lines.next_line().await?.map(|line| (line, lines)))
    })
}

/// How a followed job ended.
struct Summary {
    end: String,
    succeeded: u64,
    failed: u64,
    total: u64,
    not_run: u64,
    reconnects: u32,
    took: Duration,
    /// Each stage's passes and time summed over items, from `item.stage` events (`--stages`).
    stage_ms: Vec<(String, u64, f64)>,
}

impl Summary {
    fn line(&self, job: &str) -> String {
        let mut line = format!(
            "job {job} {}: {} succeeded, {} failed",
            self.end, self.succeeded, self.failed
        );
        if self.not_run > 0 {
            line += &format!(", {} not run", self.not_run);
        }
        line += &format!(
            " of {} in {:.1} s ({} reconnect{})",
            self.total,
            self.took.as_secs_f64(),
            self.reconnects,
            if self.reconnects == 1 { "" } else { "s" }
        );
        let all: f64 = self.stage_ms.iter().map(|(_, _, ms)| ms).sum();
        if all > 0.0 {
            let shares: Vec<String> = self
                .stage_ms
                .iter()
                .map(|(stage, passes, ms)| format!("{stage} {:.0} % ({passes})", ms * 100.0 / all))
                .collect();
            line += &format!("; stage time: {}", shares.join(", "));
        }
        line
    }

    fn exit_code(&self) -> ExitCode {
        match self.end.as_str() {
            "completed" if self.failed == 0 => ExitCode::SUCCESS,
            "completed" | "cancelled" => ExitCode::from(EXIT_ITEMS_FAILED),
            _ => ExitCode::FAILURE,
        }
    }
}

/// The job's bars: items, and one per stage once stage events arrive.
struct Bars {
    multi: MultiProgress,
    items: ProgressBar,
    /// Per stage: its bar, its passes (a bar's position stops at its length) and its time.
    stages: Vec<(String, ProgressBar, u64, f64)>,
}

impl Bars {
    fn new(total: u64) -> Self {
        let multi = MultiProgress::new();
        let items = multi.add(ProgressBar::new(total).with_style(style("items")));
        Bars {
            multi,
            items,
            stages: Vec::new(),
        }
    }

    /// A line above the bars, or on stderr when they are hidden (not a terminal).
    fn say(&self, line: String) {
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            self.multi.println(line).ok();
        }
    }

    fn counts(&self, succeeded: u64, failed: u64) {
        self.items.set_position(succeeded + failed);
        self.items
            .set_message(format!("{succeeded} ok, {failed} failed"));
    }

    fn stage_done(&mut self, stage: &str, duration_ms: f64) {
        let at = match self.stages.iter().position(|(name, ..)| name == stage) {
            Some(at) => at,
            None => {
                let bar =
                    ProgressBar::new(self.items.length().unwrap_or(0)).with_style(style(stage));
                let bar = self.multi.add(bar);
                self.stages.push((stage.to_string(), bar, 0, 0.0));
                self.stages.len() - 1
            }
        };
        let (_, bar, passes, total_ms) = &mut self.stages[at];
        bar.inc(1);
        *passes += 1;
        *total_ms += duration_ms;
    }
}

fn style(name: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{name:>8} [{{bar:40}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})"
    ))
    .expect("a valid template")
    .progress_chars("=> ")
}

/// Read the job's stream to its end, resuming after drops.
async fn follow(remote: &Remote, job: &str, total: u64, patience: Duration) -> Result<Summary> {
    let started = Instant::now();
    let mut bars = Bars::new(total);
    let mut last_id: Option<String> = None;
    let mut reconnects = 0u32;
    let mut heard = Instant::now();
    let mut wait = Duration::from_millis(200);
    let mut lost = false;
    loop {
        let mut request = remote.request(Method::GET, &format!("/v1/jobs/{job}/events"));
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let dropped = match remote.send(request).await {
            Ok(response) => {
                if std::mem::take(&mut lost) {
                    reconnects += 1;
                }
                let mut events = response.bytes_stream().eventsource();
                loop {
                    match events.next().await {
                        Some(Ok(event)) => {
                            heard = Instant::now();
                            wait = Duration::from_millis(200);
                            if !event.id.is_empty() {
                                last_id = Some(event.id.clone());
                            }
                            let data: Value = serde_json::from_str(&event.data).unwrap_or_default();
                            if let Some(end) = apply(&mut bars, &event.event, &data) {
                                bars.items.finish();
                                for (_, bar, ..) in &bars.stages {
                                    bar.finish();
                                }
                                return Ok(Summary {
                                    reconnects,
                                    took: started.elapsed(),
                                    stage_ms: bars
                                        .stages
                                        .iter()
                                        .map(|(name, _, passes, ms)| (name.clone(), *passes, *ms))
                                        .collect(),
                                    ..end
                                });
                            }
                        }
                        Some(Err(error)) => break format!("{error}"),
                        None => break "the stream ended before the job did".to_string(),
                    }
                }
            }
            // A refusal (401, 404) will not change by asking again.
            Err(error) if !is_transport(&error) => return Err(error),
            Err(error) => format!("{error:#}"),
        };
        if heard.elapsed() > patience {
            bail!("lost the server for {patience:?}: {dropped}");
        }
        lost = true;
        bars.say(format!("connection lost ({dropped}); resuming"));
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Update the bars from one event; the summary once the job has ended.
fn apply(bars: &mut Bars, event: &str, data: &Value) -> Option<Summary> {
    let count = |field: &str| data[field].as_u64().unwrap_or(0);
    match event {
        "job.started" => {
            bars.items.set_length(count("total"));
        }
        "job.progress" | "item.finished" => bars.counts(count("completed"), count("failed")),
        "item.stage" if data["status"] == "succeeded" => {
            let stage = data["stage"].as_str().unwrap_or("?");
            bars.stage_done(stage, data["duration_ms"].as_f64().unwrap_or(0.0));
        }
        "job.completed" | "job.cancelled" | "job.failed" => {
            bars.counts(count("succeeded"), count("failed"));
            if let Some(error) = data["error"].as_str() {
                bars.say(format!("job failed: {error}"));
            }
            return Some(Summary {
                end: event.trim_start_matches("job.").to_string(),
                succeeded: count("succeeded"),
                failed: count("failed"),
                total: count("total"),
                not_run: count("not_run"),
                reconnects: 0,
                took: Duration::ZERO,
                stage_ms: Vec::new(),
            });
        }
        _ => {}
    }
    None
}
