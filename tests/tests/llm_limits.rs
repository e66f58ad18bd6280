//! The provider's limits are shared fairly across jobs: with two requests in flight at most, a
//! one-item scan submitted behind a large running job is served within a few of that job's
//! requests, not after the dozens it keeps queued.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use stagehand_tests::{MockLlm, eco_items, eco_scan_pipeline, job_status, submit_job, submit_scan};

/// The eco-scan pipeline with at most two LLM requests in flight.
fn pipeline(dir: &Path) -> std::path::PathBuf {
    eco_scan_pipeline(dir, |text| {
        text.replace(
            "max_concurrent_requests = 64",
            "max_concurrent_requests = 2\nrequests_per_minute = 100000",
        )
    })
}

fn succeeded(server: &stagehand_tests::Server, job: &str) -> u64 {
    job_status(server, job)["succeeded"].as_u64().unwrap()
}

#[test]
fn a_scan_is_not_starved_by_a_large_job() {
    let mock = MockLlm::start(&["--latency-ms", "15"]);
    let data = tempfile::tempdir().unwrap();
    let server = stagehand_tests::serve(&pipeline(data.path()), data.path(), Some(&mock), &[]);

    // 64 items in flight keep up to 64 requests waiting for the provider's 2 slots.
    let big = submit_job(&server, eco_items(400), json!({ "concurrency": 64 }));
    let deadline = Instant::now() + Duration::from_secs(60);
    while succeeded(&server, &big) < 10 {
        assert!(Instant::now() < deadline, "the large job does not progress");
        std::thread::sleep(Duration::from_millis(20));
    }

    let before = succeeded(&server, &big);
    let scan = submit_scan(
        &server,
        json!({ "user_id": "u-late", "image_url": "https://img.example/pet_bottle.jpg" }),
    );
    let scan_state = loop {
        let status = job_status(&server, &scan);
        if status["state"] != "running" {
            break status["state"].clone();
        }
        assert!(Instant::now() < deadline, "the scan never finished");
        std::thread::sleep(Duration::from_millis(5));
    };
    let during = succeeded(&server, &big) - before;
    eprintln!("{during} items of the large job finished while the scan ran");
    assert_eq!(scan_state, "completed");
    // The scan makes two LLM calls; each waits for about one of the large job's requests (two
    // LLM calls per item). First come, first served, it would wait for ~64 requests per call.
    assert!(
        during <= 24,
        "{during} items of the large job finished while the scan waited"
    );
    assert_ne!(job_status(&server, &big)["state"], "completed");
}
