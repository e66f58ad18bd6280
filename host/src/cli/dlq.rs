//! `stagehand dlq list|show|discard|reprocess`: a running server's dead letters. Discarding
//! and reprocessing are admin routes: `--token` is then the server's admin token.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::remote::{Remote, RemoteArgs};

#[derive(Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One line per dead letter: job, index, stage, error.
    List {
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        stage: Option<String>,
        /// One JSON object per line instead.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full (every try, and the input of the stage that failed), as JSON.
    Show { job: String, index: u64 },
    /// Drop it; the item's failed result stays.
    Discard { job: String, index: u64 },
    /// Run a job's dead letters again from the stage that failed: all, or those at `indices`.
    Reprocess { job: String, indices: Vec<u64> },
}

pub async fn dlq(args: DlqArgs) -> Result<ExitCode> {
    let remote = Remote::new(&args.remote)?;
    match args.command {
        DlqCommand::List { job, stage, json } => list(&remote, job, stage, json).await?,
        DlqCommand::Show { job, index } => {
            let letter = remote
                .get(&format!("/v1/dead-letters/{job}/{index}"))
                .await?;
            println!("{}", serde_json::to_string_pretty(&letter)?);
        }
        DlqCommand::Discard { job, index } => {
            let path = format!("/v1/dead-letters/{job}/{index}");
            remote.json(remote.request(Method::DELETE, &path)).await?;
            println!("discarded {job}/{index}");
        }
        DlqCommand::Reprocess { job, indices } => {
            let mut request = remote.request(Method::POST, &format!("/v1/jobs/{job}/reprocess"));
            if !indices.is_empty() {
                request = request.json(&json!({ "indices": indices }));
            }
            let answer = remote.json(request).await?;
            println!(
                "job {job}: reprocessing {}",
                answer["reprocessing"].as_u64().unwrap_or(0)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(
    remote: &Remote,
    job: Option<String>,
    stage: Option<String>,
    json: bool,
) -> Result<()> {
    let mut after: Option<String> = None;
    loop {
        let mut query = vec![("limit", "1000".to_string())];
        query.extend(job.clone().map(|j| ("job", j)));
        query.extend(stage.clone().map(|s| ("stage", s)));
        query.extend(after.clone().map(|a| ("after", a)));
        let page = remote
            .json(
                remote
                    .request(Method::GET, "/v1/dead-letters")
                    .query(&query),
            )
            .await?;
        for letter in page["dead_letters"].as_array().into_iter().flatten() {
            if json {
                println!("{letter}");
            } else {
                println!("{}", line(letter));
            }
        }
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(()),
        }
    }
}

fn line(letter: &Value) -> String {
    format!(
        "{}/{}  {}  {}: {}",
        letter["job_id"].as_str().unwrap_or("?"),
        letter["index"],
        letter["stage"].as_str().unwrap_or("?"),
        letter["error"]["kind"].as_str().unwrap_or("?"),
        letter["error"]["message"].as_str().unwrap_or(""),
    )
}
