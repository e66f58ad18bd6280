//! The fact-check example end to end over HTTP: its stage looks each question up in the facts
//! service (outbound HTTP to the one host its pipeline file grants, the service's API key held
//! by the host as a secret), and the LLM answers from what it found. The key is used and never
//! seen: the service got it, no result holds it. `polyglot.toml` runs the same lookup written
//! in JavaScript and a Python stage that fetches citations, in one pipeline.

use serde_json::Value;
use stagehand_tests::{
    FactsService, MockLlm, Server, binary, job_results, repo_root, stage_run, submit_job,
    wait_for_job,
};

/// `examples/fact-check/<file>` served against a fresh facts service and mock LLM, with the
/// example's items run through it to the end; its results, and the service to ask.
fn run_example(file: &str) -> (Vec<Value>, usize, FactsService) {
    // An LLM call never gives up its instance (on a busy machine one could take longer than
    // the default 10 ms): each stage runs exactly twice, evicted once by its request.
    let (results, status, facts) =
        run_edited(file, |text| text + "\n[run]\nevict_after_ms = 60000\n");
    assert_eq!(status["succeeded"], results.len(), "{status} {results:?}");
    let items = results.len();
    (results, items, facts)
}

/// [`run_example`] with the pipeline file edited first; the job's status too, as it ended.
fn run_edited(file: &str, edit: impl Fn(String) -> String) -> (Vec<Value>, Value, FactsService) {
    let dir = tempfile::tempdir().unwrap();
    let facts = FactsService::start("fact-check-key-77");
    let mock = MockLlm::start(&[]);
    let root = repo_root().display().to_string();
    let example = repo_root().join("examples/fact-check");
    let text = std::fs::read_to_string(example.join(file))
        .unwrap()
        .replace("\"../../target/", &format!("\"{root}/target/"))
        .replace("http://127.0.0.1:9200", &facts.origin());
    let text = edit(text);
    let pipeline = dir.path().join(file);
    std::fs::write(&pipeline, text).unwrap();
    let mut command = std::process::Command::new(binary("stagehand"));
    command
        .args(["serve", &pipeline.display().to_string()])
        .args(["--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--llm-base-url", &mock.base_url()])
        .env("FACTS_API_KEY", &facts.key);
    let server = Server::start_command(command).unwrap();

    let items: Vec<Value> = std::fs::read_to_string(example.join("items.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let job = submit_job(&server, items, serde_json::json!({}));
    let status = wait_for_job(&server, &job);
    let results = job_results(&server, &job);
    (results, status, facts)
}

/// The result whose question mentions batteries: its `lookup` found the battery fact, and the
/// LLM's answer (the mock echoes the prompt) was written from it after one eviction.
fn battery(results: &[Value]) -> &Value {
    let battery = results
        .iter()
        .find(|r| {
            r["output"]["lookup"]["question"]
                .as_str()
                .unwrap()
                .contains("battery")
        })
        .unwrap();
    let lookup = &battery["output"]["lookup"];
    assert_eq!(lookup["facts"][0]["topic"], "battery", "{lookup}");
    assert!(
        lookup["answer"]
            .as_str()
            .unwrap()
            .contains("take them back"),
        "{lookup}"
    );
    assert_eq!(
        stage_run(battery, "lookup")["runs"],
        2,
        "waited without an instance"
    );
    battery
}

/// The key reached the service and nothing else.
fn key_used_and_kept(facts: &FactsService, results: &[Value]) {
    assert_eq!(
        facts.stats()["last_authorization"],
        format!("Bearer {}", facts.key)
    );
    let all = serde_json::to_string(results).unwrap();
    assert!(!all.contains(&facts.key), "no result holds the key");
}

#[test]
fn the_fact_check_example_answers_from_the_facts_service() {
    let (results, items, facts) = run_example("pipeline.toml");
    battery(&results);
    assert_eq!(
        facts.received("/facts"),
        items as u64,
        "one request per question"
    );
    key_used_and_kept(&facts, &results);
}

#[test]
fn a_javascript_and_a_python_stage_run_in_one_pipeline() {
    let (results, items, facts) = run_example("polyglot.toml");
    let battery = battery(&results);
    // The Python stage fetched the sources of what the JavaScript stage found.
    assert_eq!(
        battery["output"]["cite"]["citations"][0]["title"], "Recycling guide: battery",
        "{battery}"
    );
    assert_eq!(stage_run(battery, "cite")["runs"], 2);
    assert_eq!(facts.received("/facts"), items as u64);
    let with_facts = results
        .iter()
        .filter(|r| {
            !r["output"]["lookup"]["facts"]
                .as_array()
                .unwrap()
                .is_empty()
        })
        .count();
    assert_eq!(
        facts.received("/sources"),
        with_facts as u64,
        "one request per item with facts"
    );
    key_used_and_kept(&facts, &results);
}

#[test]
fn a_javascript_fetch_outside_the_grant_is_refused_and_never_sent() {
    // The JS stage may reach only another port; its secret stays bound to the service.
    let (results, status, facts) = run_edited("polyglot.toml", |text| {
        text.replacen(
            "allowed_hosts = [\"http://127.0.0.1:",
            "allowed_hosts = [\"http://127.0.0.1:1\", \"http://127.0.0.2:",
            1,
        )
    });
    assert_eq!(status["succeeded"], 0, "{status}");
    for result in &results {
        assert_eq!(result["error"]["stage"], "lookup", "{result}");
        let message = result["error"]["message"].as_str().unwrap();
        assert!(message.contains("outbound request failed"), "{message}");
    }
    assert_eq!(facts.received("/facts"), 0, "nothing reached the service");
}
