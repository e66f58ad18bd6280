//! A job's `concurrency` and `sequential` hold wherever its items run: in one embedded node,
//! and across two Redis-mode nodes that each have slots to spare. The mock LLM counts the most
//! requests it served at once; each eco-scan item asks it one thing at a time.

use serde_json::{Value, json};
use stagehand_tests::backends::Backend;
use stagehand_tests::{
    MockLlm, eco_items, job_results, on_both_backends, submit_job, wait_for_job,
};

on_both_backends!(a_jobs_concurrency_holds_across_every_node);

/// Run 12 items with `options`: the most LLM requests served at once, and the results.
fn run(backend: &Backend, options: Value) -> (u64, Vec<Value>) {
    let mock = MockLlm::start(&["--latency-ms", "60"]);
    let data = tempfile::tempdir().unwrap();
    let nodes = backend.eco_scan_nodes(&mock, data.path());
    let job = submit_job(&nodes[0], eco_items(12), options);
    let status = wait_for_job(nodes.last().unwrap(), &job);
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["succeeded"], 12, "{status}");
    let most = mock.stats()["max_in_flight"].as_u64().unwrap();
    (most, job_results(&nodes[0], &job))
}

fn a_jobs_concurrency_holds_across_every_node(backend: Backend) {
    let (most, _) = run(&backend, json!({ "concurrency": 2 }));
    assert_eq!(most, 2, "two items at once, never more");

    let (most, results) = run(&backend, json!({ "sequential": true }));
    assert_eq!(most, 1, "one item at a time");
    let finished: Vec<u64> = results
        .iter()
        .map(|r| r["finished_at"].as_u64().unwrap())
        .collect();
    assert!(
        finished.is_sorted(),
        "sequential items finish in index order: {finished:?}"
    );

    // Without a limit the same nodes run many at once: the checks above can fail.
    let (most, _) = run(&backend, json!({}));
    assert!(most > 2, "{most} at once without a limit");
}
