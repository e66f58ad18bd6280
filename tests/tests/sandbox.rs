//! Hostile guests over real HTTP: in one job, an infinite loop, a memory bomb, a trap, an output
//! past the limit and attempts to reach the environment, files, sockets and the clock, among
//! well-behaved items. Each bad item fails alone with a clear error; the others succeed, and
//! the server keeps serving another job meanwhile. A JavaScript stage misbehaving alike fails
//! only its items too.

use serde_json::{Value, json};
use stagehand_tests::{client, job_results, repo_root, submit_job, wait_for_job};

fn pipeline(dir: &std::path::Path) -> std::path::PathBuf {
    let wasm = repo_root().join("target/wasm32-wasip2/release/hostile.wasm");
    let text = format!(
        r#"name = "sandbox"
[llm]
base_url = "http://127.0.0.1:9/v1"
model = "none"

[defaults]
memory_mib = 16
cpu_ms = 300
timeout_ms = 10000
max_output_kib = 4
max_attempts = 1

[[stage]]
name = "hostile"
component = "{}"
"#,
        wasm.display()
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn results(server: &stagehand_tests::Server, job: &str) -> Vec<Value> {
    wait_for_job(server, job);
    job_results(server, job)
}

#[test]
fn each_hostile_item_fails_alone_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = stagehand_tests::serve(&pipeline(dir.path()), dir.path(), None, &[]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let target = listener.local_addr().unwrap().to_string();

    let hostile = submit_job(
        &server,
        vec![
            json!({ "do": "echo" }),
            json!({ "do": "loop" }),
            json!({ "do": "alloc" }),
            json!({ "do": "trap" }),
            json!({ "do": "big-output", "size": 10000 }),
            json!({ "do": "env" }),
            json!({ "do": "file" }),
            json!({ "do": "socket", "target": target }),
            json!({ "do": "clock" }),
            json!({ "do": "echo" }),
        ],
        json!({ "concurrency": 10 }),
    );
    // Another job, submitted while the hostile one runs, is served as usual.
    let calm = submit_job(&server, vec![json!({ "do": "echo" }); 20], json!({}));
    let calm = results(&server, &calm);
    assert_eq!(calm.len(), 20);
    assert!(calm.iter().all(|r| r["status"] == "succeeded"), "{calm:?}");

    let results = results(&server, &hostile);
    let outcome = |index: usize| -> (String, String, String) {
        let r = &results[index];
        (
            r["status"].as_str().unwrap().to_string(),
            r["error"]["kind"].as_str().unwrap_or_default().to_string(),
            r["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    for (index, kind, says) in [
        (1, "cpu_budget", "CPU budget of 300ms"),
        (2, "memory_cap", "memory cap of 16 MiB"),
        (3, "trap", "hostile stage asked to trap"),
        (4, "invalid_output", "over the limit of 4096 bytes"),
    ] {
        let (status, got_kind, message) = outcome(index);
        assert_eq!(
            (status.as_str(), got_kind.as_str()),
            ("failed", kind),
            "item {index}: {message}"
        );
        assert!(message.contains(says), "item {index}: {message}");
    }
    // The probes run, and find nothing.
    let output = |index: usize| results[index]["output"]["hostile"].clone();
    for index in [0, 5, 6, 7, 8, 9] {
        assert_eq!(results[index]["status"], "succeeded", "{}", results[index]);
    }
    assert_eq!(output(5), json!({ "vars": 0, "home": null }));
    assert!(output(6)["file_error"].is_string());
    assert!(output(7)["socket_error"].is_string());
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    let clock = output(8);
    assert_eq!(clock["wall_ms"][0], clock["wall_ms"][1]);
    assert_eq!(clock["elapsed_ns"], 0);
    // CPU is recorded per stage for every item: a succeeded stage in `stages`, each failed try
    // in `error.attempts`, the stopped loop at its budget.
    let echo_cpu = results[0]["stages"][0]["cpu_ms"].as_f64().unwrap();
    let loop_cpu = results[1]["error"]["attempts"][0]["cpu_ms"]
        .as_f64()
        .unwrap();
    assert!(echo_cpu < 100.0, "an echo used {echo_cpu} ms");
    assert!(loop_cpu >= 290.0, "the loop used {loop_cpu} ms");

    let health = client().get(server.url("/v1/jobs")).send().unwrap();
    assert_eq!(health.status(), 200);
}

/// `--log-format json`: one JSON object per line, a guest's `log.write` tagged with the spans of
/// its job, item and stage.
#[test]
fn json_logs_carry_the_job_item_and_stage() {
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items.jsonl");
    std::fs::write(&items, "{\"do\": \"log\"}\n").unwrap();
    let out = std::process::Command::new(stagehand_tests::binary("stagehand"))
        .arg("run")
        .arg(pipeline(dir.path()))
        .arg(&items)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "hello from a guest")
        .unwrap_or_else(|| panic!("no guest log line in\n{stderr}"));
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["spans"][0]["name"], "item");
    assert_eq!(line["spans"][0]["index"], 0);
    assert!(line["spans"][0]["job"].is_string() && line["spans"][0]["item"].is_string());
    assert_eq!(line["spans"][1]["name"], "stage");
    assert_eq!(line["spans"][1]["stage"], "hostile");
    assert_eq!(line["spans"][1]["attempt"], 1);
}

/// The same for a stage in JavaScript (plugins/js/hostile, SpiderMonkey inside): a loop, a
/// memory bomb, an error that is no `stage-error` and a runaway recursion each fail their own
/// item with a clear error, and the items around them succeed.
#[test]
fn a_misbehaving_javascript_stage_fails_only_its_items() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = repo_root().join("target/wasm32-wasip2/release/hostile_js.wasm");
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "name = \"sandbox-js\"\n[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"none\"\n\
             [defaults]\ncpu_ms = 2000\ntimeout_ms = 30000\nmax_attempts = 1\n\
             [[stage]]\nname = \"hostile\"\ncomponent = \"{}\"\n",
            wasm.display()
        ),
    )
    .unwrap();
    let server = stagehand_tests::serve(&pipeline, dir.path(), None, &[]);
    let items = ["ok", "loop", "bomb", "throw", "recurse", "fatal", "ok"]
        .map(|what| json!({ "do": what }))
        .to_vec();
    let job = submit_job(&server, items, json!({ "concurrency": 7 }));
    let results = results(&server, &job);
    for index in [0, 6] {
        assert_eq!(results[index]["status"], "succeeded", "{}", results[index]);
        assert_eq!(results[index]["output"]["hostile"], json!({ "ok": true }));
    }
    for (index, kind, says) in [
        (1, "cpu_budget", "CPU budget of 2s"),
        (2, "memory_cap", "memory cap of 64 MiB"),
        (3, "trap", "a plain error, not a stage-error"),
        (4, "trap", "too much recursion"),
        (5, "fatal", "refused on purpose"),
    ] {
        let error = &results[index]["error"];
        assert_eq!(results[index]["status"], "failed", "item {index}");
        assert_eq!(error["kind"], kind, "item {index}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(says), "item {index}: {message}");
    }
}
