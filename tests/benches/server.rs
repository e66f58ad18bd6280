//! Benchmarks of the server (issue 3; figures in docs/BENCHMARKS.md), against the real
//! `stagehand serve` binary and the mock LLM over loopback, the client in this process. Run with
//! `cargo xtask bench server [--only submits|subscribers|swap|million] [--submits N] [--subscribers N]
//! [--items N]`.
//!
//! - `submits`: N clients at once each `POST /v1/jobs` one item, then open the job's stream;
//!   measured: the 202 (the job is durably in sled) and the first event, from the POST's start.
//! - `subscribers`: N streams on one running job; measured: the server's RSS before and after
//!   they connect, and for every live frame its fan-out delay (arrival minus the `at` the
//!   server logged it with; client and server share the clock).
//! - `swap`: hot swap of a stage, compiled and from the compile cache.
//! - `million`: one job of N pass-through items; measured: the server's RSS when 10,000 and when
//!   N items are done, and the latency of result pages at the start and at the end of the job.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagehand_tests::measure::{arg, cpu_secs, now_ms, percentile, rss_kib};
use stagehand_tests::{MockLlm, repo_root, serve};
use tokio::sync::Barrier;

fn number(name: &str, default: usize) -> usize {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn submit(http: &reqwest::Client, server: &str, body: Value) -> Value {
    let response = http
        .post(format!("{server}/v1/jobs"))
        .json(&body)
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    response.json().await.expect("JSON")
}

/// Reads an SSE body frame by frame; only what the benchmarks need.
struct Frames {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Frames {
    async fn open(http: &reqwest::Client, url: String) -> Self {
        let response = http.get(url).send().await.expect("events");
        assert_eq!(response.status(), 200);
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next message's `event:` and `data:`; `None` at the end of the stream.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let message: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&message);
                let mut event = String::new();
                let mut data = None;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(v).ok();
                    }
                }
                if let Some(data) = data {
                    return Some((event, data));
                }
                continue;
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }
}

fn eco_item() -> Value {
    json!({ "user_id": "u1", "image_url": "https://images.example/pet_bottle.jpg" })
}

/// N clients submit at once; each then waits for its job's first event.
async fn submits(n: usize) {
    // Jobs wait on a slow model, so the jobs already accepted do not compete with the submits.
    let mock = MockLlm::start(&["--latency-ms", "30000"]);
    let data = tempfile::tempdir().unwrap();
    let mut server = serve(
        &repo_root().join("examples/eco-scan/pipeline.toml"),
        data.path(),
        Some(&mock),
        &[],
    );
    let pid = server.child().id();
    let url = format!("http://{}", server.address);
    let http = client();
    let one = |http: reqwest::Client, url: String| async move {
        let started = Instant::now();
        let body = submit(&http, &url, json!({ "items": [eco_item()] })).await;
        let accepted = started.elapsed();
        let events = format!("{url}{}", body["events_url"].as_str().unwrap());
        let (event, _) = Frames::open(&http, events).await.next().await.unwrap();
        assert_eq!(event, "job.started");
        (ms(accepted), ms(started.elapsed()))
    };
    for _ in 0..20 {
        one(http.clone(), url.clone()).await;
    }
    let (idle_accept, idle_first) = one(http.clone(), url.clone()).await;
    println!("submits: one at idle: 202 in {idle_accept:.1} ms, first event {idle_first:.1} ms");

    if let Some(secs) = arg("--pause") {
        // Time to attach a profiler to the server.
        println!("submits: server pid {pid}; the burst starts in {secs} s");
        tokio::time::sleep(Duration::from_secs(secs.parse().unwrap())).await;
    }
    let barrier = Arc::new(Barrier::new(n));
    let cpu_before = cpu_secs(pid);
    let started = Instant::now();
    // All at once, or (with `--rate R`) client i starts at i / R seconds.
    let rate: Option<f64> = arg("--rate").map(|r| r.parse().unwrap());
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (http, url, barrier) = (http.clone(), url.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                if let Some(rate) = rate {
                    tokio::time::sleep_until(
                        tokio::time::Instant::from_std(started)
                            + Duration::from_secs_f64(i as f64 / rate),
                    )
                    .await;
                }
                one(http, url).await
            })
        })
        .collect();
    let (mut accepted, mut first) = (Vec::new(), Vec::new());
    for task in tasks {
        let (a, f) = task.await.unwrap();
        accepted.push(a);
        first.push(f);
    }
    let elapsed = started.elapsed();
    let server_cpu = cpu_secs(pid) - cpu_before;
    let mut after_accept: Vec<f64> = first.iter().zip(&accepted).map(|(f, a)| f - a).collect();
    after_accept.sort_by(f64::total_cmp);
    accepted.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);
    println!(
        "submits: {n} {}: 202 p50 {:.1} ms p99 {:.1} ms; first event p50 {:.1} ms p99 {:.1} ms max {:.1} ms; all in {:.2} s; server CPU {:.2} s ({:.2} ms per submit)",
        rate.map_or("at once".to_string(), |r| format!("at {r}/s")),
        percentile(&accepted, 0.5),
        percentile(&accepted, 0.99),
        percentile(&first, 0.5),
        percentile(&first, 0.99),
        first.last().unwrap(),
        elapsed.as_secs_f64(),
        server_cpu,
        server_cpu * 1e3 / n as f64
    );
    println!(
        "submits: from the 202 to the first event: p50 {:.1} ms p99 {:.1} ms",
        percentile(&after_accept, 0.5),
        percentile(&after_accept, 0.99)
    );
}

/// N subscribers follow one job of `items` items that finish one every `item_ms`.
async fn subscribers(n: usize, items: usize, item_ms: u64) {
    let latency = item_ms.to_string();
    let mock = MockLlm::start(&["--latency-ms", &latency]);
    let data = tempfile::tempdir().unwrap();
    let mut server = serve(
        &repo_root().join("examples/prompt-eval/pipeline.toml"),
        data.path(),
        Some(&mock),
        &[],
    );
    let pid = server.child().id();
    let url = format!("http://{}", server.address);
    let http = client();
    let cases: Vec<Value> = (0..items)
        .map(|i| json!({ "prompt": format!("question {i}"), "expected": "x", "match": "exact" }))
        .collect();
    let body = submit(
        &http,
        &url,
        json!({ "items": cases, "options": { "concurrency": 1 } }),
    )
    .await;
    let events = format!("{url}{}?max_items=1", body["events_url"].as_str().unwrap());
    // A few streams first, so the baseline includes the stream path's one-off allocations.
    let mut warm = Frames::open(&http, events.clone()).await;
    warm.next().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib(pid);

    let connected = Arc::new(AtomicUsize::new(0));
    let all_connected = Arc::new(tokio::sync::Notify::new());
    let live_from = Arc::new(std::sync::OnceLock::<u64>::new());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    // Connect in waves, as browsers arriving would, rather than one SYN flood.
    for wave in 0..n.div_ceil(500) {
        let mut opened = Vec::new();
        for _ in wave * 500..((wave + 1) * 500).min(n) {
            let (http, events) = (http.clone(), events.clone());
            opened.push(tokio::spawn(async move {
                let mut frames = Frames::open(&http, events).await;
                frames.next().await.expect("job.started");
                frames
            }));
        }
        for frames in opened {
            let mut frames = frames.await.unwrap();
            let (connected, all_connected, live_from) =
                (connected.clone(), all_connected.clone(), live_from.clone());
            tasks.push(tokio::spawn(async move {
                if connected.fetch_add(1, Ordering::SeqCst) + 1 == n {
                    all_connected.notify_one();
                }
                let mut delays = Vec::new();
                while let Some((event, data)) = frames.next().await {
                    let arrived = now_ms();
                    let at = data["at"].as_u64().expect("every frame has `at`");
                    if live_from.get().is_some_and(|&from| at > from) {
                        delays.push(arrived.saturating_sub(at) as f64);
                    }
                    if event == "job.completed" {
                        break;
                    }
                }
                delays
            }));
        }
    }
    all_connected.notified().await;
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    live_from.set(now_ms()).unwrap();
    let mut delays = Vec::new();
    for task in tasks {
        delays.extend(task.await.unwrap());
    }
    delays.sort_by(f64::total_cmp);
    assert!(!delays.is_empty(), "no live frame after all connected");
    println!(
        "subscribers: {n} streams connected in {:.1} s; server RSS {} -> {} KiB: {:.2} KiB per subscriber",
        connect_time.as_secs_f64(),
        before,
        after,
        (after.saturating_sub(before)) as f64 / n as f64
    );
    println!(
        "subscribers: {} live deliveries: fan-out p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        delays.last().unwrap()
    );
    drop(warm);
}

/// One job of `n` pass-through items: memory and result pages along the way.
async fn million(n: usize) {
    let data = tempfile::tempdir().unwrap();
    let plugins = std::env::var("STAGEHAND_PLUGINS_DIR").unwrap_or_else(|_| {
        repo_root()
            .join("target/wasm32-wasip2/release")
            .display()
            .to_string()
    });
    let pipeline = data.path().join("pipeline.toml");
    let stage = |name: &str| {
        format!("[[stage]]\nname = \"{name}\"\ncomponent = \"{plugins}/passthrough.wasm\"\n")
    };
    std::fs::write(
        &pipeline,
        format!(
            "name = \"passthrough\"\n[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"none\"\n{}{}{}{}",
            stage("a"),
            stage("b"),
            stage("c"),
            stage("d")
        ),
    )
    .unwrap();
    let mut server = serve(&pipeline, data.path(), None, &["--max-body-mib", "256"]);
    let pid = server.child().id();
    let url = format!("http://{}", server.address);
    let http = client();
    let items: Vec<Value> = (0..n).map(|i| json!({ "n": i })).collect();
    let started = Instant::now();
    let body = submit(&http, &url, json!({ "items": items })).await;
    drop(items);
    let accepted = started.elapsed();
    let status_url = format!("{url}{}", body["status_url"].as_str().unwrap());
    let results_url = format!("{url}{}", body["results_url"].as_str().unwrap());
    let done = |status: &Value| {
        status["succeeded"].as_u64().unwrap_or(0) + status["failed"].as_u64().unwrap_or(0)
    };
    let mut samples = Vec::new();
    let mut at_10k = None;
    loop {
        let status: Value = http
            .get(&status_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let finished = done(&status) as usize;
        let rss = rss_kib(pid);
        if at_10k.is_none() && finished >= 10_000.min(n) {
            at_10k = Some((finished, rss));
        }
        samples.push((finished, rss));
        if status["state"] != "running" {
            assert_eq!(status["state"], "completed", "{status}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed();
    let (first_done, first_rss) = at_10k.unwrap();
    let (_, last_rss) = *samples.last().unwrap();
    let peak = samples.iter().map(|s| s.1).max().unwrap();
    println!(
        "million: {n} items accepted in {:.1} s, done in {:.1} s ({:.0} items/s)",
        accepted.as_secs_f64(),
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "million: server RSS {first_rss} KiB at {first_done} items, {last_rss} KiB at {n} (peak {peak}): grew {:.1} MiB",
        (last_rss as f64 - first_rss as f64) / 1024.0
    );
    let page = |after: Option<usize>| {
        let (http, results_url) = (http.clone(), results_url.clone());
        async move {
            let query = after.map(|a| format!("&after={a}")).unwrap_or_default();
            let mut times = Vec::new();
            for _ in 0..50 {
                let started = Instant::now();
                let page: Value = http
                    .get(format!("{results_url}?limit=100{query}"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                times.push(ms(started.elapsed()));
                assert_eq!(page["results"].as_array().unwrap().len(), 100);
            }
            times.sort_by(f64::total_cmp);
            (percentile(&times, 0.5), percentile(&times, 0.99))
        }
    };
    let start = page(None).await;
    let end = page(Some(n - 101)).await;
    let middle = page(Some(n / 2)).await;
    println!(
        "million: a page of 100 results: p50/p99 {:.2}/{:.2} ms at the start, {:.2}/{:.2} ms in the middle, {:.2}/{:.2} ms at the end",
        start.0, start.1, middle.0, middle.1, end.0, end.1
    );
}

/// Hot swap of the `answer` stage: an upload that must be compiled, then uploads of a version
/// whose compiled form is cached (after a rollback), each until the swap is in effect (the
/// response: the next stage entry uses it).
async fn swap(rounds: usize) {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let token = "bench-token";
    let _server = serve(
        &repo_root().join("examples/eco-scan/pipeline.toml"),
        data.path(),
        Some(&mock),
        &["--admin-token", token],
    );
    let url = format!("http://{}", _server.address);
    let http = client();
    let put = |wasm: Vec<u8>| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let started = Instant::now();
            let response = http
                .put(format!("{url}/v1/stages/answer"))
                .bearer_auth(token)
                .body(wasm)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            (ms(started.elapsed()), body["compile_ms"].as_f64())
        }
    };
    let rollback = || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http
                .post(format!("{url}/v1/stages/answer/rollback"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    };
    let wasm =
        stagehand_tests::with_custom_section(stagehand_tests::plugin_bytes("answer"), "bench");
    let (first, compile) = put(wasm.clone()).await;
    let mut cached = Vec::new();
    for _ in 0..rounds {
        rollback().await;
        let (took, compile) = put(wasm.clone()).await;
        assert!(compile.is_none(), "a cached version is not compiled again");
        cached.push(took);
    }
    cached.sort_by(f64::total_cmp);
    println!(
        "swap: upload needing a compile: {first:.1} ms (compile {:.1} ms); upload of a cached version ({} KiB): p50 {:.2} ms, p99 {:.2} ms",
        compile.unwrap_or(0.0),
        wasm.len() / 1024,
        percentile(&cached, 0.5),
        percentile(&cached, 0.99)
    );
}

fn main() {
    let only = arg("--only");
    let runs = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        if runs("submits") {
            submits(number("--submits", 1000)).await;
        }
        if runs("subscribers") {
            subscribers(number("--subscribers", 10_000), 20, 1500).await;
        }
        if runs("swap") {
            swap(number("--rounds", 50)).await;
        }
        if runs("million") {
            million(number("--items", 1_000_000)).await;
        }
    });
}
