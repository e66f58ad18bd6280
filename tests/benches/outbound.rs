//! Items in flight while they wait on outbound HTTP (issue 20; figures in docs/BENCHMARKS.md):
//! a one-stage pipeline whose stage fetches `/slow?ms=N` from the facts service over loopback,
//! with `max_stage_calls` far below the items in flight: a stage waiting on a request holds no
//! instance, so in-flight requests are bounded by the job's concurrency, not by the pool.
//!
//! `cargo xtask bench outbound [--slow-ms 1000] [--items 2000] [--concurrency 500]
//! [--max-stage-calls 16]`
//!
//! Measured: items/s against the ideal (`min(items, concurrency)` items per `slow-ms`), the
//! server's RSS growth per item in flight, its CPU per item, and that every item succeeded with
//! its request made once.

use std::time::{Duration, Instant};

use serde_json::json;
use stagehand_tests::measure::{arg, cpu_secs, rss_kib, submit_job_async, wait_job_async};
use stagehand_tests::{FactsService, plugin_path, serve};

fn number(name: &str, default: u64) -> u64 {
    arg(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
    })
}

#[tokio::main]
async fn main() {
    let slow_ms = number("--slow-ms", 1000);
    let items = number("--items", 2000) as usize;
    let concurrency = number("--concurrency", 500);
    let max_stage_calls = number("--max-stage-calls", 16);

    let facts = FactsService::start("bench");
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"name = "outbound-bench"
[llm]
base_url = "http://127.0.0.1:9/v1"
model = "mock"

[run]
max_stage_calls = {max_stage_calls}

[limits]
max_concurrency = {concurrency}

[[stage]]
name = "fetch"
component = "{}"
allowed_hosts = ["{}"]
max_attempts = 1
"#,
            plugin_path("hostile").display(),
            facts.origin()
        ),
    )
    .unwrap();
    let mut server = serve(&pipeline, &dir.path().join("data"), None, &[]);
    let pid = server.child().id();
    let url = format!("http://{}", server.address);
    let http = reqwest::Client::new();
    let item = json!({"do": "fetch", "target": facts.url(&format!("/slow?ms={slow_ms}"))});

    let warm = submit_job_async(&http, &url, vec![item.clone()], 1).await;
    wait_job_async(&http, &url, &warm, |_| {}).await;
    let sent_before = facts.received("/slow");

    let (rss_before, cpu_before) = (rss_kib(pid), cpu_secs(pid));
    let started = Instant::now();
    let job = submit_job_async(&http, &url, vec![item; items], concurrency).await;
    let mut peak = rss_before;
    let status = wait_job_async(&http, &url, &job, |_| peak = peak.max(rss_kib(pid))).await;
    let elapsed = started.elapsed();
    let cpu = cpu_secs(pid) - cpu_before;
    assert_eq!(status["succeeded"], items, "{status}");
    let sent = facts.received("/slow") - sent_before;
    assert_eq!(sent, items as u64, "each request made once");

    let in_flight = (items as u64).min(concurrency) as f64;
    let ideal = in_flight / Duration::from_millis(slow_ms).as_secs_f64();
    let rate = items as f64 / elapsed.as_secs_f64();
    println!(
        "outbound: {items} items at concurrency {concurrency}, one request of {slow_ms} ms each, max_stage_calls {max_stage_calls}"
    );
    println!(
        "outbound: {:.1} s, {rate:.0} items/s = {:.1} % of the ideal {ideal:.0} ({:.0} times what {max_stage_calls} held instances would allow)",
        elapsed.as_secs_f64(),
        100.0 * rate / ideal,
        rate / (max_stage_calls as f64 / Duration::from_millis(slow_ms).as_secs_f64())
    );
    println!(
        "outbound: server RSS {} MiB before, peak {} MiB: {:.1} KiB per item in flight",
        rss_before / 1024,
        peak / 1024,
        (peak as f64 - rss_before as f64) / in_flight
    );
    println!(
        "outbound: server CPU {cpu:.1} s, {:.2} ms per item; {sent} requests sent",
        cpu * 1e3 / items as f64
    );
}
