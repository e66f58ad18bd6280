//! What one LLM request in flight costs the host's HTTP client, apart from everything else
//! (issue 17's memory per waiting item; figures in docs/BENCHMARKS.md): `--requests` chat
//! requests at once from this process to the mock LLM, answering after `--latency-ms`, each
//! in its own task with the same reqwest client settings the host uses; RSS growth per request.
//!
//! `cargo xtask bench llm-client [--requests 10000] [--latency-ms 4000] [--stream]`

use std::time::Duration;

use serde_json::json;
use stagehand_tests::MockLlm;
use stagehand_tests::measure::{arg, rss_kib};

#[tokio::main]
async fn main() {
    let requests: usize = arg("--requests").map_or(10_000, |v| v.parse().expect("a number"));
    let latency_ms: u64 = arg("--latency-ms").map_or(4000, |v| v.parse().expect("a number"));
    let stream = std::env::args().any(|a| a == "--stream");
    rlimit::increase_nofile_limit(u64::MAX).expect("open files for every request");
    let mock = MockLlm::start(&["--latency-ms", &latency_ms.to_string()]);
    // As `capabilities/llm/provider.rs` builds it.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(requests)
        .build()
        .unwrap();
    let url = format!("{}/chat/completions", mock.base_url());
    let body = json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "Answer with one word: the bin for the item."},
            {"role": "user", "content": "a crushed soda can"},
        ],
    });
    let pid = std::process::id();
    let before = rss_kib(pid);
    let tasks: Vec<_> = (0..requests)
        .map(|_| {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let answer = http.post(url).json(&body).send().await.unwrap();
                assert!(answer.status().is_success(), "{}", answer.status());
                answer.bytes().await.unwrap().len()
            })
        })
        .collect();
    // Sample while every request waits on the mock.
    let mut peak = before;
    let sampling = Duration::from_millis(latency_ms * 9 / 10);
    let started = std::time::Instant::now();
    while started.elapsed() < sampling {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(rss_kib(pid));
    }
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "llm-client: {requests} requests in flight (stream: {stream}): RSS {before} KiB before, \
         peak {peak} KiB: {:.1} KiB per request",
        (peak - before) as f64 / requests as f64
    );
}
