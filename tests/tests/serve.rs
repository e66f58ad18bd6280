//! `stagehand serve` over real HTTP: submit, follow over SSE, resume with Last-Event-ID, page
//! through results, cancel, and clear errors for bad input; the behaviours on both backends
//! (embedded and Redis), so the modes cannot drift.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};
use stagehand_tests::backends::Backend;
use stagehand_tests::{
    Frame, MockLlm, Server, client, eco_items, inspect, on_both_backends, read_frames,
    serve_eco_scan, submit_job,
};

on_both_backends!(
    a_job_is_followed_to_the_end_and_its_results_paged,
    reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing,
    cancel_stops_a_running_job_at_once,
    cancel_fails_the_items_in_flight_and_drops_their_llm_requests,
    bad_requests_get_a_clear_4xx,
    a_scan_streams_every_stage_of_its_item,
    a_streamed_answer_reaches_followers_token_by_token,
    jobs_are_listed_newest_first_with_a_state_filter,
);

fn serve(mock: &MockLlm, data: &std::path::Path, extra: &[&str]) -> Server {
    serve_eco_scan(mock, data, extra)
}

fn items(n: usize) -> Vec<Value> {
    eco_items(n)
}

fn submit(server: &Server, items: Vec<Value>, options: Value) -> String {
    submit_job(server, items, options)
}

fn events(server: &Server, job: &str, query: &str, last_event_id: Option<u64>) -> Response {
    let mut request = client().get(server.url(&format!("/v1/jobs/{job}/events{query}")));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.send().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    response
}

/// Item indices reported by progress frames.
fn indices(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f.event == "job.progress")
        .flat_map(|f| {
            f.data["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["index"].as_u64().unwrap())
        })
        .collect()
}

fn a_job_is_followed_to_the_end_and_its_results_paged(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "5"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &backend.flags(&[]));
    let job = submit(&server, items(30), json!({ "concurrency": 8 }));

    let mut frames = read_frames(events(&server, &job, "?max_items=10", None), |_| false);
    // Every frame says when its event was logged, in order.
    let times: Vec<u64> = frames
        .iter_mut()
        .map(|f| {
            f.data
                .as_object_mut()
                .unwrap()
                .remove("at")
                .unwrap()
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "times: {times:?}");
    assert_eq!(
        (frames[0].id, frames[0].event.as_str(), &frames[0].data),
        (Some(1), "job.started", &json!({ "total": 30 }))
    );
    let last = frames.last().unwrap();
    assert_eq!(
        (last.event.as_str(), &last.data),
        (
            "job.completed",
            &json!({ "succeeded": 30, "failed": 0, "total": 30 })
        )
    );
    let ids: Vec<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert_eq!(
        *ids.last().unwrap(),
        32,
        "1 start + 30 items + 1 end in the log"
    );
    let mut seen = indices(&frames);
    assert!(
        frames
            .iter()
            .filter(|f| f.event == "job.progress")
            .all(|f| f.data["items"].as_array().unwrap().len() <= 10)
    );
    seen.sort();
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
    let final_progress = frames.iter().rfind(|f| f.event == "job.progress").unwrap();
    assert_eq!(
        (
            final_progress.data["completed"].as_u64(),
            final_progress.data["percent"].as_f64()
        ),
        (Some(30), Some(100.0))
    );

    // Keyset pages: in order, no gap, no duplicate.
    let (mut after, mut all) = (None::<u64>, Vec::new());
    loop {
        let query = match after {
            Some(a) => format!("?limit=7&after={a}"),
            None => "?limit=7".to_string(),
        };
        let page: Value = client()
            .get(server.url(&format!("/v1/jobs/{job}/results{query}")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let results = page["results"].as_array().unwrap();
        all.extend(results.iter().map(|r| r["index"].as_u64().unwrap()));
        assert!(
            results
                .iter()
                .all(|r| r["status"] == "succeeded" && r["stages"].as_array().unwrap().len() == 4)
        );
        match page["next_after"].as_u64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(all, (0..30).collect::<Vec<_>>());
    // Seed 000's page/page_size.
    let page: Value = client()
        .get(server.url(&format!("/v1/jobs/{job}/results?page=5&page_size=7")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let indexes: Vec<u64> = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [28, 29]);

    let status: Value = client()
        .get(server.url(&format!("/v1/jobs/{job}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        (status["state"].as_str(), status["succeeded"].as_u64()),
        (Some("completed"), Some(30))
    );
    // Resuming after the last event ends the stream at once (instead of idling on keep-alives).
    let short = Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let tail = short
        .get(server.url(&format!("/v1/jobs/{job}/events")))
        .header("Last-Event-ID", "32")
        .send()
        .unwrap();
    let tail = tail.text().expect("the stream closes by itself");
    assert!(!tail.contains("id:"), "{tail}");
    // A stream opened after the end replays and closes.
    let replay = read_frames(events(&server, &job, "?max_items=10", None), |_| false);
    assert_eq!(
        replay.iter().map(|f| f.id).collect::<Vec<_>>(),
        frames.iter().map(|f| f.id).collect::<Vec<_>>()
    );
}

fn reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "20"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &backend.flags(&[]));
    let job = submit(&server, items(40), json!({ "concurrency": 2 }));

    // One frame per item, so every log number shows up as an id; drop the connection mid-job.
    let first = read_frames(events(&server, &job, "?max_items=1", None), |f| {
        f.id == Some(8)
    });
    let resume_from = first.last().unwrap().id.unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let second = read_frames(
        events(&server, &job, "?max_items=1", Some(resume_from)),
        |_| false,
    );
    // `?last_event_id=` works as well as the header.
    let third = read_frames(
        events(
            &server,
            &job,
            &format!("?max_items=1&last_event_id={resume_from}"),
            None,
        ),
        |_| false,
    );
    assert_eq!(
        second.iter().map(|f| f.id).collect::<Vec<_>>(),
        third.iter().map(|f| f.id).collect::<Vec<_>>()
    );

    let ids: Vec<u64> = first.iter().chain(&second).map(|f| f.id.unwrap()).collect();
    assert_eq!(
        ids,
        (1..=42).collect::<Vec<_>>(),
        "every log number exactly once across the two connections"
    );
    let mut seen = indices(&first);
    seen.extend(indices(&second));
    assert_eq!(seen.iter().copied().collect::<BTreeSet<_>>().len(), 40);
    assert_eq!(seen.len(), 40);
    assert_eq!(second.last().unwrap().event, "job.completed");
}

fn cancel_stops_a_running_job_at_once(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "400"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &backend.flags(&[]));
    let job = submit(&server, items(60), json!({ "concurrency": 4 }));
    let stream = events(&server, &job, "?max_items=1", None);
    let collector = std::thread::spawn(move || read_frames(stream, |_| false));
    std::thread::sleep(Duration::from_millis(1500));

    let cancelled_at = Instant::now();
    let response = client()
        .post(server.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let requests_at_cancel = mock.stats()["requests"].as_u64().unwrap();
    let frames = collector.join().unwrap();
    let end = frames.last().unwrap();
    assert_eq!(end.event, "job.cancelled", "{frames:?}");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(3),
        "the stream ended {:?} after the cancel",
        cancelled_at.elapsed()
    );
    let (succeeded, failed, not_run) = (
        end.data["succeeded"].as_u64().unwrap(),
        end.data["failed"].as_u64().unwrap(),
        end.data["not_run"].as_u64().unwrap(),
    );
    assert_eq!(succeeded + failed + not_run, 60, "{end:?}");
    assert!(not_run > 0 && succeeded < 60, "{end:?}");

    // Nothing new reached the LLM after the cancel; a second cancel is harmless.
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        mock.stats()["requests"].as_u64().unwrap() <= requests_at_cancel + 4,
        "at most the in-flight ones"
    );
    let again = client()
        .post(server.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().unwrap()["state"], "cancelled");
    let results: Value = client()
        .get(server.url(&format!("/v1/jobs/{job}/results?limit=1000")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let results = results["results"].as_array().unwrap();
    assert_eq!(results.len() as u64, succeeded + failed);
    assert!(
        results
            .iter()
            .filter(|r| r["status"] == "failed")
            .all(|r| r["error"]["kind"] == "cancelled")
    );
}

/// Cancel with exactly `concurrency` items in flight, each waiting on an LLM answer that never
/// comes: those items, and only those, fail `cancelled`; the host drops their requests (the
/// mock sees its in-flight count fall to 0) and sends none after the cancel is answered.
fn cancel_fails_the_items_in_flight_and_drops_their_llm_requests(backend: Backend) {
    let mock = MockLlm::start(&["--rate-hang", "1.0"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &backend.flags(&[]));
    let job = submit(&server, items(10), json!({ "concurrency": 4 }));
    let in_flight = || mock.stats()["in_flight"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight() < 4 {
        assert!(
            Instant::now() < deadline,
            "4 requests never reached the mock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let response = client()
        .post(server.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let requests_at_cancel = mock.stats()["requests"].as_u64().unwrap();
    assert_eq!(requests_at_cancel, 4, "only the 4 items in flight asked");
    let cancelled_at = Instant::now();
    while in_flight() > 0 {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(10),
            "the host kept {} requests open after the cancel",
            in_flight()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "cancel to the last LLM request dropped: {:?}",
        cancelled_at.elapsed()
    );
    let status = stagehand_tests::wait_for_job(&server, &job);
    assert_eq!(status["state"], "cancelled", "{status}");
    assert_eq!(
        (&status["succeeded"], &status["failed"], &status["total"]),
        (&json!(0), &json!(4), &json!(10)),
        "six items never started: {status}"
    );
    let results = stagehand_tests::job_results(&server, &job);
    assert_eq!(results.len(), 4);
    for result in &results {
        assert_eq!(result["error"]["kind"], "cancelled", "{result}");
        assert_eq!(result["error"]["stage"], "vision", "{result}");
    }
    // The job has ended (no worker is left to send anything): nothing was sent after the cancel.
    assert_eq!(mock.stats()["requests"], requests_at_cancel);
}

fn bad_requests_get_a_clear_4xx(backend: Backend) {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &backend.flags(&["--max-body-mib", "1"]));
    let post = |body: &str| {
        let response = client()
            .post(server.url("/v1/jobs"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().unwrap())
    };
    let (status, body) = post("{not json");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (status, body) = post(r#"{"items": []}"#);
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`items` is empty")
    );
    let (status, body) = post(r#"{"items": [1], "options": {"concurency": 2}}"#);
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `concurency`"),
        "{body}"
    );
    let (status, _) = post(&format!(r#"{{"items": ["{}"]}}"#, "x".repeat(2 << 20)));
    assert_eq!(status, 413);

    let get = |path: &str| {
        let response = client().get(server.url(path)).send().unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().unwrap(),
        )
    };
    let (status, body) = get("/v1/jobs/not-a-uuid");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = get(&format!("/v1/jobs/{}/events", uuid::Uuid::new_v4()));
    assert_eq!(status, 404);
    let job = submit(&server, items(1), json!({}));
    let (status, body) = get(&format!("/v1/jobs/{job}/results?limit=0"));
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`limit` is 0; it must be 1 to 1000"),
        "{body}"
    );
    let (status, _) = get(&format!("/v1/jobs/{job}/results?page=0"));
    assert_eq!(status, 422);
    let (status, _) = get(&format!("/v1/jobs/{job}/results?page=1&after=3"));
    assert_eq!(status, 400);
    let (status, _) = get("/v2/nothing");
    assert_eq!(status, 404);
}

fn a_scan_streams_every_stage_of_its_item(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "10"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &backend.flags(&[]));
    let scan = json!({ "user_id": "u1", "image_url": "https://images.example/pet_bottle_9.jpg" });
    let response = client()
        .post(server.url("/v1/scans"))
        .json(&scan)
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().unwrap();
    assert_eq!(body["status"], "processing");
    let task = body["task_id"].as_str().unwrap().to_string();

    let frames = read_frames(events(&server, &task, "", None), |_| false);
    let stages: Vec<(String, String)> = frames
        .iter()
        .filter(|f| f.event == "item.stage")
        .map(|f| {
            (
                f.data["stage"].as_str().unwrap().to_string(),
                f.data["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = ["vision", "rule", "answer", "reward"]
        .iter()
        .flat_map(|s| {
            [
                (s.to_string(), "running".to_string()),
                (s.to_string(), "succeeded".to_string()),
            ]
        })
        .collect();
    assert_eq!(stages, expected);
    assert!(
        frames
            .iter()
            .filter(|f| f.event == "item.stage" && f.data["status"] == "succeeded")
            .all(|f| f.data["duration_ms"].is_number())
    );
    assert_eq!(frames.last().unwrap().event, "job.completed");
    let progress = frames.iter().find(|f| f.event == "job.progress").unwrap();
    assert!(
        progress.data["items"][0]["preview"]
            .as_str()
            .unwrap()
            .contains("pet_bottle")
    );

    let results: Value = client()
        .get(server.url(&format!("/v1/jobs/{task}/results")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        results["results"][0]["output"]["vision"]["category"]["minor"],
        "pet_bottle"
    );
    let (status, _) = {
        let r = client()
            .post(server.url("/v1/scans"))
            .json(&json!([1, 2]))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    assert_eq!(status, 422, "a scan is one object");
}

fn a_streamed_answer_reaches_followers_token_by_token(backend: Backend) {
    // Vision takes long enough for both followers to be connected before `answer` streams.
    let mock = MockLlm::start(&["--vision-latency-ms", "500", "--token-delay-ms", "5"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &backend.flags(&[]));
    let task = stagehand_tests::submit_scan(
        &server,
        json!({ "user_id": "u1", "image_url": "https://images.example/battery_1.jpg" }),
    );

    let plain = {
        let stream = events(&server, &task, "", None);
        std::thread::spawn(move || read_frames(stream, |_| false))
    };
    let frames = read_frames(events(&server, &task, "?tokens=true", None), |_| false);
    let tokens: Vec<&Frame> = frames.iter().filter(|f| f.event == "item.token").collect();
    assert!(tokens.len() > 5, "{} tokens", tokens.len());
    assert!(
        tokens
            .iter()
            .all(|t| t.id.is_none() && t.data["stage"] == "answer" && t.data["index"] == 0),
        "tokens are unnumbered and say where they come from"
    );
    // They arrive while `answer` runs, before its end. (Not necessarily after its start: log
    // events go out once durable, a few ms late; tokens go out at once.)
    let position = |event: &str, status: &str| {
        frames
            .iter()
            .position(|f| {
                f.event == event && f.data["stage"] == "answer" && f.data["status"] == status
            })
            .unwrap()
    };
    let first_token = frames.iter().position(|f| f.event == "item.token").unwrap();
    assert!(first_token < position("item.stage", "succeeded"));
    assert_eq!(frames.last().unwrap().event, "job.completed");

    // Put together, they are the answer the stage received and returned.
    let text: String = tokens
        .iter()
        .map(|t| t.data["text"].as_str().unwrap())
        .collect();
    let streamed: Value = serde_json::from_str(&text).unwrap();
    let results = stagehand_tests::job_results(&server, &task);
    let answer = &results[0]["output"]["answer"];
    assert_eq!(streamed["answer"], answer["answer"]);
    assert_eq!(streamed["steps"], answer["steps"]);
    assert!(
        answer["tokens"].as_u64().unwrap() > 0,
        "usage came in the last chunk"
    );

    let plain = plain.join().unwrap();
    assert!(plain.iter().all(|f| f.event != "item.token"));
    assert_eq!(plain.last().unwrap().event, "job.completed");
    assert_eq!(mock.stats()["streamed"], 1);
}

#[test]
fn images_come_as_urls_base64_or_multipart_and_are_checked() {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &["--max-image-mib", "1"]);
    let minor = |job: &str| -> Vec<Value> {
        stagehand_tests::wait_for_job(&server, job);
        stagehand_tests::job_results(&server, job)
            .iter()
            .map(|r| r["output"]["vision"]["category"]["minor"].clone())
            .collect()
    };

    // Bytes in JSON, and a data URL; the mock "sees" the decoded bytes.
    let job = submit(
        &server,
        vec![
            json!({ "user_id": "u1", "image_base64": b64(b"a crushed can"), "image_mime": "image/png" }),
            json!({ "user_id": "u2", "image_url": format!("data:image/jpeg;base64,{}", b64(b"battery")) }),
        ],
        json!({}),
    );
    assert_eq!(minor(&job), [json!("can"), json!("battery")]);

    // A multipart scan: the file part `image` and text fields.
    let form = reqwest::blocking::multipart::Form::new()
        .text("user_id", "u3")
        .part(
            "image",
            reqwest::blocking::multipart::Part::bytes(b"my pet_bottle photo".to_vec())
                .file_name("photo.jpg")
                .mime_str("image/jpeg")
                .unwrap(),
        );
    let response = client()
        .post(server.url("/v1/scans"))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let task = response.json::<Value>().unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(minor(&task), [json!("pet_bottle")]);
    assert!(mock.stats()["vision"].as_u64().unwrap() >= 3);

    // Refused at the door, naming the item: too large, not base64, not an image, bad scheme.
    let refused = |response: reqwest::blocking::Response| {
        let status = response.status().as_u16();
        let body: Value = response.json().unwrap();
        (
            status,
            body["error"]["message"].as_str().unwrap().to_string(),
        )
    };
    let big = vec![7u8; (1 << 20) + 1];
    let (status, message) = refused(
        client()
            .post(server.url("/v1/scans"))
            .multipart(
                reqwest::blocking::multipart::Form::new().part(
                    "image",
                    reqwest::blocking::multipart::Part::bytes(big.clone())
                        .mime_str("image/jpeg")
                        .unwrap(),
                ),
            )
            .send()
            .unwrap(),
    );
    assert_eq!(status, 413, "{message}");
    assert!(message.contains("the limit is 1.0 MiB"), "{message}");
    for (item, code, expected) in [
        (
            json!({ "image_base64": b64(&big) }),
            413,
            "item 1: the image is 1.0 MiB",
        ),
        (
            json!({ "image_base64": "%%%" }),
            422,
            "item 1: `image_base64` is not valid base64",
        ),
        (
            json!({ "image_base64": b64(b"x"), "image_mime": "text/html" }),
            422,
            "must be image/",
        ),
        (
            json!({ "image_url": "file:///etc/passwd" }),
            422,
            "must be an http(s) or data: URL",
        ),
    ] {
        let (status, message) = refused(
            client()
                .post(server.url("/v1/jobs"))
                .json(&json!({ "items": [{ "image_url": "https://x/can.jpg" }, item] }))
                .send()
                .unwrap(),
        );
        assert_eq!(
            (status, message.contains(expected)),
            (code, true),
            "{message}"
        );
    }
    let (status, message) = refused(
        client()
            .post(server.url("/v1/scans"))
            .multipart(reqwest::blocking::multipart::Form::new().text("user_id", "u4"))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("needs a file part named `image`"),
        "{message}"
    );
}

/// The value of one series in a Prometheus text exposition.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_stages_items_llm_calls_and_subscribers() {
    let mock = MockLlm::start(&["--latency-ms", "50"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &[]);
    let metrics = || {
        client()
            .get(server.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    };

    let job = submit(&server, items(6), json!({ "concurrency": 1 }));
    // A subscriber is counted while its stream is open.
    let mut stream = events(&server, &job, "", None);
    let mut first = [0u8; 64];
    std::io::Read::read(&mut stream, &mut first).unwrap();
    let during = metrics();
    assert_eq!(series(&during, "stagehand_sse_subscribers"), Some(1.0));
    let unfinished = series(&during, "stagehand_items_unfinished").unwrap();
    assert!((1.0..=6.0).contains(&unfinished), "{unfinished} unfinished");
    let frames = read_frames(stream, |_| false);
    assert_eq!(frames.last().unwrap().event, "job.completed");

    let text = metrics();
    let value = |name: &str| series(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    for stage in ["vision", "rule", "answer", "reward"] {
        let tries = format!(
            "stagehand_stage_tries_total{{pipeline=\"eco-scan\",stage=\"{stage}\",outcome=\"succeeded\"}}"
        );
        assert_eq!(value(&tries), 6.0);
        assert_eq!(
            value(&format!(
                "stagehand_stage_cpu_seconds_count{{pipeline=\"eco-scan\",stage=\"{stage}\"}}"
            )),
            6.0
        );
    }
    assert!(
        value("stagehand_stage_duration_seconds_sum{pipeline=\"eco-scan\",stage=\"vision\"}")
            >= 6.0 * 0.05
    );
    assert_eq!(
        value("stagehand_items_total{pipeline=\"eco-scan\",status=\"succeeded\"}"),
        6.0
    );
    assert_eq!(value("stagehand_items_in_flight"), 0.0);
    assert_eq!(
        value("stagehand_jobs_total{pipeline=\"eco-scan\",event=\"submitted\"}"),
        1.0
    );
    assert_eq!(
        value("stagehand_jobs_total{pipeline=\"eco-scan\",event=\"completed\"}"),
        1.0
    );
    assert_eq!(
        value(
            "stagehand_llm_requests_total{provider=\"default\",model=\"gpt-4o-mini\",outcome=\"ok\"}"
        ),
        12.0
    );
    assert!(
        value(
            "stagehand_llm_tokens_total{provider=\"default\",model=\"gpt-4o-mini\",kind=\"prompt\",estimated=\"false\"}"
        ) > 0.0
    );
    assert_eq!(
        value(
            "stagehand_llm_request_duration_seconds_count{provider=\"default\",model=\"gpt-4o-mini\"}"
        ),
        12.0
    );
    assert_eq!(value("stagehand_llm_waiting_requests"), 0.0);
    assert_eq!(value("stagehand_sse_subscribers"), 0.0);
    assert_eq!(value("stagehand_items_unfinished"), 0.0);
}

fn jobs_are_listed_newest_first_with_a_state_filter(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "300"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(&mock, data.path(), &backend.flags(&[]));
    let mut finished = Vec::new();
    for _ in 0..3 {
        let job = submit(&server, items(1), json!({ "labels": { "batch": "small" } }));
        read_frames(events(&server, &job, "", None), |_| false);
        finished.push(job);
    }
    let long = submit(&server, items(20), json!({ "sequential": true }));

    let list = |query: &str| -> Value {
        client()
            .get(server.url(&format!("/v1/jobs{query}")))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let ids = |page: &Value| -> Vec<String> {
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    let first = list("?limit=2");
    assert_eq!(ids(&first), [long.clone(), finished[2].clone()]);
    let rest = list(&format!(
        "?limit=2&before={}",
        first["next_before"].as_str().unwrap()
    ));
    assert_eq!(ids(&rest), [finished[1].clone(), finished[0].clone()]);
    assert_eq!(rest["jobs"][0]["labels"]["batch"], "small");
    assert_eq!(ids(&list("?state=running")), std::slice::from_ref(&long));
    assert_eq!(ids(&list("?state=completed")).len(), 3);
    let bad = client()
        .get(server.url("/v1/jobs?state=sleeping"))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        client()
            .post(server.url(&format!("/v1/jobs/{long}/cancel")))
            .send()
            .unwrap()
            .status(),
        202
    );
}

#[test]
fn finished_jobs_are_removed_after_the_retention_time() {
    let mock = MockLlm::start(&["--latency-ms", "200"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve(
        &mock,
        data.path(),
        &["--retention-secs", "1", "--sweep-interval-secs", "1"],
    );
    let done = submit(&server, items(2), json!({}));
    read_frames(events(&server, &done, "", None), |_| false);
    let running = submit(&server, items(30), json!({ "sequential": true }));
    let status = |job: &str, path: &str| {
        client()
            .get(server.url(&format!("/v1/jobs/{job}{path}")))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status(&done, ""), 200);

    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&done, "") != 404 {
        assert!(
            Instant::now() < deadline,
            "the finished job was never removed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&done, "/results"), 404);
    assert_eq!(status(&done, "/events"), 404);
    // A running job is never removed, however old.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(status(&running, ""), 200);
    assert_eq!(
        client()
            .post(server.url(&format!("/v1/jobs/{running}/cancel")))
            .send()
            .unwrap()
            .status(),
        202
    );
}

#[test]
fn sigterm_drains_running_jobs_and_releases_the_store() {
    let mock = MockLlm::start(&["--latency-ms", "100"]);
    let data = tempfile::tempdir().unwrap();
    let mut server = serve(&mock, data.path(), &[]);
    let job = submit(&server, items(6), json!({ "concurrency": 2 }));
    std::thread::sleep(Duration::from_millis(300));

    let pid = server.child().id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // The job ran to its end during the drain, and the store is flushed and free to open.
    let jobs = inspect(data.path(), &["jobs"]);
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (
            jobs[0]["id"].as_str(),
            jobs[0]["state"].as_str(),
            jobs[0]["succeeded"].as_u64()
        ),
        (Some(job.as_str()), Some("completed"), Some(6))
    );
}
