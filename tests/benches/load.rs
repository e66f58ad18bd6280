//! A load test in the style of seed 003's k6 script: virtual users ramp up, hold, ramp down;
//! each one loops `POST /v1/scans`, then reads the scan's SSE stream to its end. Thresholds on
//! the failure rate, the total duration p95 and the first-event p95 decide the exit status, as
//! k6's do.
//!
//! `cargo xtask load [--vus 34] [--scale 0.1] [--server URL --token T] [...]`
//!
//! Without `--server` it starts the mock LLM with seed 003's stage latencies times `--scale`
//! (vision 4.5 s, answer 4.8 s; rule and reward run in-process here, with no LLM call) and the
//! eco-scan example server. The profile (ramp 60 s, hold 90 s, ramp down 30 s) and the
//! thresholds (failed < 30 %, total p95 < 30 s, first event p95 < 8 s) are the seed's, times
//! `--scale` too, so a scaled run asks the same of the system in a tenth of the time.
//!
//! Measured per scan, from the start of the POST: the first SSE event, and the terminal event
//! (`job.completed` with the item succeeded counts as a success; anything else, an HTTP error
//! or a dropped stream, as a failure).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;
use stagehand_tests::measure::{arg, percentile, rss_kib};
use stagehand_tests::{MockLlm, Server, eco_items};

struct Options {
    vus: usize,
    scale: f64,
    ramp: Duration,
    hold: Duration,
    down: Duration,
    max_failure_rate: f64,
    p95_total: Duration,
    p95_first_event: Duration,
    server: Option<String>,
    token: Option<String>,
    /// The LLM concurrency cap of the server this tool starts (the example's is 64).
    llm_concurrency: Option<usize>,
}

fn number(name: &str, default: f64) -> f64 {
    arg(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
    })
}

impl Options {
    fn from_args() -> Self {
        let scale = number("--scale", 0.1);
        let secs = |name: &str, seed: f64| Duration::from_secs_f64(number(name, seed * scale));
        Options {
            vus: number("--vus", 34.0) as usize,
            scale,
            ramp: secs("--ramp-secs", 60.0),
            hold: secs("--hold-secs", 90.0),
            down: secs("--down-secs", 30.0),
            max_failure_rate: number("--max-failure-rate", 0.3),
            p95_total: secs("--p95-total-secs", 30.0),
            p95_first_event: secs("--p95-first-event-secs", 8.0),
            server: arg("--server"),
            token: arg("--token"),
            llm_concurrency: arg("--llm-concurrency").map(|v| v.parse().expect("a number")),
        }
    }

    /// Virtual users wanted `elapsed` into the run: k6's linear stages.
    fn target(&self, elapsed: Duration) -> usize {
        let vus = self.vus as f64;
        let t = elapsed.as_secs_f64();
        let (ramp, hold, down) = (
            self.ramp.as_secs_f64(),
            self.hold.as_secs_f64(),
            self.down.as_secs_f64(),
        );
        let wanted = if t < ramp {
            vus * t / ramp
        } else if t < ramp + hold {
            vus
        } else if t < ramp + hold + down {
            vus * (1.0 - (t - ramp - hold) / down)
        } else {
            0.0
        };
        wanted.ceil() as usize
    }

    fn length(&self) -> Duration {
        self.ramp + self.hold + self.down
    }
}

/// One scan, as a virtual user saw it.
struct Sample {
    ok: bool,
    first_event: Option<Duration>,
    total: Duration,
    failure: Option<String>,
}

struct Target {
    root: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Target {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.root));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

async fn scan(target: &Target, item: &Value) -> Sample {
    let started = Instant::now();
    let failed = |why: String, first_event| Sample {
        ok: false,
        first_event,
        total: started.elapsed(),
        failure: Some(why),
    };
    let accepted = match target
        .request(reqwest::Method::POST, "/v1/scans")
        .json(item)
        .send()
        .await
    {
        Ok(response) if response.status() == 202 => response,
        Ok(response) => return failed(format!("POST {}", response.status()), None),
        Err(error) => return failed(format!("POST: {error}"), None),
    };
    let Ok(accepted) = accepted.json::<Value>().await else {
        return failed("POST: not JSON".into(), None);
    };
    let events_url = accepted["events_url"].as_str().unwrap_or_default();
    let stream = match target
        .request(reqwest::Method::GET, events_url)
        .send()
        .await
    {
        Ok(response) if response.status() == 200 => response,
        Ok(response) => return failed(format!("SSE {}", response.status()), None),
        Err(error) => return failed(format!("SSE: {error}"), None),
    };
    let mut events = stream.bytes_stream().eventsource();
    let mut first_event = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => return failed(format!("SSE: {error}"), first_event),
        };
        first_event.get_or_insert_with(|| started.elapsed());
        match event.event.as_str() {
            "job.completed" => {
                let data: Value = serde_json::from_str(&event.data).unwrap_or_default();
                return if data["succeeded"] == 1 {
                    Sample {
                        ok: true,
                        first_event,
                        total: started.elapsed(),
                        failure: None,
                    }
                } else {
                    failed(item_error(target, &accepted).await, first_event)
                };
            }
            "job.cancelled" | "job.failed" => return failed(event.event, first_event),
            _ => {}
        }
    }
    failed("SSE: the stream ended early".into(), first_event)
}

/// Why a scan's item failed, from its result: `stage kind: message`.
async fn item_error(target: &Target, accepted: &Value) -> String {
    let url = accepted["results_url"].as_str().unwrap_or_default();
    let page: Value = match target.request(reqwest::Method::GET, url).send().await {
        Ok(response) => response.json().await.unwrap_or_default(),
        Err(error) => return format!("the item failed (results: {error})"),
    };
    let error = &page["results"][0]["error"];
    let message: String = error["message"]
        .as_str()
        .unwrap_or("")
        .chars()
        .take(120)
        .collect();
    format!(
        "item failed at {} ({}): {message}",
        error["stage"].as_str().unwrap_or("?"),
        error["kind"].as_str().unwrap_or("?")
    )
}

fn main() {
    let options = Options::from_args();
    // The tool's own processes: the mock LLM and the server, unless a server is given.
    let mut started: Option<(MockLlm, Server, tempfile::TempDir)> = None;
    let root = match &options.server {
        Some(root) => root.trim_end_matches('/').to_string(),
        None => {
            let ms = |seed: f64| ((seed * options.scale) as u64).to_string();
            let mock = MockLlm::start(&[
                "--vision-latency-ms",
                &ms(4500.0),
                "--latency-ms",
                &ms(4800.0),
            ]);
            let data = tempfile::tempdir().unwrap();
            let pipeline = load_pipeline(data.path(), options.llm_concurrency);
            let server =
                stagehand_tests::serve(&pipeline, &data.path().join("data"), Some(&mock), &[]);
            let root = server.url("");
            started = Some((mock, server, data));
            root
        }
    };
    let server_pid = started.as_mut().map(|(_, server, _)| server.child().id());
    eprintln!(
        "load: {} virtual users, ramp {:?} hold {:?} down {:?} against {root}",
        options.vus, options.ramp, options.hold, options.down
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(run(&options, root, server_pid));
    let passed = report.print(&options);
    drop(started);
    std::process::exit(if passed { 0 } else { 1 });
}

/// The eco-scan example with absolute paths (and the LLM cap, if given).
fn load_pipeline(dir: &std::path::Path, llm_concurrency: Option<usize>) -> std::path::PathBuf {
    stagehand_tests::eco_scan_pipeline(dir, |text| match llm_concurrency {
        Some(n) => text.replace(
            "max_concurrent_requests = 64",
            &format!("max_concurrent_requests = {n}"),
        ),
        None => text,
    })
}

struct Report {
    samples: Vec<Sample>,
    took: Duration,
    peak_vus: usize,
    peak_rss_kib: Option<u64>,
}

async fn run(options: &Options, root: String, server_pid: Option<u32>) -> Report {
    let target = Arc::new(Target {
        root,
        token: options.token.clone(),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap(),
    });
    let samples = Arc::new(Mutex::new(Vec::new()));
    let wanted = Arc::new(AtomicUsize::new(0));
    let begun = Instant::now();
    let items = eco_items(60);
    let mut users = tokio::task::JoinSet::new();
    let (mut spawned, mut peak_rss) = (0usize, None::<u64>);
    // The controller: every 50 ms, set the wanted number of users; a user whose number is at
    // or past it stops after its current scan (k6's graceful ramp-down).
    while begun.elapsed() < options.length() {
        let now = options.target(begun.elapsed());
        wanted.store(now, Ordering::Relaxed);
        while spawned < now {
            let (target, samples, wanted) = (target.clone(), samples.clone(), wanted.clone());
            let user = spawned;
            let item = items[user % items.len()].clone();
            users.spawn(async move {
                while user < wanted.load(Ordering::Relaxed) {
                    let sample = scan(&target, &item).await;
                    samples.lock().unwrap().push(sample);
                }
            });
            spawned += 1;
        }
        if let Some(pid) = server_pid {
            let rss = rss_kib(pid);
            peak_rss = Some(peak_rss.map_or(rss, |p| p.max(rss)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wanted.store(0, Ordering::Relaxed);
    while users.join_next().await.is_some() {}
    let took = begun.elapsed();
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    Report {
        samples,
        took,
        peak_vus: spawned.min(options.vus),
        peak_rss_kib: peak_rss,
    }
}

impl Report {
    /// Print the figures; whether every threshold held.
    fn print(&self, options: &Options) -> bool {
        let n = self.samples.len().max(1) as f64;
        let ok = self.samples.iter().filter(|s| s.ok).count();
        let failure_rate = 1.0 - ok as f64 / n;
        let mut totals: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.total.as_secs_f64())
            .collect();
        let mut firsts: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| s.first_event.map(|d| d.as_secs_f64()))
            .collect();
        totals.sort_by(f64::total_cmp);
        firsts.sort_by(f64::total_cmp);
        let p = |sorted: &[f64], q: f64| {
            if sorted.is_empty() {
                f64::NAN
            } else {
                percentile(sorted, q)
            }
        };
        let mean = totals.iter().sum::<f64>() / totals.len().max(1) as f64;
        println!(
            "scans: {} ({} ok, {:.1} % success) in {:.1} s, {:.2} scans/s, peak {} users",
            self.samples.len(),
            ok,
            100.0 * (1.0 - failure_rate),
            self.took.as_secs_f64(),
            ok as f64 / self.took.as_secs_f64(),
            self.peak_vus
        );
        println!(
            "total duration: mean {:.2} s, p50 {:.2} s, p95 {:.2} s, p99 {:.2} s",
            mean,
            p(&totals, 0.5),
            p(&totals, 0.95),
            p(&totals, 0.99)
        );
        println!(
            "first event: p50 {:.3} s, p95 {:.3} s, p99 {:.3} s",
            p(&firsts, 0.5),
            p(&firsts, 0.95),
            p(&firsts, 0.99)
        );
        if let Some(rss) = self.peak_rss_kib {
            println!("server peak RSS: {:.0} MiB", rss as f64 / 1024.0);
        }
        let mut failures: Vec<&str> = self
            .samples
            .iter()
            .filter_map(|s| s.failure.as_deref())
            .collect();
        failures.sort_unstable();
        failures.dedup();
        for failure in failures.iter().take(5) {
            println!("failure seen: {failure}");
        }
        let checks = [
            (
                format!("failed < {:.0} %", options.max_failure_rate * 100.0),
                failure_rate < options.max_failure_rate,
            ),
            (
                format!("total p95 < {:.1} s", options.p95_total.as_secs_f64()),
                p(&totals, 0.95) < options.p95_total.as_secs_f64(),
            ),
            (
                format!(
                    "first event p95 < {:.2} s",
                    options.p95_first_event.as_secs_f64()
                ),
                p(&firsts, 0.95) < options.p95_first_event.as_secs_f64(),
            ),
        ];
        for (check, held) in &checks {
            println!("threshold {check}: {}", if *held { "ok" } else { "FAILED" });
        }
        checks.iter().all(|(_, held)| *held)
    }
}
