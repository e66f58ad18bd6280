//! Small promises of the README, each held to a test: the command line's exit status on a bad
//! argument, 415 and 409 answers, the event stream's `retry:` and keep-alive comment, five
//! earlier stage versions kept for rollback, an idempotency key released by retention, and
//! progress frames paced by `?interval_ms=`; those of the server on both backends (embedded and
//! Redis).

use std::io::Read;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use stagehand_tests::backends::Backend;
use stagehand_tests::{
    MockLlm, binary, client, eco_items, on_both_backends, plugin_bytes, serve_eco_scan, submit_job,
    wait_for_job, with_custom_section,
};

on_both_backends!(
    a_body_that_is_not_json_is_a_415_and_reprocessing_a_running_job_a_409,
    an_event_stream_sets_retry_and_keeps_alive_when_idle,
    five_earlier_stage_versions_are_kept_for_rollback,
    retention_releases_a_jobs_idempotency_key,
    interval_ms_paces_progress_frames,
);

const TOKEN: &str = "promises-admin";

#[test]
fn a_bad_command_line_exits_2_with_a_message() {
    for args in [
        vec!["run"],
        vec![
            "run",
            "examples/eco-scan/pipeline.toml",
            "--concurrency",
            "many",
        ],
        vec!["serve", "p.toml", "--sse-keep-alive-secs", "0"],
        vec!["no-such-command"],
    ] {
        let out = std::process::Command::new(binary("stagehand"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
}

fn a_body_that_is_not_json_is_a_415_and_reprocessing_a_running_job_a_409(backend: Backend) {
    let mock = MockLlm::start(&["--rate-hang", "1.0"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(
        &mock,
        data.path(),
        &backend.flags(&["--admin-token", TOKEN]),
    );
    let response = client()
        .post(server.url("/v1/jobs"))
        .header("content-type", "text/plain")
        .body(json!({ "items": eco_items(1) }).to_string())
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let body: Value = response.json().unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");

    let job = submit_job(&server, eco_items(2), json!({}));
    let response = client()
        .post(server.url(&format!("/v1/jobs/{job}/reprocess")))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().unwrap();
    assert_eq!(body["error"]["code"], "conflict", "{body}");
}

/// The first message sets `retry:`; an idle stream gets a keep-alive comment every
/// `--sse-keep-alive-secs`.
fn an_event_stream_sets_retry_and_keeps_alive_when_idle(backend: Backend) {
    let mock = MockLlm::start(&["--rate-hang", "1.0"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(
        &mock,
        data.path(),
        &backend.flags(&["--sse-keep-alive-secs", "1"]),
    );
    let job = submit_job(&server, eco_items(1), json!({}));
    let mut stream = client()
        .get(server.url(&format!("/v1/jobs/{job}/events")))
        .send()
        .unwrap();
    // The job is stuck on its LLM call: after job.started, only keep-alives come.
    let mut text = String::new();
    let started = Instant::now();
    let mut buffer = [0u8; 256];
    while text.lines().filter(|l| l.starts_with(':')).count() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no keep-alive: {text:?}"
        );
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "the stream ended: {text:?}");
        text.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    assert!(text.starts_with("retry: 3000\n"), "{text:?}");
    assert!(text.contains("event: job.started"), "{text:?}");
    eprintln!(
        "two keep-alives within {:?} at one a second",
        started.elapsed()
    );
}

/// Seven installs: the five versions before the current one are kept, newest first, and
/// rollback walks back through exactly those five.
fn five_earlier_stage_versions_are_kept_for_rollback(backend: Backend) {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(
        &mock,
        data.path(),
        &backend.flags(&["--admin-token", TOKEN]),
    );
    let mut installed = vec![stagehand_tests::stage_digests(&server, "answer").0];
    for n in 1..=6 {
        let response = client()
            .put(server.url("/v1/stages/answer"))
            .bearer_auth(TOKEN)
            .body(with_custom_section(
                plugin_bytes("answer"),
                &format!("v{n}"),
            ))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        installed.push(stagehand_tests::stage_digests(&server, "answer").0);
    }
    let (current, previous) = stagehand_tests::stage_digests(&server, "answer");
    assert_eq!(current, installed[6]);
    let expected: Vec<String> = installed[1..6].iter().rev().cloned().collect();
    assert_eq!(
        previous, expected,
        "the five before the current, newest first"
    );
    for back in expected {
        let response = client()
            .post(server.url("/v1/stages/answer/rollback"))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(stagehand_tests::stage_digests(&server, "answer").0, back);
    }
    let response = client()
        .post(server.url("/v1/stages/answer/rollback"))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::CONFLICT,
        "nothing older is kept"
    );
}

/// Retention removes a finished job and releases its idempotency key: the same key then
/// starts a new job, even with another body.
fn retention_releases_a_jobs_idempotency_key(backend: Backend) {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(
        &mock,
        data.path(),
        &backend.flags(&["--retention-secs", "1", "--sweep-interval-secs", "1"]),
    );
    let submit = |items: usize| {
        client()
            .post(server.url("/v1/jobs"))
            .header("idempotency-key", "nightly-batch")
            .json(&json!({ "items": eco_items(items) }))
            .send()
            .unwrap()
    };
    let first = submit(1);
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let job = first.json::<Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for_job(&server, &job);
    assert_eq!(
        submit(2).status(),
        StatusCode::CONFLICT,
        "held while the job is kept"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while client()
        .get(server.url(&format!("/v1/jobs/{job}")))
        .send()
        .unwrap()
        .status()
        != StatusCode::NOT_FOUND
    {
        assert!(
            Instant::now() < deadline,
            "retention did not remove the job"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = submit(2);
    assert_eq!(again.status(), StatusCode::ACCEPTED, "the key was released");
    assert_ne!(again.json::<Value>().unwrap()["job_id"], job.as_str());
}

/// A follower that stops reading falls behind the tokens of a job's streamed answers: it is
/// told how many it missed (`tokens.dropped`) instead of holding the server's memory, and the
/// job does not wait for it.
#[test]
fn a_slow_follower_is_told_how_many_tokens_it_missed() {
    let mock_dir = tempfile::tempdir().unwrap();
    let answers = mock_dir.path().join("answers.json");
    std::fs::write(
        &answers,
        json!({ "long": "word ".repeat(12_000) }).to_string(),
    )
    .unwrap();
    let mock = MockLlm::start(&["--answers", &answers.display().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let root = stagehand_tests::repo_root().display().to_string();
    let text = std::fs::read_to_string(
        stagehand_tests::repo_root().join("examples/prompt-eval/pipeline.toml"),
    )
    .unwrap()
    .replace("\"../../target/", &format!("\"{root}/target/"));
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(&pipeline, text).unwrap();
    let server = stagehand_tests::serve(&pipeline, dir.path(), Some(&mock), &[]);

    let cases: Vec<Value> = (0..20)
        .map(|i| {
            json!({ "id": format!("c{i}"), "prompt": "long", "expected": "word",
                "match": "contains", "stream": true, "max_tokens": 20_000 })
        })
        .collect();
    let job = submit_job(&server, cases, json!({ "concurrency": 4 }));
    let mut stream = client()
        .get(server.url(&format!("/v1/jobs/{job}/events?tokens=true")))
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    assert!(stream.read(&mut first).unwrap() > 0);
    // Not reading: the job goes on without this follower.
    let status = wait_for_job(&server, &job);
    assert_eq!(status["succeeded"], 20, "{status}");

    let frames = stagehand_tests::read_frames(stream, |_| false);
    let dropped: u64 = frames
        .iter()
        .filter(|f| f.event == "tokens.dropped")
        .map(|f| f.data["missed"].as_u64().unwrap())
        .sum();
    let received = frames.iter().filter(|f| f.event == "item.token").count() as u64;
    eprintln!("the follower received {received} tokens and was told of {dropped} missed");
    assert!(
        dropped > 0,
        "no tokens.dropped among {} frames",
        frames.len()
    );
    assert_eq!(frames.last().unwrap().event, "job.completed");
}

/// A job that cannot go on after a restart (here: the server now serves another pipeline)
/// fails with its reason, and its event stream ends with `job.failed`.
#[test]
fn a_failed_job_ends_its_event_stream_with_job_failed() {
    let mock = MockLlm::start(&["--rate-hang", "1.0"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let eco = stagehand_tests::eco_scan_pipeline(dir.path(), |text| text);
    let mut server = stagehand_tests::serve(&eco, &data, Some(&mock), &[]);
    let job = submit_job(&server, eco_items(2), json!({}));
    server.child().kill().unwrap();
    server.child().wait().unwrap();

    let other_dir = tempfile::tempdir().unwrap();
    let other = stagehand_tests::eco_scan_pipeline(other_dir.path(), |text| {
        text.replace("name = \"eco-scan\"", "name = \"eco-scan-2\"")
    });
    let server = stagehand_tests::serve(&other, &data, Some(&mock), &[]);
    let stream = client()
        .get(server.url(&format!("/v1/jobs/{job}/events")))
        .send()
        .unwrap();
    let frames = stagehand_tests::read_frames(stream, |_| false);
    let end = frames.last().unwrap();
    assert_eq!(end.event, "job.failed", "{frames:?}");
    let status = stagehand_tests::job_status(&server, &job);
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("eco-scan"),
        "{status}"
    );
}

/// Two followers of one job whose items finish about a second apart: with `interval_ms=100`
/// every item gets a frame of its own as it finishes; with the largest interval all of them
/// wait for the one frame flushed before `job.completed`. The default (3 s) gives neither.
fn interval_ms_paces_progress_frames(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "500"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(&mock, data.path(), &backend.flags(&[]));
    const ITEMS: usize = 6;
    let job = submit_job(&server, eco_items(ITEMS), json!({ "concurrency": 1 }));
    let follow = |interval_ms: u64| {
        let stream = client()
            .get(server.url(&format!(
                "/v1/jobs/{job}/events?max_items=1000&interval_ms={interval_ms}"
            )))
            .send()
            .unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        stream
    };
    let (fast, slow) = (follow(100), follow(600_000));
    let progress_sizes = |stream| {
        let frames = stagehand_tests::read_frames(stream, |_| false);
        assert_eq!(frames.last().unwrap().event, "job.completed", "{frames:?}");
        frames
            .iter()
            .filter(|f| f.event == "job.progress")
            .map(|f| f.data["items"].as_array().unwrap().len())
            .collect::<Vec<_>>()
    };
    let (fast, slow) = std::thread::scope(|scope| {
        let fast = scope.spawn(|| progress_sizes(fast));
        let slow = scope.spawn(|| progress_sizes(slow));
        (fast.join().unwrap(), slow.join().unwrap())
    });
    assert_eq!(fast, vec![1; ITEMS], "interval_ms=100");
    assert_eq!(slow, vec![ITEMS], "interval_ms=600000");
}
