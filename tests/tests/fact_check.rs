//! The fact-check example end to end over HTTP: its stage looks each question up in the facts
//! service (outbound HTTP to the one host its pipeline file grants, the service's API key held
//! by the host as a secret), and the LLM answers from what it found. The key is used and never
//! seen: the service got it, no result holds it.

use serde_json::Value;
use stagehand_tests::{
    FactsService, MockLlm, Server, binary, job_results, repo_root, stage_run, submit_job,
    wait_for_job,
};

#[test]
fn the_fact_check_example_answers_from_the_facts_service() {
    let dir = tempfile::tempdir().unwrap();
    let facts = FactsService::start("fact-check-key-77");
    let mock = MockLlm::start(&[]);
    let root = repo_root().display().to_string();
    let example = repo_root().join("examples/fact-check");
    let text = std::fs::read_to_string(example.join("pipeline.toml"))
        .unwrap()
        .replace("\"../../target/", &format!("\"{root}/target/"))
        .replace("http://127.0.0.1:9200", &facts.origin());
    let pipeline = dir.path().join("pipeline.toml");
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
    let job = submit_job(&server, items.clone(), serde_json::json!({}));
    let status = wait_for_job(&server, &job);
    assert_eq!(status["succeeded"], items.len(), "{status}");
    let results = job_results(&server, &job);
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
    // The mock LLM echoes the prompt: the facts went into it.
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
    assert_eq!(
        facts.received("/facts"),
        items.len() as u64,
        "one request per question"
    );
    assert_eq!(
        facts.stats()["last_authorization"],
        format!("Bearer {}", facts.key)
    );
    let all = serde_json::to_string(&results).unwrap();
    assert!(!all.contains(&facts.key), "no result holds the key");
}
