//! Outbound HTTP (`wasi:http/outgoing-handler`) over real sockets: a stage reaches the hosts of
//! its `allowed_hosts` and nothing else (refused requests never reach their server, nor does a
//! redirect off the list); a stage without the grant reaches nothing; requests are journaled
//! (the stage holds no instance while one waits, and a request is made once however many runs
//! the stage takes); the `http` limits (requests per try, request and response bytes,
//! timeout) fail what passes them; a cancel drops a request in flight.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagehand_tests::backends::Backend;
use stagehand_tests::{
    FactsService, Server, binary, client, job_results, job_status, metrics_text, on_both_backends,
    plugin_path, serve_logged, stage_run, submit_job, wait_for_job, wait_until,
};

on_both_backends!(a_stage_reaches_its_allowed_hosts_and_nothing_else);

/// Two stages of the hostile component: `granted` may reach `allowed` (with `http` limits),
/// `closed` has no grant.
fn pipeline(dir: &Path, allowed: &str, http: &str) -> PathBuf {
    pipeline_with(dir, &format!("\"{allowed}\""), http, "")
}

/// [`pipeline`] with `allowed` written as the list's items, and `extra` tables at the end.
fn pipeline_with(dir: &Path, allowed: &str, http: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"name = "outbound"
[llm]
base_url = "http://127.0.0.1:9/v1"
model = "mock"

[defaults]
max_attempts = 1
timeout_ms = 30000

[[stage]]
name = "granted"
component = "{hostile}"
allowed_hosts = [{allowed}]
http = {{ {http} }}

[[stage]]
name = "closed"
component = "{hostile}"

{extra}
"#,
        hostile = plugin_path("hostile").display(),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn serve_outbound(dir: &Path, pipeline: &Path, backend: &Backend) -> Server {
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    serve_logged(
        pipeline,
        &dir.join("data"),
        None,
        &backend.flags(&[]),
        Stdio::from(log),
    )
}

/// Run one item and return its result.
fn run(server: &Server, item: Value) -> Value {
    let job = submit_job(server, vec![item], json!({}));
    wait_for_job(server, &job);
    job_results(server, &job).remove(0)
}

/// The replies a stage got, from its output.
fn replies<'a>(result: &'a Value, stage: &str) -> &'a Vec<Value> {
    result["output"][stage]["replies"]
        .as_array()
        .unwrap_or_else(|| panic!("{stage} has replies: {result}"))
}

/// The error the first request of `stage` got.
fn error_of(result: &Value, stage: &str) -> String {
    replies(result, stage)[0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{stage}'s request failed: {result}"))
        .to_string()
}

fn outbound_total(server: &Server, outcome: &str) -> f64 {
    metrics_text(server)
        .lines()
        .filter(|l| {
            l.starts_with("stagehand_outbound_requests_total{")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn a_stage_reaches_its_allowed_hosts_and_nothing_else(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let facts = FactsService::start("facts-key");
    let other = FactsService::start("other-key");
    let server = serve_outbound(
        dir.path(),
        &pipeline(dir.path(), &facts.origin(), ""),
        &backend,
    );

    // Allowed: a POST with a body reaches the service; the answer comes by replay, so the
    // stage ran twice and the service saw one request.
    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/echo"), "method": "POST", "body": "hello",
               "headers": {"x-probe": "1"}}),
    );
    let granted = &replies(&result, "granted")[0];
    assert_eq!(granted["status"], 200, "{result}");
    let echoed: Value = serde_json::from_str(granted["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["body"], "hello");
    assert_eq!(echoed["headers"]["x-probe"], "1");
    assert_eq!(
        stage_run(&result, "granted")["runs"],
        2,
        "evicted while it waited"
    );
    assert_eq!(facts.received("/echo"), 1, "made once, answered by replay");
    // The stage without a grant reaches nothing, not even the same service.
    assert!(
        error_of(&result, "closed").contains("HttpRequestDenied"),
        "{result}"
    );
    assert_eq!(facts.received("/echo"), 1);

    // Another host: refused in the guest, never reached, logged and counted.
    let result = run(
        &server,
        json!({"do": "fetch", "target": other.url("/echo")}),
    );
    assert!(
        error_of(&result, "granted").contains("HttpRequestDenied"),
        "{result}"
    );
    assert_eq!(other.received("/echo"), 0);
    assert!(outbound_total(&server, "denied") >= 3.0);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains(&format!("{} is not in `allowed_hosts`", other.origin())),
        "the refusal is in the log: {log}"
    );

    // A redirect within the list is followed; one that leaves it is refused.
    let inside = facts.url("/redirect?to=/echo");
    let result = run(&server, json!({"do": "fetch", "target": inside}));
    assert_eq!(replies(&result, "granted")[0]["status"], 200, "{result}");
    let outside = facts.url(&format!("/redirect?to={}", other.url("/echo")));
    let result = run(&server, json!({"do": "fetch", "target": outside}));
    assert!(
        error_of(&result, "granted").contains("HttpRequestDenied"),
        "{result}"
    );
    assert_eq!(other.received("/echo"), 0, "the redirect was not followed");
    assert!(outbound_total(&server, "2xx") >= 2.0);
}

/// Three requests in a row: each made once over the four runs the stage takes.
#[test]
fn each_request_is_made_once_however_many_runs_the_stage_takes() {
    let dir = tempfile::tempdir().unwrap();
    let facts = FactsService::start("k");
    let server = serve_outbound(
        dir.path(),
        &pipeline(dir.path(), &facts.origin(), ""),
        &Backend::Embedded,
    );
    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/echo"), "size": 3}),
    );
    let granted = replies(&result, "granted");
    assert_eq!(granted.len(), 3);
    assert!(granted.iter().all(|r| r["status"] == 200), "{result}");
    assert_eq!(stage_run(&result, "granted")["runs"], 4);
    assert_eq!(facts.received("/echo"), 3);
}

#[test]
fn the_http_limits_fail_what_passes_them() {
    let dir = tempfile::tempdir().unwrap();
    let facts = FactsService::start("k");
    let limits = "requests = 3, response_kib = 4, request_kib = 1, timeout_ms = 300";
    let server = serve_outbound(
        dir.path(),
        &pipeline(dir.path(), &facts.origin(), limits),
        &Backend::Embedded,
    );

    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/bytes?n=5000")}),
    );
    let error = error_of(&result, "granted");
    assert!(
        error.contains("HttpResponseBodySize(Some(4096))"),
        "{error}"
    );
    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/bytes?n=4000")}),
    );
    assert_eq!(replies(&result, "granted")[0]["status"], 200, "{result}");

    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/echo"), "method": "POST",
               "body": "b".repeat(2000)}),
    );
    let error = error_of(&result, "granted");
    assert!(error.contains("HttpRequestBodySize(Some(1024))"), "{error}");

    let started = Instant::now();
    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/slow?ms=5000")}),
    );
    let error = error_of(&result, "granted");
    assert!(error.contains("HttpResponseTimeout"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout cut it"
    );

    // A fourth request in one try is past `requests = 3`: the try fails with the budget named.
    let job = submit_job(
        &server,
        vec![json!({"do": "fetch", "target": facts.url("/echo"), "size": 4})],
        json!({}),
    );
    let status = wait_for_job(&server, &job);
    assert_eq!(status["failed"], 1, "{status}");
    let result = &job_results(&server, &job)[0];
    let message = result["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("budget `http_requests`"), "{result}");
    assert_eq!(result["error"]["kind"], "budget", "{result}");
}

#[test]
fn a_cancel_drops_a_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let facts = FactsService::start("k");
    let server = serve_outbound(
        dir.path(),
        &pipeline(dir.path(), &facts.origin(), "timeout_ms = 120000"),
        &Backend::Embedded,
    );
    let job = submit_job(
        &server,
        vec![json!({"do": "fetch", "target": facts.url("/slow?ms=100000")})],
        json!({}),
    );
    wait_until("the request reached the service", || {
        facts.received("/slow") == 1
    });
    let started = Instant::now();
    let response = client()
        .post(server.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .unwrap();
    assert!(response.status().is_success());
    let status = wait_for_job(&server, &job);
    assert_eq!(status["state"], "cancelled", "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the request was dropped, not awaited"
    );
    assert_eq!(job_status(&server, &job)["state"], "cancelled");
}

/// A secret goes, filled in by the host, to the hosts it is bound to and nowhere else; what
/// comes back carries the placeholder, not the value; no log, result or stored byte holds it.
#[test]
fn a_secret_is_used_by_the_guest_and_never_seen_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let facts = FactsService::start("facts-key-0451");
    let other = FactsService::start("other");
    let secret = format!(
        "[secrets.FACTS_KEY]\nenv = \"OUTBOUND_TEST_FACTS_KEY\"\nhosts = [\"{}\"]\n",
        facts.origin()
    );
    let pipeline = pipeline_with(
        dir.path(),
        &format!("\"{}\", \"{}\"", facts.origin(), other.origin()),
        "",
        &secret,
    );
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut command = std::process::Command::new(binary("stagehand"));
    command
        .args(["serve", &pipeline.display().to_string()])
        .args(["--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("OUTBOUND_TEST_FACTS_KEY", &facts.key)
        .stderr(log);
    let mut server = Server::start_command(command).unwrap();
    let bearer = json!({"authorization": "Bearer {{secret:FACTS_KEY}}"});

    // The service gets the key and answers.
    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/facts?q=pet"), "headers": bearer}),
    );
    let reply = &replies(&result, "granted")[0];
    assert_eq!(reply["status"], 200, "{result}");
    assert!(
        reply["body"].as_str().unwrap().contains("PET bottles"),
        "{result}"
    );
    assert_eq!(
        facts.stats()["last_authorization"],
        format!("Bearer {}", facts.key)
    );
    // The stage without a grant cannot use it either.
    assert!(error_of(&result, "closed").contains("HttpRequestDenied"));

    // A service that echoes its headers sends back the placeholder, not the value.
    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/echo"), "headers": bearer}),
    );
    let reply = &replies(&result, "granted")[0];
    let echoed: Value = serde_json::from_str(reply["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        echoed["headers"]["authorization"],
        "Bearer {{secret:FACTS_KEY}}"
    );

    // An allowed host the secret is not bound to: refused, never reached.
    let result = run(
        &server,
        json!({"do": "fetch", "target": other.url("/echo"), "headers": bearer}),
    );
    let error = error_of(&result, "granted");
    assert!(error.contains("HttpRequestDenied"), "{error}");
    assert_eq!(other.received("/echo"), 0);
    // Nor through a redirect from a host it is bound to.
    let hop = facts.url(&format!("/redirect?to={}", other.url("/echo")));
    let result = run(
        &server,
        json!({"do": "fetch", "target": hop, "headers": bearer}),
    );
    assert!(error_of(&result, "granted").contains("HttpRequestDenied"));
    assert_eq!(other.received("/echo"), 0);
    // An unknown secret is refused too.
    let result = run(
        &server,
        json!({"do": "fetch", "target": facts.url("/echo"),
               "headers": {"x-key": "{{secret:NOPE}}"}}),
    );
    assert!(error_of(&result, "granted").contains("HttpRequestDenied"));

    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("secret `FACTS_KEY` is not bound to"),
        "the refusal is logged"
    );
    assert!(!log.contains(&facts.key), "no log line holds the value");
    for file in walk(&dir.path().join("data")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes
                .windows(facts.key.len())
                .any(|w| w == facts.key.as_bytes()),
            "{} holds the secret",
            file.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A kill -9 while a stage waits on a request loses nothing: after the restart the item runs
/// again, makes its request again (the answer never came) and succeeds.
#[test]
fn a_kill_9_while_a_request_waits_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let facts = FactsService::start("k");
    let pipeline = pipeline(dir.path(), &facts.origin(), "timeout_ms = 20000");
    let server = serve_outbound(dir.path(), &pipeline, &Backend::Embedded);
    let job = submit_job(
        &server,
        vec![json!({"do": "fetch", "target": facts.url("/slow?ms=1500")})],
        json!({}),
    );
    wait_until("the request reached the service", || {
        facts.received("/slow") == 1
    });
    drop(server); // kill -9
    let server = serve_outbound(dir.path(), &pipeline, &Backend::Embedded);
    let status = wait_for_job(&server, &job);
    assert_eq!(status["succeeded"], 1, "{status}");
    let result = &job_results(&server, &job)[0];
    assert_eq!(replies(result, "granted")[0]["status"], 200, "{result}");
    assert_eq!(
        facts.received("/slow"),
        2,
        "asked again: its answer never came"
    );
}
