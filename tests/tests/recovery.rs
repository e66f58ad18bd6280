//! Nothing lost, nothing twice: the real server killed with `kill -9` at random moments of a
//! job (slow mock LLM, injected 500s), then restarted on the same store, and a graceful SIGTERM
//! in the middle of a job.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use stagehand_tests::{
    Frame, MockLlm, Server, client, eco_items, inspect, job_status, read_frames, serve_eco_scan,
    submit_job,
};

/// A small deterministic generator for the kill moments; its seed is printed so that a failing
/// run can be replayed with `STAGEHAND_TEST_SEED`.
struct Moments(u64);

impl Moments {
    fn new() -> Self {
        let seed = std::env::var("STAGEHAND_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("kill moments: STAGEHAND_TEST_SEED={seed}");
        Self(seed | 1)
    }

    /// A duration between `low` and `high` ms.
    fn next_ms(&mut self, low: u64, high: u64) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(low + self.0 % (high - low))
    }
}

/// Every result of `job`, page by page.
fn results(server: &Server, job: &str) -> Vec<Value> {
    let (mut after, mut all) = (None::<u64>, Vec::new());
    loop {
        let query = after.map(|a| format!("&after={a}")).unwrap_or_default();
        let page: Value = client()
            .get(server.url(&format!("/v1/jobs/{job}/results?limit=500{query}")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        all.extend(page["results"].as_array().unwrap().iter().cloned());
        match page["next_after"].as_u64() {
            Some(next) => after = Some(next),
            None => return all,
        }
    }
}

/// The whole log of `job` as frames, one per event (`max_items=1`), to its end.
fn whole_log(server: &Server, job: &str) -> Vec<Frame> {
    let response = client()
        .get(server.url(&format!("/v1/jobs/{job}/events?max_items=1")))
        .send()
        .unwrap();
    read_frames(response, |_| false)
}

/// Every item has exactly one result, every event number from 1 to the last is there once,
/// every item's `item.finished` is there once, one start, one end.
fn assert_nothing_lost_nothing_twice(server: &Server, job: &str, total: usize) {
    let results = results(server, job);
    let indices: Vec<u64> = results
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        indices,
        (0..total as u64).collect::<Vec<_>>(),
        "one result per item"
    );

    let frames = whole_log(server, job);
    let ids: Vec<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "event numbers without hole or repeat"
    );
    let mut finished: BTreeMap<u64, usize> = BTreeMap::new();
    for frame in frames.iter().filter(|f| f.event == "job.progress") {
        for item in frame.data["items"].as_array().unwrap() {
            *finished.entry(item["index"].as_u64().unwrap()).or_default() += 1;
        }
    }
    assert_eq!(finished.len(), total, "every item finished in the log");
    assert!(
        finished.values().all(|&n| n == 1),
        "no item finished twice in the log: {:?}",
        finished.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let count = |name: &str| frames.iter().filter(|f| f.event == name).count();
    assert_eq!((count("job.started"), count("job.completed")), (1, 1));
    let last = frames.last().unwrap();
    assert_eq!(last.event, "job.completed");
    assert_eq!(
        last.data["succeeded"].as_u64().unwrap() + last.data["failed"].as_u64().unwrap(),
        total as u64
    );
}

fn wait_until_done(server: &Server, job: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while job_status(server, job)["state"] == "running" {
        assert!(
            Instant::now() < deadline,
            "the job did not finish in {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Vision answers quickly and the answer slowly, so an item in flight is nearly always past
/// its vision stage, with the vision output checkpointed: after a kill, reuse asks vision again
/// only for the few items whose checkpoint was not yet flushed, recomputation for nearly all.
#[test]
fn kill_9_at_random_moments_loses_nothing_and_repeats_no_effect() {
    const ITEMS: usize = 1000;
    const CONCURRENCY: u64 = 32;
    let mock = MockLlm::start(&[
        "--vision-latency-ms",
        "5",
        "--latency-ms",
        "300",
        "--jitter-ms",
        "40",
        "--rate-500",
        "0.05",
    ]);
    let data = tempfile::tempdir().unwrap();
    // Quick retries, so that the injected 500s are retried within the test's time.
    let start = || serve_eco_scan(&mock, data.path(), &[]);
    let mut server = start();
    let job = submit_job(
        &server,
        eco_items(ITEMS),
        json!({ "concurrency": CONCURRENCY }),
    );
    let mut moments = Moments::new();
    let mut kills = 0;
    // Frames a client received before a kill: the log after the restarts must say the same.
    let mut seen_before_kills: Vec<Frame> = Vec::new();
    while kills < 3 {
        std::thread::sleep(moments.next_ms(700, 2500));
        let before = job_status(&server, &job);
        if before["state"] != "running" {
            break;
        }
        eprintln!(
            "kill -9 with {} of {ITEMS} items done",
            before["succeeded"].as_u64().unwrap() + before["failed"].as_u64().unwrap()
        );
        // Follow the stream to its live edge (frames logged a moment ago), then a few more,
        // and kill right after: the newest events are the ones a crash could lose.
        let response = client()
            .get(server.url(&format!("/v1/jobs/{job}/events?max_items=1")))
            .send()
            .unwrap();
        let mut live = 0;
        let frames = read_frames(response, |frame| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            if frame.data["at"]
                .as_u64()
                .is_some_and(|at| now.saturating_sub(at) < 50)
            {
                live += 1;
            }
            live == 5
        });
        seen_before_kills.extend(frames);
        server.child().kill().unwrap(); // SIGKILL
        server.child().wait().unwrap();
        kills += 1;
        server = start();
    }
    assert!(kills >= 1, "the job ended before the first kill");
    wait_until_done(&server, &job, Duration::from_secs(180));
    assert_nothing_lost_nothing_twice(&server, &job, ITEMS);
    let log = whole_log(&server, &job);
    for frame in &seen_before_kills {
        let id = frame.id.unwrap();
        let now = &log[id as usize - 1];
        assert_eq!(
            (&now.event, &now.data),
            (&frame.event, &frame.data),
            "event {id} means the same after the crashes"
        );
    }
    drop(server);

    // Checkpoints reused: vision answered each item once, plus a few whose checkpoint a kill
    // caught before its flush (recomputing checkpointed stages would add about CONCURRENCY per
    // kill). Answers the mock counts are successes: injected 500s are not among them.
    let vision = mock.stats()["vision"].as_u64().unwrap();
    let again = vision.saturating_sub(ITEMS as u64);
    eprintln!("{kills} kills: vision answered {vision} times for {ITEMS} items");
    assert!(
        again <= kills * CONCURRENCY / 4,
        "vision asked again {again} times over {kills} kills: checkpoints not reused"
    );

    // Each (handler, key) was claimed at most once, whatever was interrupted.
    let effects = inspect(data.path(), &["effects"]);
    assert!(!effects.is_empty());
    for effect in &effects {
        assert!(effect["runs"].as_u64().unwrap() <= 1, "{effect}");
        let state = effect["state"].as_str().unwrap();
        assert!(
            ["pending", "running", "done", "interrupted", "failed"].contains(&state),
            "{effect}"
        );
    }
}

/// The store's background flush is off and the mock holds every request (so no item writes
/// anything): only the flush of the submit path can make the job durable before the kill.
#[test]
fn a_job_answered_202_survives_a_kill_9_right_after_the_answer() {
    const ITEMS: usize = 50;
    let mock = MockLlm::start(&["--rate-hang", "1.0"]);
    let data = tempfile::tempdir().unwrap();
    let mut server = serve_eco_scan(&mock, data.path(), &["--explicit-flushes-only"]);
    let job = submit_job(&server, eco_items(ITEMS), json!({}));
    let scan = stagehand_tests::submit_scan(&server, eco_items(1).remove(0));
    server.child().kill().unwrap();
    server.child().wait().unwrap();

    let config = client()
        .post(format!("http://{}/admin/config", mock.address))
        .json(&json!({ "rate_hang": 0.0 }))
        .send()
        .unwrap();
    assert!(config.status().is_success());
    let server = serve_eco_scan(&mock, data.path(), &[]);
    let status = job_status(&server, &scan);
    assert_eq!(status["total"], 1, "the accepted scan is there: {status}");
    let (total, state) = {
        let status = job_status(&server, &job);
        (status["total"].as_u64(), status["state"].clone())
    };
    assert_eq!(total, Some(ITEMS as u64), "the accepted job is there");
    assert!(state == "running" || state == "completed", "{state}");
    wait_until_done(&server, &job, Duration::from_secs(60));
    assert_nothing_lost_nothing_twice(&server, &job, ITEMS);
}

#[test]
fn sigterm_mid_job_then_restart_loses_nothing() {
    const ITEMS: usize = 300;
    let mock = MockLlm::start(&["--latency-ms", "50"]);
    let data = tempfile::tempdir().unwrap();
    let mut server = serve_eco_scan(&mock, data.path(), &["--drain-secs", "0"]);
    let job = submit_job(&server, eco_items(ITEMS), json!({ "concurrency": 4 }));
    std::thread::sleep(Duration::from_millis(1500));
    let pid = server.child().id().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let exit = server.child().wait().unwrap();
    assert!(exit.success(), "{exit}");

    let server = serve_eco_scan(&mock, data.path(), &[]);
    let resumed = job_status(&server, &job);
    assert_eq!(resumed["state"], "running", "{resumed}");
    assert!(
        resumed["succeeded"].as_u64().unwrap() > 0,
        "work done before the shutdown is kept: {resumed}"
    );
    wait_until_done(&server, &job, Duration::from_secs(120));
    assert_nothing_lost_nothing_twice(&server, &job, ITEMS);
}

/// Checkpoints across a kill -9: vision's and rule's outputs are checkpointed while the mock
/// holds every answer request; after the kill and a restart, vision is not asked again (its
/// checkpoints are reused), and once the items finish their checkpoints are gone.
#[test]
fn checkpoints_are_reused_after_a_kill_9_and_removed_when_items_finish() {
    const ITEMS: usize = 4;
    let mock = MockLlm::start(&["--latency-ms", "600000", "--vision-latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let pipeline = stagehand_tests::eco_scan_pipeline(data.path(), |text| {
        text.replace("[run]\n", "[run]\ncheckpoint_after_ms = 0\n")
    });
    let store = data.path().join("data");
    let mut server = stagehand_tests::serve(&pipeline, &store, Some(&mock), &[]);
    let job = submit_job(&server, eco_items(ITEMS), json!({ "concurrency": ITEMS }));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = mock.stats();
        if stats["requests"] == 2 * ITEMS && stats["in_flight"] == ITEMS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the answers were never asked for"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Checkpoints are not flushed one by one (a quick stage just runs again after a crash);
    // sled's background flush (every 500 ms) makes these durable.
    std::thread::sleep(Duration::from_millis(1500));
    server.child().kill().unwrap();
    server.child().wait().unwrap();
    let saved = inspect(&store, &["checkpoints", &job]);
    for index in 0..ITEMS as u64 {
        assert!(
            saved
                .iter()
                .any(|c| c["index"] == index && c["stage"] == "vision"),
            "item {index}: {saved:?}"
        );
    }

    let config = client()
        .post(format!("http://{}/admin/config", mock.address))
        .json(&json!({ "latency_ms": 0 }))
        .send()
        .unwrap();
    assert!(config.status().is_success());
    let mut server = stagehand_tests::serve(&pipeline, &store, Some(&mock), &[]);
    wait_until_done(&server, &job, Duration::from_secs(60));
    assert_eq!(job_status(&server, &job)["succeeded"], ITEMS);
    assert_eq!(mock.stats()["vision"], ITEMS, "vision was not asked again");
    for result in stagehand_tests::job_results(&server, &job) {
        let vision = stagehand_tests::stage_run(&result, "vision");
        assert_eq!(vision["reused"], true, "{result}");
    }
    // Removing a checkpoint is not flushed by itself (one left by a crash goes with its job);
    // a graceful stop flushes.
    assert!(server.terminate().success());
    assert_eq!(
        inspect(&store, &["checkpoints", &job]),
        Vec::<Value>::new(),
        "finished items keep no checkpoints"
    );
}
