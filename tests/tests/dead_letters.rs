//! Dead letters and idempotent submission over real HTTP: items whose `answer` stage times out
//! on every try become dead letters; after the provider recovers, reprocessing resumes them at
//! `answer` with the stored `vision` and `rule` outputs. Each behaviour runs on both backends
//! (embedded and Redis), with the same assertions.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use stagehand_tests::backends::Backend;
use stagehand_tests::{
    MockLlm, Server, client, eco_items, eco_scan_pipeline, on_both_backends, read_frames,
};

/// The eco-scan pipeline with absolute paths and an `answer` stage that gives up after two
/// tries of 300 ms each.
fn pipeline(dir: &Path) -> String {
    eco_scan_pipeline(dir, |text| {
        text.replace(
            "name = \"answer\"\n",
            "name = \"answer\"\ntimeout_ms = 300\nmax_attempts = 2\nbackoff_ms = 50\n",
        )
    })
    .display()
    .to_string()
}

/// Discarding and reprocessing dead letters are admin routes.
const ADMIN: &str = "dead-letter-admin";

fn serve(backend: &Backend, mock: &MockLlm, data: &Path, extra: &[&str]) -> Server {
    let pipeline = pipeline(data);
    let mut flags = backend.flags(&["--admin-token", ADMIN]);
    flags.extend_from_slice(extra);
    stagehand_tests::serve(Path::new(&pipeline), data, Some(mock), &flags)
}

/// Make the mock answer at once, without faults.
fn recover(mock: &MockLlm) {
    let fast = json!({ "latency_ms": 0, "vision_latency_ms": 0, "jitter_ms": 0, "rate_429": 0.0,
        "retry_after_s": 1, "rate_500": 0.0, "rate_hang": 0.0, "seed": 42 });
    let response = client()
        .post(format!("http://{}/admin/config", mock.address))
        .json(&fast)
        .send()
        .unwrap();
    assert!(response.status().is_success());
}

fn get(server: &Server, path: &str) -> (StatusCode, Value) {
    let response = client().get(server.url(path)).send().unwrap();
    let status = response.status();
    (status, response.json().unwrap_or(Value::Null))
}

fn post(server: &Server, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut request = client().post(server.url(path)).bearer_auth(ADMIN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().unwrap();
    let status = response.status();
    (status, response.json().unwrap_or(Value::Null))
}

fn wait_until_ended(server: &Server, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = get(server, &format!("/v1/jobs/{job}"));
        if status["state"] != "running" {
            return status;
        }
        assert!(Instant::now() < deadline, "job {job} did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
}

on_both_backends!(
    dead_letters_are_listed_inspected_discarded_and_reprocessed_from_the_failed_stage,
    retryable_dead_letters_are_reprocessed_on_a_timer,
    automatic_reprocessing_gives_a_dead_letter_up_after_its_rounds,
    a_job_can_shorten_its_stage_and_item_time_limits,
);

fn dead_letters_are_listed_inspected_discarded_and_reprocessed_from_the_failed_stage(
    backend: Backend,
) {
    // Vision answers at once; text answers take a second, past the answer stage's 300 ms.
    let mock = MockLlm::start(&["--latency-ms", "1000", "--vision-latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&backend, &mock, data.path(), &[]);
    let items = eco_items(4);
    let body = json!({ "items": items, "options": { "concurrency": 4 } });

    // Idempotent submission: the same key and body is the same job; another body conflicts.
    let submit = |body: &Value| {
        let response = client()
            .post(server.url("/v1/jobs"))
            .header("Idempotency-Key", "batch-2026-11-22")
            .json(body)
            .send()
            .unwrap();
        let status = response.status();
        (status, response.json::<Value>().unwrap())
    };
    let (status, first) = submit(&body);
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let job = first["job_id"].as_str().unwrap().to_string();
    let (status, again) = submit(&body);
    assert_eq!(
        (status, again["job_id"].as_str()),
        (StatusCode::OK, Some(job.as_str()))
    );
    let (status, conflict) = submit(&json!({ "items": eco_items(2) }));
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    assert!(
        conflict["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&job)
    );

    let ended = wait_until_ended(&server, &job);
    assert_eq!(
        (ended["succeeded"].as_u64(), ended["failed"].as_u64()),
        (Some(0), Some(4))
    );

    // Listed, filtered by stage, paged.
    let (_, page) = get(&server, &format!("/v1/dead-letters?job={job}&limit=3"));
    let letters = page["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 3);
    for (i, letter) in letters.iter().enumerate() {
        assert_eq!(
            (
                letter["index"].as_u64(),
                letter["stage"].as_str(),
                letter["error"]["kind"].as_str()
            ),
            (Some(i as u64), Some("answer"), Some("timeout")),
            "{letter}"
        );
        assert_eq!(
            letter["error"]["attempts"].as_array().unwrap().len(),
            2,
            "{letter}"
        );
    }
    let after = page["next_after"].as_str().unwrap();
    let (_, rest) = get(
        &server,
        &format!("/v1/dead-letters?job={job}&after={after}"),
    );
    assert_eq!(rest["dead_letters"][0]["index"], 3);
    let (_, none) = get(&server, &format!("/v1/dead-letters?job={job}&stage=vision"));
    assert!(none["dead_letters"].as_array().unwrap().is_empty());

    // Inspected: the failed stage's input is the item and the outputs before it.
    let (status, letter) = get(&server, &format!("/v1/dead-letters/{job}/1"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(letter["input"]["item"], items[1]);
    let stages: Vec<&str> = letter["input"]["stages"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(stages, ["rule", "vision"]);

    // Discarded: gone, and a second discard is a 404; without the admin token, nothing happens.
    let discard = |token: &str| {
        client()
            .delete(server.url(&format!("/v1/dead-letters/{job}/3")))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(discard("not-the-token"), StatusCode::UNAUTHORIZED);
    assert_eq!(discard(ADMIN), StatusCode::NO_CONTENT);
    assert_eq!(discard(ADMIN), StatusCode::NOT_FOUND);

    // The provider recovers; all of the job's dead letters run again from `answer`.
    recover(&mock);
    let vision_before = mock.stats()["vision"].as_u64().unwrap();
    let (status, started) = post(&server, &format!("/v1/jobs/{job}/reprocess"), None);
    assert_eq!(
        (status, started["reprocessing"].as_u64()),
        (StatusCode::ACCEPTED, Some(3)),
        "{started}"
    );
    let ended = wait_until_ended(&server, &job);
    assert_eq!(
        (ended["succeeded"].as_u64(), ended["failed"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(
        mock.stats()["vision"].as_u64().unwrap(),
        vision_before,
        "no stage before the failed one ran again"
    );
    let (_, page) = get(&server, &format!("/v1/jobs/{job}/results?limit=10"));
    let results = page["results"].as_array().unwrap();
    for result in &results[..3] {
        assert_eq!(result["status"], "succeeded", "{result}");
        let reused: Vec<bool> = result["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["reused"].as_bool().unwrap_or(false))
            .collect();
        assert_eq!(reused, [true, true, false, false], "{result}");
    }
    assert_eq!(results[3]["status"], "failed");
    let (_, left) = get(&server, &format!("/v1/dead-letters?job={job}"));
    assert!(
        left["dead_letters"].as_array().unwrap().is_empty(),
        "{left}"
    );

    // The job's log goes on after its first end: the reprocessed items, then a new end.
    let response = client()
        .get(server.url(&format!("/v1/jobs/{job}/events?max_items=1")))
        .send()
        .unwrap();
    let frames = read_frames(response, |_| false);
    let ids: Vec<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    // Every failed try that was retried is in the log, whatever the job's detail level.
    let retries: Vec<(u64, u64)> = frames
        .iter()
        .filter(|f| f.event == "item.stage" && f.data["status"] == "retrying")
        .map(|f| {
            (
                f.data["index"].as_u64().unwrap(),
                f.data["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(retries.len(), 4, "{retries:?}");
    assert!(retries.iter().all(|&(_, attempt)| attempt == 1));
    let ends: Vec<&Value> = frames
        .iter()
        .filter(|f| f.event == "job.completed")
        .map(|f| &f.data)
        .collect();
    assert_eq!(ends.len(), 2);
    assert_eq!(
        (ends[1]["succeeded"].as_u64(), ends[1]["failed"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(frames.last().unwrap().event, "job.completed");

    // Nothing left to do, and unknown jobs.
    let (status, nothing) = post(
        &server,
        &format!("/v1/jobs/{job}/reprocess"),
        Some(json!({})),
    );
    assert_eq!(
        (status, nothing["reprocessing"].as_u64()),
        (StatusCode::ACCEPTED, Some(0))
    );
    let unknown = "0190f5d2-0000-7000-8000-000000000000";
    let (status, _) = post(&server, &format!("/v1/jobs/{unknown}/reprocess"), None);
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(
        &server,
        &format!("/v1/jobs/{job}/reprocess"),
        Some(json!({"all": 1})),
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

fn retryable_dead_letters_are_reprocessed_on_a_timer(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "1000", "--vision-latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(
        &backend,
        &mock,
        data.path(),
        &["--reprocess-every-secs", "1"],
    );
    let (status, body) = post(&server, "/v1/jobs", Some(json!({ "items": eco_items(2) })));
    assert_eq!(status, StatusCode::ACCEPTED);
    let job = body["job_id"].as_str().unwrap().to_string();
    let ended = wait_until_ended(&server, &job);
    assert_eq!(ended["failed"].as_u64(), Some(2), "{ended}");

    recover(&mock);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = get(&server, &format!("/v1/jobs/{job}"));
        if status["state"] == "completed" && status["succeeded"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "not reprocessed: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, left) = get(&server, &format!("/v1/dead-letters?job={job}"));
    assert!(
        left["dead_letters"].as_array().unwrap().is_empty(),
        "{left}"
    );
}

fn automatic_reprocessing_gives_a_dead_letter_up_after_its_rounds(backend: Backend) {
    // Answers never come in time: every round fails again, retryably.
    let mock = MockLlm::start(&["--latency-ms", "1000", "--vision-latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let flags = ["--reprocess-every-secs", "1", "--reprocess-max-rounds", "2"];
    let server = serve(&backend, &mock, data.path(), &flags);
    let (_, body) = post(&server, "/v1/jobs", Some(json!({ "items": eco_items(1) })));
    let job = body["job_id"].as_str().unwrap().to_string();
    wait_until_ended(&server, &job);
    let rounds = || {
        let (_, letters) = get(&server, &format!("/v1/dead-letters?job={job}"));
        letters["dead_letters"][0]["reprocessed"].as_u64().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while rounds() < 2 {
        assert!(Instant::now() < deadline, "not reprocessed twice");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Three more timer ticks: no third round, and the letter stays for a person.
    std::thread::sleep(Duration::from_secs(3));
    wait_until_ended(&server, &job);
    assert_eq!(rounds(), 2);
}

fn a_job_can_shorten_its_stage_and_item_time_limits(backend: Backend) {
    // Text answers take 1 s; the pipeline's stages would wait for them (vision answers at once).
    let mock = MockLlm::start(&["--latency-ms", "1000", "--vision-latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let server = stagehand_tests::serve_eco_scan(&mock, data.path(), &backend.flags(&[]));
    let run = |options: Value| {
        let (status, body) = post(
            &server,
            "/v1/jobs",
            Some(json!({ "items": eco_items(1), "options": options })),
        );
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let job = body["job_id"].as_str().unwrap().to_string();
        wait_until_ended(&server, &job);
        let (_, page) = get(&server, &format!("/v1/jobs/{job}/results"));
        page["results"][0]["error"].clone()
    };
    let error = run(json!({ "stage_timeout_ms": 200 }));
    assert_eq!(
        (error["stage"].as_str(), error["kind"].as_str()),
        (Some("answer"), Some("timeout")),
        "{error}"
    );
    assert!(
        error["message"].as_str().unwrap().contains("200ms"),
        "{error}"
    );
    let error = run(json!({ "item_timeout_ms": 300 }));
    assert_eq!(
        (error["stage"].as_str(), error["kind"].as_str()),
        (Some("answer"), Some("timeout")),
        "{error}"
    );
    assert!(
        error["message"].as_str().unwrap().contains("300ms"),
        "{error}"
    );
}
