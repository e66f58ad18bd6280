//! Many jobs at once: stage runs past `[run] max_stage_calls` wait for a slot instead of
//! failing. (The load test found it: with one-item scans from 300 users, the items of all jobs
//! together outgrew the component-instance pool, sized from the per-job concurrency, and failed
//! with "maximum concurrent limit ... reached".) A stage waiting on the LLM holds no slot, so
//! the slots bound instances, not LLM requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use stagehand_tests::{
    MockLlm, Server, client, eco_items, eco_scan_pipeline, job_results, metric, serve, wait_for_job,
};

#[test]
fn jobs_beyond_the_instance_pool_wait_for_a_slot_and_all_succeed() {
    let mock = MockLlm::start(&["--latency-ms", "100", "--vision-latency-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    // A pool for 2 stage calls (2 x 2 + 8 effects + 16 spare = 28 instances); 40 jobs of one
    // item each would need 40 at once. (The per-job concurrency is 2 as well, so a pool sized
    // from it, as it was, is as small.)
    let pipeline = eco_scan_pipeline(dir.path(), |text| {
        text.replace("concurrency = 64 ", "concurrency = 2\nmax_stage_calls = 2 ")
    });
    assert!(
        std::fs::read_to_string(&pipeline)
            .unwrap()
            .contains("max_stage_calls = 2")
    );
    let server = serve(&pipeline, &dir.path().join("data"), Some(&mock), &[]);

    let jobs = scans_at_once(&server, 40);
    // Meanwhile, the instances alive, as /metrics shows them.
    let (most_instances, ()) = most_while(&server, "stagehand_stage_instances_running", || {
        wait_until_all_succeed(&server, &jobs)
    });
    assert!(most_instances <= 2.0, "{most_instances} instances at once");
    // Two slots, and more LLM requests than that at once: the waiting ones held no instance.
    let stats = mock.stats();
    assert!(stats["max_in_flight"].as_u64().unwrap() > 2, "{stats}");
    assert_eq!(stats["vision"], json!(40), "{stats}");
}

/// Items in flight are bounded by the node's memory budget, across jobs: with 1 MiB (sixteen
/// items at 64 KiB each), 48 one-item jobs keep at most sixteen LLM requests in flight, the
/// rest wait (and say so in /metrics), and every item succeeds.
#[test]
fn items_past_the_memory_budget_wait_for_room_across_jobs() {
    let mock = MockLlm::start(&["--latency-ms", "300", "--vision-latency-ms", "300"]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = eco_scan_pipeline(dir.path(), |text| {
        text.replace(
            "concurrency = 64 ",
            "concurrency = 64\nmemory_budget_mib = 1 ",
        )
    });
    assert!(
        std::fs::read_to_string(&pipeline)
            .unwrap()
            .contains("memory_budget_mib = 1")
    );
    let server = serve(&pipeline, &dir.path().join("data"), Some(&mock), &[]);
    assert_eq!(
        metric(&server, "stagehand_items_memory_budget_bytes"),
        Some(1024.0 * 1024.0)
    );

    let (most_waiting, ()) = most_while(&server, "stagehand_items_waiting_for_memory", || {
        let jobs = scans_at_once(&server, 48);
        wait_until_all_succeed(&server, &jobs);
    });
    let stats = mock.stats();
    assert_eq!(stats["vision"], json!(48), "{stats}");
    let most_in_flight = stats["max_in_flight"].as_u64().unwrap();
    assert!(
        (2..=16).contains(&most_in_flight),
        "{most_in_flight} LLM requests at once with room for 16 items: {stats}"
    );
    assert!(most_waiting >= 1.0, "no item was seen waiting for memory");
    assert_eq!(
        metric(&server, "stagehand_items_memory_charged_bytes"),
        Some(0.0),
        "every charge is given back"
    );
}

/// `n` one-item scans submitted at once, each from its own thread: their job ids.
fn scans_at_once(server: &Server, n: usize) -> Vec<String> {
    let http = client();
    std::thread::scope(|scope| {
        let submits: Vec<_> = eco_items(n)
            .into_iter()
            .map(|item| {
                let http = &http;
                scope.spawn(move || {
                    let answer: serde_json::Value = http
                        .post(server.url("/v1/scans"))
                        .json(&item)
                        .send()
                        .unwrap()
                        .json()
                        .unwrap();
                    answer["job_id"].as_str().unwrap().to_string()
                })
            })
            .collect();
        submits.into_iter().map(|s| s.join().unwrap()).collect()
    })
}

fn wait_until_all_succeed(server: &Server, jobs: &[String]) {
    for job in jobs {
        let status = wait_for_job(server, job);
        assert_eq!(status["state"], "completed", "{status}");
        let results = job_results(server, job);
        assert_eq!(results[0]["status"], "succeeded", "{}", results[0]);
    }
}

/// The highest value `/metrics` showed for `series` while `work` ran, and what `work` returned.
fn most_while<T>(server: &Server, series: &str, work: impl FnOnce() -> T) -> (f64, T) {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut most = 0.0f64;
            while !done.load(Ordering::Relaxed) {
                most = most.max(metric(server, series).unwrap_or(0.0));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        });
        let outcome = work();
        done.store(true, Ordering::Relaxed);
        (sampler.join().unwrap(), outcome)
    })
}
