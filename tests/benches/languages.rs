//! What a stage's language costs (issue 20; figures in docs/BENCHMARKS.md): the fact-check
//! example's `lookup` stage (one outbound request to the facts service, one LLM call) as the
//! Rust component and as the JavaScript one, and the polyglot pipeline (JavaScript `lookup`,
//! then Python `cite` with a second request), each serving the same items through one server
//! with the mock LLM.
//!
//! `cargo xtask bench languages [--items 500] [--concurrency 32]`
//!
//! Measured per pipeline: items/s, the server's CPU per item (the guests run in it) and its
//! peak RSS; every item must succeed.

use std::time::Instant;

use serde_json::{Value, json};
use stagehand_tests::measure::{
    arg, cpu_secs, peak_rss_kib, rss_kib, submit_job_async, wait_job_async,
};
use stagehand_tests::{FactsService, MockLlm, Server, binary, repo_root};

/// A case: its label, the example's pipeline file, and how to edit that file.
type Case = (&'static str, &'static str, fn(String) -> String);

fn number(name: &str, default: u64) -> u64 {
    arg(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
    })
}

/// `stagehand serve` of `examples/fact-check/<file>`, edited by `edit`, against `facts`.
fn serve(
    file: &str,
    edit: impl Fn(String) -> String,
    facts: &FactsService,
    mock: &MockLlm,
    data: &std::path::Path,
) -> Server {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("examples/fact-check").join(file))
        .unwrap()
        .replace("\"../../target/", &format!("\"{}/target/", root.display()))
        .replace("http://127.0.0.1:9200", &facts.origin());
    let text = edit(text);
    std::fs::create_dir_all(data).unwrap();
    let pipeline = data.join(file);
    std::fs::write(&pipeline, text).unwrap();
    let mut command = std::process::Command::new(binary("stagehand"));
    command
        .args(["serve", &pipeline.display().to_string()])
        .args(["--addr", "127.0.0.1:0", "--data-dir"])
        .arg(data.join("data"))
        .args(["--llm-base-url", &mock.base_url()])
        .env("FACTS_API_KEY", &facts.key);
    Server::start_command(command).unwrap()
}

#[tokio::main]
async fn main() {
    let items = number("--items", 500) as usize;
    let concurrency = number("--concurrency", 32);
    let facts = FactsService::start("bench-key");
    let mock = MockLlm::start(&[]);
    let questions: Vec<Value> =
        std::fs::read_to_string(repo_root().join("examples/fact-check/items.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let batch: Vec<Value> = questions.iter().cycle().take(items).cloned().collect();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let js = |text: String| {
        text.replace("release/lookup.wasm\"", "release/lookup_js.wasm\"")
            .replace(
                "name = \"fact-check\"",
                "name = \"fact-check\"\n[defaults]\nmemory_mib = 128",
            )
    };
    let cases: [Case; 3] = [
        ("lookup in Rust", "pipeline.toml", |t| t),
        ("lookup in JavaScript", "pipeline.toml", js),
        (
            "lookup in JavaScript + cite in Python",
            "polyglot.toml",
            |t| t,
        ),
    ];
    println!(
        "languages: {items} items at concurrency {concurrency}, mock LLM without latency, facts service on loopback"
    );
    for (case, (label, file, edit)) in cases.into_iter().enumerate() {
        let mut server = serve(
            file,
            edit,
            &facts,
            &mock,
            &dir.path().join(case.to_string()),
        );
        let pid = server.child().id();
        let url = format!("http://{}", server.address);
        // One item first: the component compiles and its first instance starts.
        let warm = submit_job_async(&http, &url, vec![json!(questions[0])], 1).await;
        wait_job_async(&http, &url, &warm, |_| {}).await;
        let (rss_before, cpu_before) = (rss_kib(pid), cpu_secs(pid));
        let started = Instant::now();
        let job = submit_job_async(&http, &url, batch.clone(), concurrency).await;
        let status = wait_job_async(&http, &url, &job, |_| {}).await;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_secs(pid) - cpu_before;
        assert_eq!(status["succeeded"], items, "{label}: {status}");
        println!(
            "languages: {label}: {:.0} items/s, server CPU {:.1} ms per item, RSS {} MiB after warm-up, peak {} MiB",
            items as f64 / elapsed,
            cpu * 1e3 / items as f64,
            rss_before / 1024,
            peak_rss_kib(pid) / 1024
        );
    }
}
