//! One server, several pipelines: each known by its name, with its own jobs, stage versions,
//! kv namespaces, dead letters and metrics; a request about one pipeline names it unless the
//! server serves only one.

use serde_json::{Value, json};
use stagehand_tests::{
    MockLlm, Server, binary, client, eco_items, eco_scan_pipeline, get_json, job_results, metric,
    plugin_bytes, prompt_eval_pipeline, repo_root, serve, wait_for_job,
};

/// The mock answers prompt-eval's cases from the example's answers file, eco-scan's as usual.
fn mock() -> MockLlm {
    let answers = repo_root().join("examples/prompt-eval/answers.json");
    MockLlm::start(&["--answers", &answers.display().to_string()])
}

/// The first `n` prompt-eval cases.
fn cases(n: usize) -> Vec<Value> {
    std::fs::read_to_string(repo_root().join("examples/prompt-eval/cases.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// POST `body` to `path`: the status and the JSON answer.
fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let response = client().post(server.url(path)).json(body).send().unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

fn get(server: &Server, path: &str) -> (u16, Value) {
    let response = client().get(server.url(path)).send().unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

/// `field` of each object in the array `list`.
fn fields(list: &Value, field: &str) -> Vec<String> {
    let list = list
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"));
    list.iter()
        .map(|entry| entry[field].as_str().unwrap().to_string())
        .collect()
}

/// The stages an item's result ran, in order.
fn stage_names(result: &Value) -> Vec<String> {
    fields(&result["stages"], "stage")
}

fn job_id(answer: &Value) -> String {
    answer["job_id"].as_str().expect("a job id").to_string()
}

/// Both examples through one server, jobs of each submitted in turn (by path, by body and as
/// a scan), each run by its own pipeline; listings, stage versions and kv per pipeline.
#[test]
fn two_pipelines_serve_interleaved_jobs() {
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let eco = eco_scan_pipeline(dir.path(), |text| text);
    let eval = prompt_eval_pipeline(dir.path());
    let server = serve(
        &eco,
        &dir.path().join("data"),
        Some(&mock),
        &[eval.to_str().unwrap(), "--admin-token", "admin"],
    );

    let listed = get_json(&server, "/v1/pipelines");
    let names = fields(&listed["pipelines"], "name");
    assert_eq!(names, ["eco-scan", "prompt-eval"], "{listed}");
    let eval_info = get_json(&server, "/v1/pipelines/prompt-eval");
    let eval_stages = fields(&eval_info["stages"], "name");
    assert_eq!(eval_stages, ["generate", "grade"], "{eval_info}");
    assert_eq!(eval_info["handlers"], json!([]), "{eval_info}");
    let eco_info = get_json(&server, "/v1/pipelines/eco-scan");
    assert_eq!(
        eco_info["stages"].as_array().unwrap().len(),
        4,
        "{eco_info}"
    );
    assert!(!eco_info["kv"].as_array().unwrap().is_empty(), "{eco_info}");

    // Interleaved: eco-scan by path, prompt-eval by body, a scan by path, again.
    let mut eco_jobs = Vec::new();
    let mut eval_jobs = Vec::new();
    for round in 0..2 {
        let (status, answer) = post(
            &server,
            "/v1/pipelines/eco-scan/jobs",
            &json!({ "items": eco_items(3) }),
        );
        assert_eq!(status, 202, "{answer}");
        eco_jobs.push(job_id(&answer));
        let (status, answer) = post(
            &server,
            "/v1/jobs",
            &json!({ "pipeline": "prompt-eval", "items": cases(4 + round) }),
        );
        assert_eq!(status, 202, "{answer}");
        eval_jobs.push(job_id(&answer));
        let (status, answer) = post(&server, "/v1/pipelines/eco-scan/scans", &eco_items(1)[0]);
        assert_eq!(status, 202, "{answer}");
        eco_jobs.push(answer["task_id"].as_str().unwrap().to_string());
    }
    for job in &eco_jobs {
        let status = wait_for_job(&server, job);
        assert_eq!(status["state"], "completed", "{status}");
        assert_eq!(status["pipeline"], "eco-scan", "{status}");
        assert_eq!(status["failed"], 0, "{status}");
        for result in job_results(&server, job) {
            assert_eq!(stage_names(&result), ["vision", "rule", "answer", "reward"]);
        }
    }
    for job in &eval_jobs {
        let status = wait_for_job(&server, job);
        assert_eq!(status["state"], "completed", "{status}");
        assert_eq!(status["pipeline"], "prompt-eval", "{status}");
        let stages = fields(&status["stage_versions"], "stage");
        assert_eq!(stages, ["generate", "grade"], "{status}");
        for result in job_results(&server, job) {
            assert_eq!(stage_names(&result), ["generate", "grade"]);
            assert_eq!(result["output"]["grade"]["passed"], true, "{result}");
        }
    }

    // The job list filters by pipeline.
    let (status, listed) = get(&server, "/v1/jobs?pipeline=prompt-eval");
    assert_eq!(status, 200, "{listed}");
    let mut listed = fields(&listed["jobs"], "id");
    listed.sort();
    eval_jobs.sort();
    assert_eq!(listed, eval_jobs);
    let all = get_json(&server, "/v1/jobs");
    assert_eq!(all["jobs"].as_array().unwrap().len(), 6);

    // With two pipelines, a request must say which; an unknown name is a 404.
    let (status, error) = post(&server, "/v1/jobs", &json!({ "items": eco_items(1) }));
    assert_eq!(status, 422, "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("several pipelines (`eco-scan`, `prompt-eval`)"),
        "{message}"
    );
    let (status, error) = post(&server, "/v1/pipelines/nope/jobs", &json!({ "items": [1] }));
    assert_eq!(status, 404, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no pipeline `nope`"),
        "{error}"
    );
    let (status, error) = post(
        &server,
        "/v1/pipelines/eco-scan/jobs",
        &json!({ "pipeline": "prompt-eval", "items": [1] }),
    );
    assert_eq!(status, 422, "{error}");
    let (status, _) = get(&server, "/v1/stages");
    assert_eq!(status, 422);
    let (status, stages) = get(&server, "/v1/stages?pipeline=prompt-eval");
    assert_eq!(status, 200);
    assert_eq!(stages["stages"].as_array().unwrap().len(), 2, "{stages}");
    let (status, kv) = get(&server, "/v1/kv?pipeline=prompt-eval");
    assert_eq!((status, &kv["namespaces"]), (200, &json!([])), "{kv}");

    // Stage versions are the pipeline's: a canary on eco-scan's `answer` leaves prompt-eval
    // alone, and a stage name only one pipeline has is a 404 on the other.
    let install = |query: &str| {
        client()
            .put(server.url(&format!("/v1/stages/answer?{query}")))
            .bearer_auth("admin")
            .body(plugin_bytes("answer"))
            .send()
            .unwrap()
    };
    assert_eq!(install("pipeline=eco-scan&canary=10").status(), 200);
    let refused = install("pipeline=prompt-eval");
    assert_eq!(refused.status(), 404);
    let refused: Value = refused.json().unwrap();
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no stage `answer` in pipeline `prompt-eval`"),
        "{refused}"
    );
    let eco_info = get_json(&server, "/v1/pipelines/eco-scan");
    let answer = &eco_info["stages"][2];
    assert_eq!(answer["name"], "answer");
    assert_eq!(answer["canary"]["percent"], 10, "{eco_info}");

    // Metrics carry the pipeline.
    let items = |pipeline: &str| {
        metric(
            &server,
            &format!("stagehand_items_total{{pipeline=\"{pipeline}\",status=\"succeeded\"}}"),
        )
    };
    assert_eq!(items("eco-scan"), Some(8.0));
    assert_eq!(items("prompt-eval"), Some(9.0));
    let tries = metric(
        &server,
        "stagehand_stage_tries_total{pipeline=\"prompt-eval\",stage=\"grade\",outcome=\"succeeded\"}",
    );
    assert_eq!(tries, Some(9.0));

    // The command line: `pipelines` shows both, `submit --pipeline` names one, and without it a
    // server of two pipelines refuses the job with the names.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(binary("stagehand"))
            .args(args)
            .args(["--server", &server.url("")])
            .output()
            .unwrap();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (
            output.status.success(),
            text(&output.stdout),
            text(&output.stderr),
        )
    };
    let (ok, shown, _) = cli(&["pipelines"]);
    assert!(ok);
    for expected in [
        "eco-scan  revision ",
        "prompt-eval  revision ",
        "  stage generate",
        "canary",
    ] {
        assert!(shown.contains(expected), "{expected:?} in\n{shown}");
    }
    let items = dir.path().join("cases.jsonl");
    let lines: Vec<String> = cases(3).iter().map(Value::to_string).collect();
    std::fs::write(&items, lines.join("\n")).unwrap();
    let items = items.to_str().unwrap();
    let (ok, _, error) = cli(&["submit", items, "--pipeline", "prompt-eval", "--follow"]);
    assert!(ok, "{error}");
    let (ok, _, error) = cli(&["submit", items]);
    assert!(!ok);
    assert!(
        error.contains("422") && error.contains("several pipelines"),
        "{error}"
    );
    let (ok, listed, _) = cli(&["jobs", "--pipeline", "prompt-eval", "--json"]);
    assert!(ok);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(
        listed
            .lines()
            .all(|l| l.contains("\"pipeline\":\"prompt-eval\"")),
        "{listed}"
    );

    // After a restart each pipeline has its own stage versions back.
    drop(server);
    let server = serve(
        &eco,
        &dir.path().join("data"),
        Some(&mock),
        &[eval.to_str().unwrap()],
    );
    let eco_info = get_json(&server, "/v1/pipelines/eco-scan");
    assert_eq!(eco_info["stages"][2]["canary"]["percent"], 10, "{eco_info}");
    let eval_info = get_json(&server, "/v1/pipelines/prompt-eval");
    assert!(
        eval_info["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["canary"].is_null() && s["previous"] == json!([])),
        "{eval_info}"
    );
}

/// A directory of pipeline files serves each; two files with one name are refused at start,
/// naming both; so is a directory without any.
#[test]
fn a_directory_serves_every_pipeline_file_in_it() {
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir(&pipelines).unwrap();
    eco_scan_pipeline(&pipelines, |text| text);
    prompt_eval_pipeline(&pipelines);
    std::fs::write(pipelines.join("README.md"), "not a pipeline").unwrap();
    let server = serve(&pipelines, &dir.path().join("data"), Some(&mock), &[]);
    let listed = get_json(&server, "/v1/pipelines");
    assert_eq!(listed["pipelines"].as_array().unwrap().len(), 2, "{listed}");
    let (status, answer) = post(
        &server,
        "/v1/pipelines/prompt-eval/jobs",
        &json!({ "items": cases(2) }),
    );
    assert_eq!(status, 202, "{answer}");
    let status = wait_for_job(&server, &job_id(&answer));
    assert_eq!(status["succeeded"], 2, "{status}");
    drop(server);

    let twice = dir.path().join("twice");
    std::fs::create_dir(&twice).unwrap();
    prompt_eval_pipeline(&twice);
    std::fs::copy(
        twice.join("prompt-eval.toml"),
        twice.join("prompt-eval-copy.toml"),
    )
    .unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for (path, expected) in [
        (&twice, "both name their pipeline `prompt-eval`"),
        (&empty, "holds no pipeline file"),
    ] {
        let refused = std::process::Command::new(binary("stagehand"))
            .arg("serve")
            .arg(path)
            .args(["--addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("refused"))
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// Redis mode: two nodes serving both pipelines share the work; each item, whichever node
/// takes it, runs on the pipeline its job names.
#[test]
fn two_pipelines_share_a_redis_cluster() {
    let redis = stagehand_tests::cluster::RedisServer::start().expect("redis-server starts");
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let eco = eco_scan_pipeline(dir.path(), |text| text);
    let eval = prompt_eval_pipeline(dir.path());
    let url = redis.url();
    let flags = [
        eval.to_str().unwrap(),
        "--redis",
        &url,
        "--slots",
        "4",
        "--admin-token",
        "admin",
    ];
    let node1 = serve(&eco, &dir.path().join("n1"), Some(&mock), &flags);
    let node2 = serve(&eco, &dir.path().join("n2"), Some(&mock), &flags);

    let mut jobs = Vec::new();
    for (node, pipeline, items) in [
        (&node1, "prompt-eval", cases(6)),
        (&node2, "eco-scan", eco_items(6)),
        (&node2, "prompt-eval", cases(3)),
        (&node1, "eco-scan", eco_items(2)),
    ] {
        let path = format!("/v1/pipelines/{pipeline}/jobs");
        let (status, answer) = post(node, &path, &json!({ "items": items }));
        assert_eq!(status, 202, "{answer}");
        jobs.push((pipeline, job_id(&answer)));
    }
    for (pipeline, job) in &jobs {
        let status = wait_for_job(&node1, job);
        assert_eq!(status["state"], "completed", "{status}");
        assert_eq!(status["pipeline"], *pipeline, "{status}");
        assert_eq!(status["failed"], 0, "{status}");
        let expected: &[&str] = match *pipeline {
            "eco-scan" => &["vision", "rule", "answer", "reward"],
            _ => &["generate", "grade"],
        };
        for result in job_results(&node2, job) {
            assert_eq!(stage_names(&result), expected, "{result}");
        }
    }
    let (status, listed) = get(&node2, "/v1/jobs?pipeline=eco-scan");
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 2, "{listed}");
}

/// A job of a pipeline the server no longer serves stays readable (status, results, stage
/// times, its dead letter), and reprocessing it is refused with the reason.
#[test]
fn jobs_of_a_pipeline_no_longer_served_stay_readable() {
    let mock = mock();
    let dir = tempfile::tempdir().unwrap();
    let eco = eco_scan_pipeline(dir.path(), |text| text);
    let eval = prompt_eval_pipeline(dir.path());
    let data = dir.path().join("data");
    let admin = ["--admin-token", "admin"];
    let mut server = serve(
        &eco,
        &data,
        Some(&mock),
        &[&[eval.to_str().unwrap()], &admin[..]].concat(),
    );
    let mut items = eco_items(2);
    items.push(json!({ "user_id": "u1", "image_url": "https://images.example/alien_thing.jpg" }));
    let (status, answer) = post(
        &server,
        "/v1/pipelines/eco-scan/jobs",
        &json!({ "items": items }),
    );
    assert_eq!(status, 202, "{answer}");
    let job = job_id(&answer);
    let end = wait_for_job(&server, &job);
    assert_eq!(
        (end["succeeded"].as_u64(), end["failed"].as_u64()),
        (Some(2), Some(1)),
        "{end}"
    );
    // A graceful stop: a status of `completed` is visible before the job's last flush.
    assert!(server.terminate().success());

    let server = serve(&eval, &data, Some(&mock), &admin);
    let status = get_json(&server, &format!("/v1/jobs/{job}"));
    assert_eq!(status["pipeline"], "eco-scan", "{status}");
    assert_eq!(status["stage_versions"], json!([]), "{status}");
    assert_eq!(job_results(&server, &job).len(), 3);
    let times = get_json(&server, &format!("/v1/jobs/{job}/stages"));
    assert_eq!(fields(&times["stages"], "stage")[0], "vision", "{times}");
    let (status, letters) = get(&server, "/v1/dead-letters?pipeline=eco-scan");
    assert_eq!(status, 200);
    assert_eq!(
        letters["dead_letters"].as_array().unwrap().len(),
        1,
        "{letters}"
    );
    let refused = client()
        .post(server.url(&format!("/v1/jobs/{job}/reprocess")))
        .bearer_auth("admin")
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 409);
    let refused: Value = refused.json().unwrap();
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("pipeline `eco-scan`, which this server does not serve"),
        "{message}"
    );
}
