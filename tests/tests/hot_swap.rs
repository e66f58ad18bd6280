//! Hot swap over real HTTP: the `answer` stage replaced in the middle of a running 1,000-item
//! job, refused uploads that leave the old version serving, rollback, and installed versions
//! kept across a restart; each on both backends (embedded and Redis).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use serde_json::{Value, json};
use stagehand_tests::backends::Backend;
use stagehand_tests::{
    MockLlm, Server, client, eco_items, get_json, job_results, job_status, on_both_backends,
    plugin_bytes as plugin, serve_eco_scan, stage_digests, stage_run, submit_job, wait_for_job,
    with_custom_section,
};

const TOKEN: &str = "s3cret-admin-token";

on_both_backends!(
    the_answer_stage_is_swapped_mid_job_without_failing_an_item_and_rolled_back,
    items_inside_a_stage_at_the_swap_finish_on_the_old_version_in_their_first_try,
    a_canary_serves_its_share_of_items_then_is_promoted_or_dropped,
);

fn put_stage(
    server: &Server,
    name: &str,
    token: Option<&str>,
    wasm: Vec<u8>,
) -> (StatusCode, Value) {
    let mut request = client()
        .put(server.url(&format!("/v1/stages/{name}")))
        .body(wasm);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().unwrap();
    let status = response.status();
    (status, response.json().unwrap_or(Value::Null))
}

fn stage_digest(result: &Value, stage: &str) -> String {
    result["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn the_answer_stage_is_swapped_mid_job_without_failing_an_item_and_rolled_back(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "20"]);
    let data = tempfile::tempdir().unwrap();
    let admin = ["--admin-token", TOKEN];
    let mut server = serve_eco_scan(&mock, data.path(), &backend.flags(&admin));
    let (old, previous) = stage_digests(&server, "answer");
    assert!(previous.is_empty());

    let job = submit_job(&server, eco_items(1000), json!({ "concurrency": 16 }));
    let deadline = Instant::now() + Duration::from_secs(60);
    while job_status(&server, &job)["succeeded"].as_u64().unwrap() < 200 {
        assert!(Instant::now() < deadline, "the job does not progress");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Refused uploads: no token, a wrong token, a component of the wrong world.
    let new_answer = with_custom_section(plugin("answer"), "v2");
    let (status, _) = put_stage(&server, "answer", None, new_answer.clone());
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = put_stage(&server, "answer", Some("nope"), new_answer.clone());
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = put_stage(&server, "answer", Some(TOKEN), plugin("save_ownership"));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing export `run`"),
        "{body}"
    );
    let (status, _) = put_stage(&server, "no-such-stage", Some(TOKEN), new_answer.clone());
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        stage_digests(&server, "answer").0,
        old,
        "the old version still serves"
    );

    // The swap, while items are in every stage.
    let swap_sent = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (status, body) = put_stage(&server, "answer", Some(TOKEN), new_answer);
    assert_eq!(status, StatusCode::OK, "{body}");
    let new = body["current"]["digest"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(body["replaced"], old);
    assert_eq!(
        stage_digests(&server, "answer"),
        (new.clone(), vec![old.clone()])
    );

    let ended = wait_for_job(&server, &job);
    assert_eq!(
        (ended["succeeded"].as_u64(), ended["failed"].as_u64()),
        (Some(1000), Some(0))
    );
    let results = job_results(&server, &job);
    assert_eq!(results.len(), 1000);
    let (mut on_old, mut on_new) = (0, 0);
    for result in &results {
        let digest = stage_digest(result, "answer");
        let finished = result["finished_at"].as_u64().unwrap();
        if digest == old {
            on_old += 1;
        } else {
            assert_eq!(digest, new, "{result}");
            // Only entries after the swap get the new version.
            assert!(finished >= swap_sent, "{result}");
            on_new += 1;
        }
    }
    assert!(on_old >= 200 && on_new > 0, "old {on_old}, new {on_new}");
    let vision: Vec<String> = results.iter().map(|r| stage_digest(r, "vision")).collect();
    assert!(
        vision.iter().all(|d| *d == vision[0]),
        "other stages keep their version"
    );

    // A restart serves the installed version, with the old one to roll back to.
    server.child().kill().unwrap();
    server.child().wait().unwrap();
    let server = serve_eco_scan(&mock, data.path(), &backend.flags(&admin));
    assert_eq!(
        stage_digests(&server, "answer"),
        (new.clone(), vec![old.clone()])
    );

    // Rollback: the old digest again, for new items too; nothing left to roll back to.
    let rollback = || {
        let response = client()
            .post(server.url("/v1/stages/answer/rollback"))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        let status = response.status();
        (status, response.json::<Value>().unwrap())
    };
    let (status, body) = rollback();
    assert_eq!(
        (status, body["current"]["digest"].as_str()),
        (StatusCode::OK, Some(old.as_str()))
    );
    assert_eq!(stage_digests(&server, "answer").0, old);
    let one = submit_job(&server, eco_items(1), json!({}));
    wait_for_job(&server, &one);
    assert_eq!(stage_digest(&job_results(&server, &one)[0], "answer"), old);
    let (status, _) = rollback();
    assert_eq!(status, StatusCode::CONFLICT);
}

/// Eight items are inside a slow `answer` try (their LLM requests held by the mock) when the
/// swap is acknowledged: all eight finish on the old version in their first try. Items that
/// enter after it run the new version.
fn items_inside_a_stage_at_the_swap_finish_on_the_old_version_in_their_first_try(backend: Backend) {
    let mock = MockLlm::start(&["--latency-ms", "1500", "--vision-latency-ms", "0"]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(
        &mock,
        data.path(),
        &backend.flags(&["--admin-token", TOKEN]),
    );
    let (old, _) = stage_digests(&server, "answer");
    let before = submit_job(
        &server,
        eco_items(8),
        json!({ "concurrency": 8, "detail": "stages" }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    // 16 requests arrived (each item's vision, then its answer) and 8 are held: the answers.
    loop {
        let stats = mock.stats();
        if stats["requests"] == 16 && stats["in_flight"] == 8 {
            break;
        }
        assert!(Instant::now() < deadline, "the answer tries did not start");
        std::thread::sleep(Duration::from_millis(10));
    }

    let (status, body) = put_stage(
        &server,
        "answer",
        Some(TOKEN),
        with_custom_section(plugin("answer"), "v2"),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let new = body["current"]["digest"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(
        mock.stats()["in_flight"],
        8,
        "the swap left the tries alone"
    );
    let after = submit_job(&server, eco_items(4), json!({ "detail": "stages" }));

    assert_eq!(wait_for_job(&server, &before)["succeeded"], 8);
    for result in job_results(&server, &before) {
        let answer = stage_run(&result, "answer");
        assert_eq!(answer["digest"], old.as_str(), "{result}");
        assert_eq!(answer["attempt"], 1, "{result}");
    }
    assert_eq!(wait_for_job(&server, &after)["succeeded"], 4);
    for result in job_results(&server, &after) {
        assert_eq!(
            stage_run(&result, "answer")["digest"],
            new.as_str(),
            "{result}"
        );
    }
    assert_eq!(mock.stats()["answer"], 12, "no answer was asked for twice");
}

fn admin_post(server: &Server, path: &str) -> (StatusCode, Value) {
    let response = client()
        .post(server.url(path))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    let status = response.status();
    (status, response.json().unwrap_or(Value::Null))
}

/// Whether an item is in a canary's share: the item id (a UUID) as a number, mod 100.
fn in_share(item_id: &str, percent: u128) -> bool {
    u128::from_str_radix(&item_id.replace('-', ""), 16).unwrap() % 100 < percent
}

fn a_canary_serves_its_share_of_items_then_is_promoted_or_dropped(backend: Backend) {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let admin = ["--admin-token", TOKEN];
    let mut server = serve_eco_scan(&mock, data.path(), &backend.flags(&admin));
    let (old, _) = stage_digests(&server, "answer");
    let trial = with_custom_section(plugin("answer"), "canary");

    for share in ["0", "100"] {
        let path = format!("answer?canary={share}");
        let (status, _) = put_stage(&server, &path, Some(TOKEN), trial.clone());
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "a share of {share} %"
        );
    }
    let (status, body) = put_stage(&server, "answer?canary=30", Some(TOKEN), trial.clone());
    assert_eq!(status, StatusCode::OK, "{body}");
    let new = body["canary"]["digest"].as_str().unwrap().to_string();
    assert_eq!(body["canary"]["percent"], 30);
    assert_eq!(body["current"]["digest"], old.as_str());

    // A restart keeps the trial going.
    server.child().kill().unwrap();
    server.child().wait().unwrap();
    let server = serve_eco_scan(&mock, data.path(), &backend.flags(&admin));
    let answer = get_json(&server, "/v1/stages")["stages"][2].clone();
    assert_eq!(answer["name"], "answer");
    assert_eq!(
        (
            answer["current"]["digest"].as_str(),
            answer["canary"]["digest"].as_str()
        ),
        (Some(old.as_str()), Some(new.as_str()))
    );
    assert_eq!(answer["canary"]["percent"], 30);

    // 30 % of the items, chosen by item id, ran the canary; the rest the current version.
    let job = submit_job(&server, eco_items(300), json!({}));
    wait_for_job(&server, &job);
    let results = job_results(&server, &job);
    assert!(results.iter().all(|r| r["status"] == "succeeded"));
    let mut on_canary = 0;
    for result in &results {
        let expected = if in_share(result["item_id"].as_str().unwrap(), 30) {
            on_canary += 1;
            &new
        } else {
            &old
        };
        assert_eq!(&stage_digest(result, "answer"), expected, "{result}");
    }
    assert!(
        (45..=135).contains(&on_canary),
        "{on_canary} of 300 on the canary"
    );

    // Promote: every item gets it, the old version is the one to roll back to.
    let (status, body) = admin_post(&server, "/v1/stages/answer/promote");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        stage_digests(&server, "answer"),
        (new.clone(), vec![old.clone()])
    );
    assert!(get_json(&server, "/v1/stages")["stages"][2]["canary"].is_null());
    let (status, _) = admin_post(&server, "/v1/stages/answer/promote");
    assert_eq!(status, StatusCode::CONFLICT, "nothing left to promote");

    // A canary that goes badly is dropped by a rollback; the current version stays.
    let (status, body) = put_stage(
        &server,
        "answer?canary=50",
        Some(TOKEN),
        with_custom_section(plugin("answer"), "canary-2"),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = admin_post(&server, "/v1/stages/answer/rollback");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["current"]["digest"], new.as_str());
    assert!(body["canary_dropped"]["digest"].is_string());
    assert_eq!(
        stage_digests(&server, "answer"),
        (new.clone(), vec![old.clone()])
    );
    let one = submit_job(&server, eco_items(20), json!({}));
    wait_for_job(&server, &one);
    assert!(
        job_results(&server, &one)
            .iter()
            .all(|r| stage_digest(r, "answer") == new)
    );
}

#[test]
fn admin_routes_are_off_without_a_token() {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(&mock, data.path(), &[]);
    let (status, body) = put_stage(&server, "answer", Some("anything"), plugin("answer"));
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

#[test]
fn with_watch_a_changed_component_file_becomes_the_new_version() {
    let root = stagehand_tests::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let answer = dir.path().join("answer.wasm");
    std::fs::write(&answer, plugin("answer")).unwrap();
    let text = std::fs::read_to_string(root.join("examples/eco-scan/pipeline.toml"))
        .unwrap()
        .replace(
            "\"../../target/wasm32-wasip2/release/answer.wasm\"",
            &format!("{:?}", answer.display().to_string()),
        )
        .replace("\"../../target/", &format!("\"{}/target/", root.display()))
        .replace(
            "file = \"",
            &format!("file = \"{}/examples/eco-scan/", root.display()),
        );
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(&pipeline, text).unwrap();
    let mock = MockLlm::start(&[]);
    let server = stagehand_tests::serve(&pipeline, dir.path(), Some(&mock), &["--watch"]);
    let (old, _) = stage_digests(&server, "answer");

    // A build writes the new file: the stage swaps to it.
    std::fs::write(&answer, with_custom_section(plugin("answer"), "rebuilt")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let new = loop {
        let (current, previous) = stage_digests(&server, "answer");
        if current != old {
            assert_eq!(previous, std::slice::from_ref(&old));
            break current;
        }
        assert!(
            Instant::now() < deadline,
            "the changed file was not swapped in"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // A broken file is refused and the running version stays.
    std::fs::write(&answer, b"\0asm but not really").unwrap();
    stagehand_tests::wait_for_metric(
        &server,
        "stagehand_watched_changes_refused_total{kind=\"stage\",name=\"answer\"}",
        1.0,
    );
    assert_eq!(stage_digests(&server, "answer").0, new);
    let job = submit_job(&server, eco_items(1), json!({}));
    wait_for_job(&server, &job);
    assert_eq!(stage_digest(&job_results(&server, &job)[0], "answer"), new);
}
