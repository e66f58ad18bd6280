//! The command-line client against a live server: `submit --follow` survives the server being
//! killed with kill -9 and restarted (it resumes with `Last-Event-ID`), `jobs`, `results --out`,
//! `cancel`, and `dlq` with and without the admin token.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagehand_tests::{MockLlm, Server, binary, eco_items, repo_root};

const API: &str = "client-api-token";
const ADMIN: &str = "client-admin-token";

/// The eco-scan server on `addr` (fixed, so that a restart is found at the same address).
fn serve_at(addr: &str, mock: &MockLlm, data: &Path) -> Server {
    let pipeline = repo_root().join("examples/eco-scan/pipeline.toml");
    let llm = mock.base_url();
    let args = [
        "serve",
        pipeline.to_str().unwrap(),
        "--addr",
        addr,
        "--data-dir",
        data.to_str().unwrap(),
        "--llm-base-url",
        &llm,
        "--api-token",
        API,
        "--admin-token",
        ADMIN,
    ];
    Server::start(&binary("stagehand"), &args).expect("stagehand serve starts")
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn write_items(path: &Path, items: &[Value]) {
    let mut file = std::fs::File::create(path).unwrap();
    for item in items {
        writeln!(file, "{item}").unwrap();
    }
}

/// `stagehand <args> --server <server>` to its end.
fn client(server: &str, args: &[&str]) -> Output {
    Command::new(binary("stagehand"))
        .args(args)
        .args(["--server", &format!("http://{server}")])
        .output()
        .expect("the client runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn submit_follow_resumes_across_a_server_kill_and_the_results_are_all_there() {
    // 40 items, 4 at a time, 0.2 s per LLM call: long enough to kill the server mid-job.
    let mock = MockLlm::start(&["--latency-ms", "200", "--vision-latency-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let items_file = dir.path().join("items.jsonl");
    write_items(&items_file, &eco_items(40));
    let address = free_address();
    let mut server = serve_at(&address, &mock, &data);

    let follower = Command::new(binary("stagehand"))
        .args([
            "submit",
            items_file.to_str().unwrap(),
            "--follow",
            "--stages",
        ])
        .args(["--concurrency", "4", "--label", "source=cli-test"])
        .args(["--server", &format!("http://{address}"), "--token", API])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Once some items are done, kill -9 the server and start it again on the same address.
    let jobs_url = format!("http://{address}/v1/jobs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let listed: Value = stagehand_tests::client()
            .get(&jobs_url)
            .bearer_auth(API)
            .send()
            .unwrap()
            .json()
            .unwrap();
        if let Some(job) = listed["jobs"][0].as_object() {
            let done = job["succeeded"].as_u64().unwrap() + job["failed"].as_u64().unwrap();
            if done >= 8 {
                assert!(done < 40, "the job ended before the kill");
                break job["id"].as_str().unwrap().to_string();
            }
        }
        assert!(Instant::now() < deadline, "no progress: {listed}");
        std::thread::sleep(Duration::from_millis(50));
    };
    server.child().kill().unwrap(); // SIGKILL
    server.child().wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let server = serve_at(&address, &mock, &data);

    let output = follower.wait_with_output().unwrap();
    let (out, err) = (stdout(&output), stderr(&output));
    assert!(output.status.success(), "{out}\n{err}");
    assert!(
        out.starts_with(&format!("job {job} accepted: 40 items")),
        "{out}"
    );
    let summary = out.lines().last().unwrap();
    assert!(
        summary.starts_with(&format!(
            "job {job} completed: 40 succeeded, 0 failed of 40"
        )),
        "{summary}"
    );
    assert!(summary.contains("(1 reconnect)"), "{summary}\n{err}");
    // The per-stage breakdown names every stage with its passes. Resuming after the last event
    // seen counts each pass once (items in flight at the kill, at most 4, may pass again);
    // replaying from the start would count the 8 or more items done before the kill twice.
    for stage in ["vision", "rule", "answer", "reward"] {
        let passes: u64 = summary
            .split(&format!("{stage} "))
            .nth(1)
            .and_then(|rest| rest.split(['(', ')']).nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no passes of {stage}: {summary}"));
        assert!((40..=44).contains(&passes), "{stage}: {summary}");
    }
    assert!(err.contains("resuming"), "{err}");
    let status: Value = stagehand_tests::client()
        .get(server.url(&format!("/v1/jobs/{job}")))
        .bearer_auth(API)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(status["labels"]["source"], "cli-test", "{status}");

    // `results --out`: every item exactly once.
    let results_file = dir.path().join("results.jsonl");
    let output = client(
        &address,
        &[
            "results",
            &job,
            "--out",
            results_file.to_str().unwrap(),
            "--token",
            API,
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let indices: Vec<u64> = std::fs::read_to_string(&results_file)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["index"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(indices.len(), 40);
    assert_eq!(indices.iter().collect::<BTreeSet<_>>().len(), 40);

    // `jobs` lists it; without the token the client says why it was refused.
    let output = client(&address, &["jobs", "--token", API]);
    assert!(output.status.success());
    assert!(
        stdout(&output).contains(&format!("{job}  completed")),
        "{}",
        stdout(&output)
    );
    let output = client(&address, &["jobs"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("401"), "{}", stderr(&output));
}

#[test]
fn cancel_and_dead_letters_from_the_command_line() {
    let mock = MockLlm::start(&["--latency-ms", "300", "--vision-latency-ms", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let address = free_address();
    let _server = serve_at(&address, &mock, &dir.path().join("data"));
    let run = |args: &[&str]| client(&address, args);

    // A malformed file is refused before anything is sent, naming the line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"user_id\": \"u1\"}\n\n{not json\n").unwrap();
    let output = run(&["submit", bad.to_str().unwrap(), "--token", API]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("line 3 is not JSON"),
        "{}",
        stderr(&output)
    );

    // Cancel a long job.
    let long = dir.path().join("long.jsonl");
    write_items(&long, &eco_items(200));
    let output = run(&[
        "submit",
        long.to_str().unwrap(),
        "--concurrency",
        "2",
        "--token",
        API,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let job = stdout(&output)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let output = run(&["cancel", &job, "--token", API]);
    assert_eq!(stdout(&output).trim(), format!("job {job} cancelling"));

    // One item fails for good (an unknown category) and becomes a dead letter.
    let mut items = eco_items(2);
    items.push(json!({ "user_id": "u1", "image_url": "https://images.example/alien_thing.jpg" }));
    let mixed = dir.path().join("mixed.jsonl");
    write_items(&mixed, &items);
    let output = run(&[
        "submit",
        mixed.to_str().unwrap(),
        "--follow",
        "--token",
        API,
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("2 succeeded, 1 failed of 3"),
        "{}",
        stdout(&output)
    );
    let failed = stdout(&output)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();

    let output = run(&["dlq", "list", "--job", &failed, "--token", API]);
    let listed = stdout(&output);
    assert!(
        listed.starts_with(&format!("{failed}/2  rule  fatal: ")),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let output = run(&["dlq", "show", &failed, "2", "--token", API]);
    let shown: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(shown["stage"], "rule");

    // Reprocessing is an admin operation.
    let output = run(&["dlq", "reprocess", &failed, "--token", API]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("admin"), "{}", stderr(&output));
    let output = run(&["dlq", "reprocess", &failed, "2", "--token", ADMIN]);
    assert_eq!(
        stdout(&output).trim(),
        format!("job {failed}: reprocessing 1")
    );
    let output = run(&["dlq", "discard", &failed, "2", "--token", ADMIN]);
    // Reprocessing may still hold it; once it failed again it can be discarded.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut output = output;
    while !output.status.success() {
        assert!(Instant::now() < deadline, "{}", stderr(&output));
        std::thread::sleep(Duration::from_millis(100));
        output = run(&["dlq", "discard", &failed, "2", "--token", ADMIN]);
    }
    assert_eq!(stdout(&output).trim(), format!("discarded {failed}/2"));
    let output = run(&["dlq", "list", "--job", &failed, "--token", API]);
    assert_eq!(stdout(&output), "");
}
