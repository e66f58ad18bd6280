//! The hostile suite: a stage that does, within one try, what an attacker's stage would (a log
//! flood, an emit flood, a `dispatch.call` flood, an LLM loop, an output 200 levels deep, a huge
//! kv key, a stack overflow, a huge progress message) over real HTTP, next to well-behaved
//! items. Each bad item fails alone with kind `budget` (or `invalid_output`, `trap`) naming
//! what it went past; the server's memory, log and data dir stay bounded, and it keeps serving.
//! A job's LLM token budget stops its LLM calls once used up.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};
use stagehand_tests::{
    MockLlm, Server, job_results, job_status, repo_root, submit_job, wait_for_job,
};

fn pipeline(dir: &Path) -> PathBuf {
    let wasm = |name: &str| {
        repo_root()
            .join("target/wasm32-wasip2/release")
            .join(name)
            .display()
            .to_string()
    };
    let rules = dir.join("rules.json");
    std::fs::write(&rules, r#"{"k": {"bin": "general"}}"#).unwrap();
    let text = format!(
        r#"name = "hostile-suite"
[llm]
base_url = "http://127.0.0.1:9/v1"
model = "mock"

[defaults]
memory_mib = 64
cpu_ms = 2000
timeout_ms = 30000
max_attempts = 1

[[stage]]
name = "hostile"
component = "{}"

[handlers.sink]
component = "{}"

[kv.rules]
file = "{}"
"#,
        wasm("hostile.wasm"),
        wasm("save_ownership.wasm"),
        rules.display()
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The server with its log (stderr) in `log`.
fn serve(dir: &Path, mock: &MockLlm, log: &Path) -> Server {
    let log = std::fs::File::create(log).unwrap();
    let data = dir.join("data");
    stagehand_tests::serve_logged(&pipeline(dir), &data, Some(mock), &[], Stdio::from(log))
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dir_size(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[test]
fn each_flood_fails_only_its_item_within_bounded_memory_log_and_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockLlm::start(&["--latency-ms", "0"]);
    let log = dir.path().join("server.log");
    let server = serve(dir.path(), &mock, &log);
    let items = vec![
        json!({ "do": "echo" }),
        // 20 MB of log lines without a budget.
        json!({ "do": "log-flood", "size": 20_000 }),
        // A GB of durable effects without a budget.
        json!({ "do": "emit-flood", "size": 100_000, "target": "sink" }),
        json!({ "do": "call-flood", "size": 100_000, "target": "sink" }),
        json!({ "do": "llm-loop", "size": 3000 }),
        json!({ "do": "deep-output", "size": 200 }),
        json!({ "do": "huge-kv-key", "size": 8_000_000 }),
        json!({ "do": "deep-recursion" }),
        json!({ "do": "big-progress", "size": 100_000 }),
        json!({ "do": "echo" }),
    ];
    let job = submit_job(&server, items, json!({ "concurrency": 4 }));
    wait_for_job(&server, &job);
    // The page with the deep output's item is served whole.
    let results = job_results(&server, &job);
    assert_eq!(results.len(), 10);
    let outcome = |index: usize| -> (&str, &str, &str) {
        let r = &results[index];
        (
            r["status"].as_str().unwrap(),
            r["error"]["kind"].as_str().unwrap_or_default(),
            r["error"]["message"].as_str().unwrap_or_default(),
        )
    };
    for index in [0, 1, 9] {
        assert_eq!(outcome(index).0, "succeeded", "{}", results[index]);
    }
    for (index, kind, says) in [
        (
            2,
            "budget",
            "budget `emits`: more than 64 `dispatch.emit` calls in one try",
        ),
        (
            3,
            "budget",
            "budget `calls`: more than 64 `dispatch.call` calls in one try",
        ),
        (
            4,
            "budget",
            "budget `llm_calls`: more than 16 LLM calls in one try",
        ),
        (
            5,
            "invalid_output",
            "nests 200 levels deep, over the limit of 64",
        ),
        (
            6,
            "budget",
            "budget `kv_key`: a kv namespace or key of 8000000 bytes",
        ),
        // Rust's stack lives in linear memory: it runs off its bottom.
        (7, "trap", "wasm trap"),
        (
            8,
            "budget",
            "budget `progress_bytes`: a progress message of 100000 bytes",
        ),
    ] {
        let (status, got, message) = outcome(index);
        assert_eq!((status, got), ("failed", kind), "item {index}: {message}");
        assert!(message.contains(says), "item {index}: {message}");
    }
    // The LLM loop stopped at its budget: 16 calls reached the provider.
    assert_eq!(mock.stats()["requests"], 16, "{}", mock.stats());

    // Bounded: at most 64 effects of 10 KB were recorded, the log kept to its budget.
    let peak = server.peak_memory();
    assert!(peak < 400 << 20, "the server peaked at {} MiB", peak >> 20);
    let store = dir_size(&dir.path().join("data/store"));
    assert!(store < 16 << 20, "the store grew to {} MiB", store >> 20);
    let metrics = stagehand_tests::metrics_text(&server);
    for budget in ["emits", "calls", "llm_calls", "kv_key", "progress_bytes"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("stagehand_budget_exceeded_total")
                    && l.contains(&format!("budget=\"{budget}\""))),
            "no budget_exceeded for {budget} in\n{metrics}"
        );
    }
    let dropped = metrics
        .lines()
        .find(|l| l.starts_with("stagehand_guest_log_dropped_total"))
        .unwrap_or_else(|| panic!("no dropped log lines counted in\n{metrics}"));
    // 256 lines of 1 KiB fill the 256 KiB budget; the rest are dropped.
    assert!(dropped.ends_with(" 19744"), "{dropped}");

    // The server keeps serving, and its log is plain text of a bounded size.
    let calm = submit_job(&server, vec![json!({ "do": "echo" }); 5], json!({}));
    assert_eq!(wait_for_job(&server, &calm)["succeeded"], 5);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.len() < 2 << 20,
        "the log grew to {} KiB",
        text.len() >> 10
    );
    assert!(
        text.contains("used its log budget"),
        "the drop is said once"
    );
    assert_eq!(text.matches("used its log budget").count(), 1);
    assert!(!text.contains('\u{1b}'), "ANSI codes in a log file");
}

#[test]
fn a_job_stops_calling_the_llm_once_its_token_budget_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockLlm::start(&["--latency-ms", "0"]);
    let server = serve(dir.path(), &mock, &dir.path().join("server.log"));
    // Each call costs about 100 prompt tokens (the mock counts 4 bytes a token).
    let items = vec![json!({ "do": "llm-once", "size": 400 }); 6];
    let job = submit_job(
        &server,
        items,
        json!({ "sequential": true, "max_tokens": 250 }),
    );
    wait_for_job(&server, &job);
    let results = job_results(&server, &job);
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    let passed = statuses.iter().take_while(|s| **s == "succeeded").count();
    assert!((2..=4).contains(&passed), "{statuses:?}");
    for result in &results[passed..] {
        assert_eq!(result["error"]["kind"], "budget", "{result}");
        let message = result["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("the job's LLM token budget of 250 is used up"),
            "{message}"
        );
    }
    assert_eq!(mock.stats()["requests"], passed as u64);
    let status: Value = job_status(&server, &job);
    assert_eq!(status["max_tokens"], 250);
    let used = status["llm_tokens"].as_u64().unwrap();
    assert!(used >= 250, "{status}");
}
