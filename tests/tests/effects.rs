//! Effects run at most once per (handler, key), and handlers' records are kept: in one
//! embedded node, and across Redis-mode nodes that share one effect queue and one set of
//! records (a key claimed on one node is a duplicate on every other; an effect whose node died
//! while it ran is `interrupted`, never run again).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use stagehand_tests::backends::Backend;
use stagehand_tests::{
    MockLlm, Server, eco_items, job_results, metrics_text, on_both_backends, serve_logged,
    submit_job, wait_for_job, wait_until,
};

on_both_backends!(
    each_effect_runs_once_and_handlers_keep_their_records,
    an_effect_cut_by_a_kill_9_is_interrupted_and_never_run_again,
);

/// Effects that ended with `outcome`, counted by every node in `nodes`.
fn effects_ended(nodes: &[Server], outcome: &str) -> f64 {
    let label = format!("outcome=\"{outcome}\"");
    nodes
        .iter()
        .flat_map(|node| {
            metrics_text(node)
                .lines()
                .filter(|l| l.starts_with("stagehand_effects_total{") && l.contains(&label))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Two jobs of eco-scan scans whose users and characters repeat (the second job repeats the
/// first): each (handler, key) is accepted once over both, whichever node's item emitted it;
/// every accepted effect runs once and ends `done`; the handlers' records are there.
fn each_effect_runs_once_and_handlers_keep_their_records(backend: Backend) {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let mut nodes = backend.eco_scan_nodes(&mock, data.path());
    let items = eco_items(40);
    let mut accepted: BTreeMap<(String, String), usize> = BTreeMap::new();
    for round in 0..2 {
        let job = submit_job(&nodes[round % nodes.len()], items.clone(), json!({}));
        let status = wait_for_job(&nodes[0], &job);
        assert_eq!(status["succeeded"], 40, "{status}");
        for result in job_results(&nodes[0], &job) {
            for effect in result["output"]["reward"]["effects"].as_array().unwrap() {
                let slot = (
                    effect["handler"].as_str().unwrap().to_string(),
                    effect["key"].as_str().unwrap().to_string(),
                );
                let count = accepted.entry(slot).or_default();
                if effect["outcome"] == "accepted" {
                    *count += 1;
                } else {
                    assert_eq!(effect["outcome"], "duplicate", "{effect}");
                }
            }
        }
    }
    assert!(
        !accepted.is_empty(),
        "eco-scan's reward stage emits effects"
    );
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");

    let expected = accepted.len() as f64;
    wait_until("every accepted effect ran", || {
        effects_ended(&nodes, "done") >= expected
    });
    assert_eq!(effects_ended(&nodes, "done"), expected, "each ran once");
    assert_eq!(effects_ended(&nodes, "failed"), 0.0);
    if let Backend::Embedded = backend {
        nodes[0].terminate();
    }
    let effects = backend.inspect(&data.path().join("a"), &["effects"]);
    let recorded: BTreeSet<(String, String)> = effects
        .iter()
        .map(|e| {
            assert_eq!(e["state"], "done", "{e}");
            assert_eq!(e["runs"], 1, "{e}");
            (
                e["handler"].as_str().unwrap().to_string(),
                e["key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(recorded, accepted.keys().cloned().collect());
    if let Backend::Redis(..) = backend {
        let ran_on: BTreeSet<&str> = effects.iter().filter_map(|e| e["node"].as_str()).collect();
        assert!(
            !ran_on.is_empty(),
            "a shared effect names the node that ran it"
        );
    }

    // `save-ownership` kept one record per ownership key.
    let owned: BTreeSet<String> = accepted
        .keys()
        .filter(|(handler, _)| handler == "save-ownership")
        .map(|(_, key)| key.clone())
        .collect();
    let records = backend.inspect(&data.path().join("a"), &["records", "ownership"]);
    let kept: BTreeSet<String> = records
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, owned);
}

/// A kill -9 that lands while an effect's handler works (the handler logs that it started,
/// the test waits for that line): the effect is `running` while its node is dead; once a node
/// is back (the same node restarted; in Redis mode a new node of the cluster that reclaims
/// it) the effect is `interrupted`, it ran once and is not run again (at most once), and its
/// record exists at most once.
fn an_effect_cut_by_a_kill_9_is_interrupted_and_never_run_again(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let wasm = |name: &str| stagehand_tests::plugin_path(name).display().to_string();
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "name = \"effects\"\n[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n\
             [[stage]]\nname = \"hostile\"\ncomponent = \"{}\"\n\
             [handlers.slow]\ncomponent = \"{}\"\ncpu_ms = 600000\ntimeout_ms = 600000\n",
            wasm("hostile"),
            wasm("slow_effect")
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let log_path = dir.path().join("server.log");
    // Both runs log to one file: a second run of the effect would show there.
    let start = || {
        let flags = match backend {
            Backend::Embedded => Vec::new(),
            Backend::Redis(..) => backend.flags(&["--reclaim-idle-ms", "1000"]),
        };
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        serve_logged(&pipeline, &data, None, &flags, log.into())
    };
    let mut server = start();
    let item = json!({ "do": "emit-flood", "size": 1, "target": "slow" });
    let job = submit_job(&server, vec![item], json!({}));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("slow effect")
    {
        assert!(Instant::now() < deadline, "the effect never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.child().kill().unwrap();
    server.child().wait().unwrap();
    let running = backend.inspect(&data, &["effects"]);
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0]["state"], "running", "{running:?}");

    let server = start();
    let status = wait_for_job(&server, &job);
    assert_eq!(status["state"], "completed", "{status}");
    let interrupted = || {
        let effects = backend.inspect(&data, &["effects"]);
        effects.len() == 1 && effects[0]["state"] == "interrupted"
    };
    if let Backend::Redis(..) = backend {
        // Taken over once it has been idle for the reclaim time.
        wait_until("the effect is reclaimed as interrupted", interrupted);
    }
    drop(server);
    let effects = backend.inspect(&data, &["effects"]);
    assert_eq!(effects.len(), 1, "{effects:?}");
    assert_eq!(effects[0]["handler"], "slow");
    assert_eq!(effects[0]["state"], "interrupted", "{effects:?}");
    assert_eq!(effects[0]["runs"], 1, "{effects:?}");
    let records = backend.inspect(&data, &["records", "slow"]);
    assert!(records.len() <= 1, "{records:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log.matches("slow effect").count(), 1, "{log}");
}
