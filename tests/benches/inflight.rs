//! Items in flight while they wait on the LLM (issue 17; figures in docs/BENCHMARKS.md): the
//! eco-scan server and the mock LLM over loopback, the mock answering vision after
//! `--vision-ms` and the answer after `--answer-ms`; one job of `--items` items at
//! `--concurrency`, the provider's and the job's limits raised to match.
//!
//! `cargo xtask bench inflight [--vision-ms 5000] [--answer-ms 5000] [--items 20000]
//! [--concurrency 10000] [--max-stage-calls 256] [--evict-after-ms 10]`
//!
//! Measured: items/s against the ideal (every item in flight waits exactly vision + answer:
//! `min(items, concurrency)` items per that time), the server's RSS before the job and at its
//! peak (growth per item in flight), the server's CPU per item, and that every item succeeded.

use std::time::{Duration, Instant};

use stagehand_tests::measure::{
    arg, cpu_secs, get_json_async, rss_kib, submit_job_async, wait_job_async,
};
use stagehand_tests::{MockLlm, eco_items, eco_scan_pipeline, serve};

fn number(name: &str, default: u64) -> u64 {
    arg(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
    })
}

#[tokio::main]
async fn main() {
    let vision_ms = number("--vision-ms", 5000);
    let answer_ms = number("--answer-ms", 5000);
    let items = number("--items", 20_000) as usize;
    let concurrency = number("--concurrency", 10_000);
    let max_stage_calls = number("--max-stage-calls", 256);
    let evict_after_ms = number("--evict-after-ms", 10);

    let mock = MockLlm::start(&[
        "--vision-latency-ms",
        &vision_ms.to_string(),
        "--latency-ms",
        &answer_ms.to_string(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = eco_scan_pipeline(dir.path(), |text| {
        text.replace(
            "max_concurrent_requests = 64",
            &format!("max_concurrent_requests = {concurrency}"),
        )
        .replace(
            "[run]\n",
            &format!(
                "[run]\nmax_stage_calls = {max_stage_calls}\nevict_after_ms = {evict_after_ms}\n"
            ),
        ) + &format!("\n[limits]\nmax_concurrency = {concurrency}\n")
    });
    let mut server = serve(&pipeline, &dir.path().join("data"), Some(&mock), &[]);
    let pid = server.child().id();
    let url = format!("http://{}", server.address);
    let http = reqwest::Client::new();

    // Warm: one item through every stage (compiles nothing, but fills the pool's first slots).
    let warm = submit_job_async(&http, &url, eco_items(1), 1).await;
    wait_job_async(&http, &url, &warm, |_| {}).await;

    let flushes_before = metric(&http, &url, "stagehand_store_flushes_total").await;
    let (rss_before, cpu_before) = (rss_kib(pid), cpu_secs(pid));
    let started = Instant::now();
    let job = submit_job_async(&http, &url, eco_items(items), concurrency).await;
    let mut peak = rss_before;
    let status = wait_job_async(&http, &url, &job, |_| peak = peak.max(rss_kib(pid))).await;
    let elapsed = started.elapsed();
    let cpu = cpu_secs(pid) - cpu_before;
    let flushes = metric(&http, &url, "stagehand_store_flushes_total").await - flushes_before;
    assert_eq!(status["state"], "completed", "{status}");
    if status["succeeded"] != items {
        let failed =
            get_json_async(&http, &format!("{url}/v1/dead-letters?job={job}&limit=2")).await;
        panic!("not every item succeeded: {status}\nfor instance: {failed}");
    }

    let per_item = Duration::from_millis(vision_ms + answer_ms);
    let in_flight = (items as u64).min(concurrency) as f64;
    let ideal = in_flight / per_item.as_secs_f64();
    let rate = items as f64 / elapsed.as_secs_f64();
    let growth_mib = (peak as f64 - rss_before as f64) / 1024.0;
    println!(
        "inflight: {items} items at concurrency {concurrency}, vision {vision_ms} ms + answer {answer_ms} ms, max_stage_calls {max_stage_calls}, evict_after_ms {evict_after_ms}"
    );
    println!(
        "inflight: {:.1} s, {rate:.0} items/s = {:.1} % of the ideal {ideal:.0}",
        elapsed.as_secs_f64(),
        100.0 * rate / ideal
    );
    println!(
        "inflight: server RSS {} MiB before, peak {} MiB: +{growth_mib:.0} MiB, {:.1} KiB per item in flight",
        rss_before / 1024,
        peak / 1024,
        (peak as f64 - rss_before as f64) / in_flight
    );
    println!(
        "inflight: server CPU {cpu:.1} s, {:.2} ms per item",
        cpu * 1e3 / items as f64
    );
    println!(
        "inflight: {flushes:.0} store flushes, {:.0} a second",
        flushes / elapsed.as_secs_f64()
    );
    println!("inflight: mock {}", mock.stats());
}

/// The value of `series` on the server's `/metrics`, 0 when it is not there.
async fn metric(http: &reqwest::Client, url: &str, series: &str) -> f64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    stagehand_tests::metric_in(&text, series).unwrap_or(0.0)
}
