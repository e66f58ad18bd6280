//! Redis mode against embedded mode (issue 7; figures in docs/BENCHMARKS.md): one job of
//! `--items N` eco-scan items through the real binaries, the mock LLM answering after
//! `--latency-ms L`, each node running `--slots S` items at once. Run with
//! `cargo xtask bench cluster [--items 2000] [--latency-ms 50] [--slots 32]`.
//!
//! Setups: embedded (one `serve`), then Redis with one node (`serve --redis`), two and three
//! (plus `worker --redis` nodes), Redis writing its append-only file with `appendfsync
//! everysec`; and one node with `appendfsync always` (every write fsync'ed, as embedded mode
//! does before it answers) and with no persistence. Measured: items/s from the `POST` to the
//! job's end (polled every 10 ms), and CPU ms per item of every Stagehand process plus
//! redis-server.

use std::time::{Duration, Instant};

use serde_json::json;
use stagehand_tests::cluster::{RedisServer, Worker};
use stagehand_tests::measure::{arg, cpu_secs};
use stagehand_tests::{
    MockLlm, Server, eco_items, eco_scan_pipeline, job_status, serve, submit_job,
};

fn number(name: &str, default: u64) -> u64 {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Figures {
    setup: String,
    seconds: f64,
    items: u64,
    cpu_secs: f64,
}

/// Submit one job to `entry`, wait for its end; CPU of `pids` over the run.
fn run_job(entry: &Server, items: u64, pids: &[u32]) -> (f64, f64) {
    let cpu = |pids: &[u32]| pids.iter().map(|&pid| cpu_secs(pid)).sum::<f64>();
    let cpu_before = cpu(pids);
    let start = Instant::now();
    let job = submit_job(entry, eco_items(items as usize), json!({}));
    loop {
        let status = job_status(entry, &job);
        if status["state"] != "running" {
            assert_eq!(status["succeeded"], items, "{status}");
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (start.elapsed().as_secs_f64(), cpu(pids) - cpu_before)
}

fn main() {
    let items = number("--items", 2000);
    let latency = number("--latency-ms", 50).to_string();
    let slots = number("--slots", 32).to_string();
    let mock = MockLlm::start(&["--latency-ms", &latency]);
    let dir = tempfile::tempdir().unwrap();
    // Every node runs `slots` items at once, embedded mode included.
    let pipeline = eco_scan_pipeline(dir.path(), |text| {
        text.replace("concurrency = 64 ", &format!("concurrency = {slots} "))
    });
    let mut figures = Vec::new();

    {
        let mut node = serve(&pipeline, &dir.path().join("embedded"), Some(&mock), &[]);
        let pids = [node.child().id()];
        // A warm-up job: components compiled, connections open.
        run_job(&node, 100, &pids);
        let (seconds, cpu) = run_job(&node, items, &pids);
        figures.push(Figures {
            setup: "embedded, 1 node".into(),
            seconds,
            items,
            cpu_secs: cpu,
        });
    }

    let setups: [(usize, &str); 5] = [
        (1, "everysec"),
        (2, "everysec"),
        (3, "everysec"),
        (1, "always"),
        (1, "no persistence"),
    ];
    for (nodes, fsync) in setups {
        let redis = match fsync {
            "no persistence" => RedisServer::start(),
            fsync => RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", fsync]),
        }
        .expect("redis-server starts");
        let url = redis.url();
        let flags = ["--redis", url.as_str(), "--slots", slots.as_str()];
        let data = |n: usize| dir.path().join(format!("r{nodes}-{fsync}-{n}"));
        let mut entry = serve(&pipeline, &data(0), Some(&mock), &flags);
        let mut workers: Vec<Worker> = (1..nodes)
            .map(|n| {
                Worker::start(&pipeline, &data(n), &mock, &redis, &["--slots", &slots])
                    .expect("a worker starts")
            })
            .collect();
        let mut pids = vec![entry.child().id(), redis.pid()];
        pids.extend(workers.iter_mut().map(|w| w.child().id()));
        run_job(&entry, 100, &pids);
        let (seconds, cpu) = run_job(&entry, items, &pids);
        let plural = if nodes > 1 { "s" } else { "" };
        let fsync = match fsync {
            "no persistence" => fsync.to_string(),
            fsync => format!("appendfsync {fsync}"),
        };
        figures.push(Figures {
            setup: format!("Redis ({fsync}), {nodes} node{plural}"),
            seconds,
            items,
            cpu_secs: cpu,
        });
    }

    println!(
        "{items} eco-scan items, mock LLM latency {latency} ms, {slots} items at once per node\n"
    );
    println!("| setup | items/s | job time (s) | CPU ms per item (all processes) |");
    println!("|---|---:|---:|---:|");
    for f in &figures {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} |",
            f.setup,
            f.items as f64 / f.seconds,
            f.seconds,
            f.cpu_secs * 1e3 / f.items as f64
        );
    }
}
