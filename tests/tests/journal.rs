//! Journaled answers kept in the store, over HTTP: a restart or a retry does not ask the LLM
//! again for what it answered (`capabilities/journal.rs`, docs/SANDBOX.md). Counted with the
//! mock's request counts.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagehand_tests::cluster::{RedisServer, Worker};
use stagehand_tests::{
    MockLlm, hostile_pipeline, inspect, job_results, serve, submit_job, wait_for_job,
};

/// Wait (at most 30 s) until the mock has seen `requests` requests.
fn wait_for_requests(mock: &MockLlm, requests: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mock.stats()["requests"].as_u64().unwrap() < requests {
        assert!(Instant::now() < deadline, "{}", mock.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `hostile` stage's record in a result.
fn stage_run(result: &Value) -> &Value {
    let run = &result["stages"][0];
    assert_eq!(run["stage"], "hostile", "{result}");
    run
}

/// Each `journal` item asks three questions in turn, with an emit and a handler call between
/// the second and the third. Killed while the third questions are out, the server restarts and
/// asks only those again: 4 requests per item, where 6 would be paid without the journal. Both
/// ways an answer is kept: after the run waited without its instance (`evict_after_ms` 10),
/// and while it kept it (a minute).
#[test]
fn a_kill_9_after_two_answers_asks_only_the_third_again() {
    const ITEMS: u64 = 6;
    for evict_after_ms in [10, 60_000] {
        let mock = MockLlm::start(&["--latency-ms", "3000"]);
        let dir = tempfile::tempdir().unwrap();
        let run = format!("evict_after_ms = {evict_after_ms}");
        let pipeline = hostile_pipeline(dir.path(), &run, "max_attempts = 1");
        let data = dir.path().join("data");
        let mut server = serve(&pipeline, &data, Some(&mock), &[]);
        let items: Vec<Value> = (0..ITEMS)
            .map(|_| json!({ "do": "journal", "target": "character-match" }))
            .collect();
        let job = submit_job(&server, items, json!({ "concurrency": ITEMS }));
        // The third questions go out once the first two are answered and journaled; the
        // store's background flush (every 500 ms) makes those durable well before the third
        // answers come.
        wait_for_requests(&mock, 3 * ITEMS);
        std::thread::sleep(Duration::from_millis(1200));
        let stats = mock.stats();
        assert_eq!(
            (stats["requests"].as_u64(), stats["in_flight"].as_u64()),
            (Some(3 * ITEMS), Some(ITEMS)),
            "killed while the third questions wait: {stats}"
        );
        server.child().kill().unwrap(); // SIGKILL
        server.child().wait().unwrap();

        let server = serve(&pipeline, &data, Some(&mock), &[]);
        let status = wait_for_job(&server, &job);
        assert_eq!(status["state"], "completed", "{status}");
        assert_eq!(
            mock.stats()["requests"].as_u64(),
            Some(4 * ITEMS),
            "evict_after_ms {evict_after_ms}: after the restart only the third questions: {}",
            mock.stats()
        );
        for result in job_results(&server, &job) {
            assert_eq!(result["status"], "succeeded", "{result}");
            // Two LLM answers, the emit and the handler's answer.
            assert_eq!(stage_run(&result)["answers_reused"], 4, "{result}");
            assert_eq!(
                result["output"]["hostile"]["called"]
                    .as_str()
                    .map(|c| c.starts_with("Ok(")),
                Some(true),
                "{result}"
            );
        }
        assert_eq!(
            stagehand_tests::metric(
                &server,
                "stagehand_journal_answers_reused_total{pipeline=\"eco-scan\",stage=\"hostile\"}"
            ),
            Some(4.0 * ITEMS as f64)
        );
        // Each item's journal went with its result.
        let mut server = server;
        server.terminate();
        let left = inspect(&data, &["journals", &job]);
        assert!(left.is_empty(), "journal entries left: {left:?}");
    }
}

/// A try that fails after its answers came: the next one reuses them, except the answer the
/// guest asked to be retried after (`questions` fails retryably on its first try: it did not
/// like the answers). A try cut by its timeout while it waits reuses every answer it had: without
/// that, its retry would ask the three questions again and time out again.
#[test]
fn a_retry_reuses_the_answers_that_did_not_make_its_try_fail() {
    const ITEMS: u64 = 4;
    let mock = MockLlm::start(&["--latency-ms", "2000"]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = hostile_pipeline(
        dir.path(),
        "",
        "max_attempts = 2\nbackoff_ms = 10\ntimeout_ms = 5000",
    );
    let data = dir.path().join("data");
    let mut server = serve(&pipeline, &data, Some(&mock), &[]);
    let mut jobs = Vec::new();
    let mut run = |item: Value| {
        let before = mock.stats()["requests"].as_u64().unwrap();
        let job = submit_job(
            &server,
            vec![item; ITEMS as usize],
            json!({ "concurrency": ITEMS }),
        );
        let status = wait_for_job(&server, &job);
        assert_eq!(status["state"], "completed", "{status}");
        let results = job_results(&server, &job);
        let asked = mock.stats()["requests"].as_u64().unwrap() - before;
        jobs.push(job);
        (results, asked)
    };

    // Two questions, a retryable failure: the retry asks the second again, not the first.
    let (results, asked) = run(json!({ "do": "questions", "size": 2, "until": 2 }));
    assert_eq!(asked, 3 * ITEMS, "2 + 1 questions per item");
    for result in &results {
        assert_eq!(result["status"], "succeeded", "{result}");
        let run = stage_run(result);
        assert_eq!(
            (&run["attempt"], &run["answers_reused"]),
            (&json!(2), &json!(1)),
            "{result}"
        );
    }

    // Three questions of 2 s each in a 5 s try: the first try times out on the third, the
    // second reuses two answers and asks the third.
    let (results, asked) = run(json!({ "do": "questions", "size": 3 }));
    assert_eq!(asked, 4 * ITEMS, "3 + 1 questions per item");
    for result in &results {
        assert_eq!(result["status"], "succeeded", "{result}");
        let run = stage_run(result);
        assert_eq!(
            (&run["attempt"], &run["answers_reused"]),
            (&json!(2), &json!(2)),
            "{result}"
        );
        let answers = &result["output"]["hostile"]["answers"];
        assert_eq!(answers.as_array().map(Vec::len), Some(3), "{result}");
    }
    // Tries rewrote their journals and results removed them: nothing is left behind.
    server.terminate();
    for job in &jobs {
        let left = inspect(&data, &["journals", job]);
        assert!(left.is_empty(), "journal entries left: {left:?}");
    }
}

/// Redis mode: the journal is in Redis, so the node that reclaims a killed worker's items
/// asks only the questions the dead node had not been answered.
#[test]
fn in_redis_mode_the_node_that_reclaims_items_reuses_their_answers() {
    const ITEMS: u64 = 4;
    let redis = RedisServer::start().expect("redis-server starts");
    let mock = MockLlm::start(&["--latency-ms", "2000"]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = hostile_pipeline(dir.path(), "", "max_attempts = 1");
    let url = redis.url();
    let reclaim = ["--reclaim-idle-ms", "300"];
    let api_flags = [
        "--redis",
        url.as_str(),
        "--slots",
        "0",
        reclaim[0],
        reclaim[1],
    ];
    let api = serve(&pipeline, &dir.path().join("api"), Some(&mock), &api_flags);
    let mut first = Worker::start(&pipeline, &dir.path().join("w1"), &mock, &redis, &reclaim)
        .expect("the worker starts");
    let items: Vec<Value> = (0..ITEMS)
        .map(|_| json!({ "do": "journal", "target": "character-match" }))
        .collect();
    let job = submit_job(&api, items, json!({ "concurrency": ITEMS }));
    // Answers are in Redis before the guest sees them, so before the third questions go out.
    wait_for_requests(&mock, 3 * ITEMS);
    first.child().kill().unwrap(); // SIGKILL
    first.child().wait().unwrap();

    let _second = Worker::start(&pipeline, &dir.path().join("w2"), &mock, &redis, &reclaim)
        .expect("the worker starts");
    let status = wait_for_job(&api, &job);
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["succeeded"], ITEMS, "{status}");
    assert_eq!(
        mock.stats()["requests"].as_u64(),
        Some(4 * ITEMS),
        "the second node asked only the third questions: {}",
        mock.stats()
    );
    for result in job_results(&api, &job) {
        assert_eq!(stage_run(&result)["answers_reused"], 4, "{result}");
    }
}
