//! How fast an operator's change reaches a cluster (issue 19; figures in docs/BENCHMARKS.md):
//! three `serve --redis` nodes; `--rounds N` times, a change is sent to one node in turn, and the
//! time from its `200` to the moment every node reports in `sh:changes:applied` that it serves
//! it is measured (polled every millisecond). `--change swap` (the default): a hot swap of
//! eco-scan's `answer`, a new component each round. `--change deploy`: a deploy of eco-scan
//! whose `answer` is a new component each round (a new revision: every node fetches its files,
//! compiles the new component and loads the pipeline). Run with
//! `cargo xtask bench propagation [--change swap|deploy] [--rounds 50]`.

use std::time::{Duration, Instant};

use stagehand_tests::bundles::{eco_bundle, tar};
use stagehand_tests::cluster::RedisServer;
use stagehand_tests::measure::arg;
use stagehand_tests::{
    MockLlm, client, eco_scan_pipeline, plugin_bytes, serve, with_custom_section,
};

const ADMIN: &str = "bench-admin";
const NODES: usize = 3;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let rounds: usize = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(50);
    let deploy = match arg("--change").as_deref() {
        None | Some("swap") => false,
        Some("deploy") => true,
        Some(other) => panic!("--change swap or deploy, not {other}"),
    };
    let redis = RedisServer::start().expect("redis-server starts");
    let mock = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = eco_scan_pipeline(dir.path(), |text| text);
    let url = redis.url();
    let flags = ["--redis", url.as_str(), "--admin-token", ADMIN];
    let nodes: Vec<_> = (0..NODES)
        .map(|n| {
            serve(
                &pipeline,
                &dir.path().join(format!("n{n}")),
                Some(&mock),
                &flags,
            )
        })
        .collect();
    let mut conn = redis.connection();
    let answer = plugin_bytes("answer");
    let mut acked_to_everywhere = Vec::with_capacity(rounds);
    let mut request_to_ack = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let wasm = with_custom_section(answer.clone(), &format!("bench-{round}"));
        let node = &nodes[round % NODES];
        let request = match deploy {
            false => client().put(node.url("/v1/stages/answer")).body(wasm),
            true => {
                let mut files = eco_bundle(|text| text);
                files.insert("c/answer.wasm".into(), wasm);
                client()
                    .put(node.url("/v1/pipelines/eco-scan"))
                    .header("content-type", "application/x-tar")
                    .body(tar(&files))
            }
        };
        let sent = Instant::now();
        let response = request.bearer_auth(ADMIN).send().unwrap();
        assert_eq!(response.status(), 200);
        let acked = Instant::now();
        request_to_ack.push((acked - sent).as_secs_f64() * 1e3);
        let last: u64 = redis::cmd("GET")
            .arg("sh:changes:n")
            .query(&mut conn)
            .unwrap();
        loop {
            let applied: Vec<u64> = redis::cmd("HVALS")
                .arg("sh:changes:applied")
                .query(&mut conn)
                .unwrap();
            if applied.len() == NODES && applied.iter().all(|n| *n >= last) {
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(30),
                "round {round} never arrived"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        acked_to_everywhere.push(acked.elapsed().as_secs_f64() * 1e3);
    }
    let change = if deploy { "deploy" } else { "hot swap" };
    println!("{change}s of a new `answer` component:");
    for (what, times) in [
        (
            "PUT to its 200 (check, compile, publish)",
            &mut request_to_ack,
        ),
        ("200 to every node serving it", &mut acked_to_everywhere),
    ] {
        times.sort_by(f64::total_cmp);
        println!(
            "{what}: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} rounds, {NODES} nodes)",
            percentile(times, 50.0),
            percentile(times, 90.0),
            percentile(times, 99.0),
            times[times.len() - 1],
            times.len(),
        );
    }
}
