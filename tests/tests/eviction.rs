//! Waiting without an instance, over HTTP: a stage whose host call keeps it waiting gives up its
//! instance and resumes by replay (`[run] evict_after_ms`, docs/SANDBOX.md). Replays must not
//! change what a stage computes, ask the LLM twice, or lose anything to a cancel or a kill -9.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagehand_tests::{
    MockLlm, Server, client, eco_items, eco_scan_pipeline, hostile_pipeline, job_results,
    job_status, serve, submit_job, wait_for_job, wait_for_metric,
};

/// The eco-scan pipeline with `[run]` settings added.
fn eco_scan_with(dir: &Path, run: &str) -> std::path::PathBuf {
    eco_scan_pipeline(dir, |text| {
        text.replace("[run]\n", &format!("[run]\n{run}\n"))
    })
}

/// The value of `series` on the server's `/metrics`, 0 when it is not there.
fn metric(server: &Server, series: &str) -> f64 {
    stagehand_tests::metric(server, series).unwrap_or(0.0)
}

/// Every item's output (with the usage figures and ids that differ from job to job taken out),
/// after the job completed with every item succeeded.
fn outputs(server: &Server, job: &str, items: usize) -> Vec<Value> {
    let status = wait_for_job(server, job);
    assert_eq!(status["state"], "completed", "{status}");
    let results = job_results(server, job);
    assert_eq!(results.len(), items);
    results
        .into_iter()
        .map(|result| {
            assert_eq!(result["status"], "succeeded", "{result}");
            result["output"].clone()
        })
        .collect()
}

/// One server per eviction setting, the same job on each: every call evicts
/// (`evict_after_ms = 0`), or none does (a minute).
#[test]
fn replayed_stages_give_the_same_outputs_and_ask_the_llm_once_per_call() {
    let mut seen = Vec::new();
    for evict_after_ms in [0, 60_000] {
        let mock = MockLlm::start(&["--latency-ms", "30", "--vision-latency-ms", "30"]);
        let dir = tempfile::tempdir().unwrap();
        let run = format!("evict_after_ms = {evict_after_ms}");

        let (eco_dir, journal_dir) = (dir.path().join("eco"), dir.path().join("journal"));
        std::fs::create_dir_all(&eco_dir).unwrap();
        std::fs::create_dir_all(&journal_dir).unwrap();
        let eco = eco_scan_with(&eco_dir, &run);
        let server = serve(&eco, &eco_dir.join("data"), Some(&mock), &[]);
        let job = submit_job(&server, eco_items(24), json!({ "concurrency": 8 }));
        let eco_outputs = outputs(&server, &job, 24);
        let stats = mock.stats();
        assert_eq!(
            (stats["vision"].as_u64(), stats["answer"].as_u64()),
            (Some(24), Some(24)),
            "one vision and one answer request per item, replays included: {stats}"
        );
        let evictions = metric(
            &server,
            "stagehand_stage_evictions_total{pipeline=\"eco-scan\",stage=\"vision\"}",
        ) + metric(
            &server,
            "stagehand_stage_evictions_total{pipeline=\"eco-scan\",stage=\"answer\"}",
        );
        if evict_after_ms == 0 {
            assert!(evictions >= 48.0, "every LLM call evicts: {evictions}");
        } else {
            assert_eq!(evictions, 0.0);
        }
        drop(server);

        let pipeline = hostile_pipeline(&journal_dir, &run, "max_attempts = 1");
        let server = serve(&pipeline, &journal_dir.join("data"), Some(&mock), &[]);
        let before = mock.stats()["requests"].as_u64().unwrap();
        let items: Vec<Value> = (0..8)
            .map(|_| json!({ "do": "journal", "target": "character-match" }))
            .collect();
        let job = submit_job(&server, items, json!({ "concurrency": 8 }));
        let journal_outputs = outputs(&server, &job, 8);
        assert_eq!(
            mock.stats()["requests"].as_u64().unwrap() - before,
            24,
            "three LLM requests per item, replays included"
        );
        for output in &journal_outputs {
            let seen = &output["hostile"];
            // The first question carried the random number of the run that asked it; the
            // output, of the run that finished. One try, one seed: they are the same.
            let random = seen["random"].as_u64().expect("a number");
            assert!(
                seen["first"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("random {random}")),
                "{output}"
            );
            assert_eq!(seen["emitted"], "Ok(EmitOutcome::Accepted)", "{output}");
        }
        seen.push((eco_outputs, journal_outputs));
    }
    let (evicting, keeping) = (&seen[0], &seen[1]);
    assert_eq!(evicting.0, keeping.0, "eco-scan outputs differ");
    // The journal stage's random numbers differ from job to job (the seed has the job id);
    // everything else is the same.
    let without_random = |outputs: &[Value]| -> Vec<Value> {
        outputs
            .iter()
            .map(|o| {
                let mut o = o["hostile"].clone();
                let random = o["random"].to_string();
                for key in ["random", "random_after"] {
                    o.as_object_mut().unwrap().remove(key);
                }
                let text = o.to_string().replace(&random, "R");
                serde_json::from_str(&text).unwrap()
            })
            .collect()
    };
    assert_eq!(without_random(&evicting.1), without_random(&keeping.1));
}

/// More items wait on the LLM than the instance pool has room for (2 stage calls: 2 x 2 + 8
/// effects + 16 = 28 instances): they wait without instances, and a cancel drops their
/// requests.
#[test]
fn items_waiting_without_instances_are_cancelled_with_their_llm_requests() {
    let mock = MockLlm::start(&["--vision-latency-ms", "60000"]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = eco_scan_with(dir.path(), "max_stage_calls = 2");
    let server = serve(&pipeline, &dir.path().join("data"), Some(&mock), &[]);
    let job = submit_job(&server, eco_items(40), json!({ "concurrency": 40 }));
    wait_for_metric(&server, "stagehand_stage_calls_waiting", 40.0);
    assert_eq!(mock.stats()["in_flight"], 40, "40 requests out on 2 slots");
    assert_eq!(metric(&server, "stagehand_stage_instances_running"), 0.0);

    let response = client()
        .post(server.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let cancelled_at = Instant::now();
    while mock.stats()["in_flight"] != 0 {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(10),
            "requests still open after the cancel: {}",
            mock.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = wait_for_job(&server, &job);
    assert_eq!(status["state"], "cancelled", "{status}");
    assert_eq!(metric(&server, "stagehand_stage_calls_waiting"), 0.0);
}

/// A kill -9 while every item waits without an instance: after a restart on the same store
/// each item ends once, succeeded.
#[test]
fn a_kill_9_while_items_wait_without_instances_loses_nothing() {
    let mock = MockLlm::start(&["--vision-latency-ms", "3000", "--latency-ms", "5"]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = eco_scan_with(dir.path(), "max_stage_calls = 2");
    let data = dir.path().join("data");
    let mut server = serve(&pipeline, &data, Some(&mock), &[]);
    let job = submit_job(&server, eco_items(40), json!({ "concurrency": 40 }));
    wait_for_metric(&server, "stagehand_stage_calls_waiting", 40.0);
    server.child().kill().unwrap(); // SIGKILL
    server.child().wait().unwrap();

    let server = serve(&pipeline, &data, Some(&mock), &[]);
    let status = wait_for_job(&server, &job);
    assert_eq!(status["state"], "completed", "{status}");
    let results = job_results(&server, &job);
    let indices: Vec<u64> = results
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, (0..40).collect::<Vec<_>>());
    assert!(
        results.iter().all(|r| r["status"] == "succeeded"),
        "{results:?}"
    );
    assert_eq!(job_status(&server, &job)["succeeded"], 40);
}
