//! LLM providers as real servers differ: answers cut at `max_tokens`, answers without usage,
//! models a server does not have, several providers with failover, several keys in turn. The
//! mock plays each server over HTTP; the host is a real `stagehand serve`.

use std::path::{Path, PathBuf};

use serde_json::json;
use stagehand_tests::{
    MockLlm, Server, client, eco_items, eco_scan_pipeline, job_results, repo_root,
    serve_with_env as serve, stage_run, submit_job, wait_for_job,
};

/// The eco-scan pipeline in `dir` with its `[llm]` table replaced by `llm` (which may add
/// `[providers.*]` tables), and `edit` applied to the rest.
fn pipeline_with(dir: &Path, llm: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    eco_scan_pipeline(dir, |text| {
        let (start, end) = (text.find("[llm]").unwrap(), text.find("[run]").unwrap());
        edit(format!("{}{llm}\n{}", &text[..start], &text[end..]))
    })
}

fn provider(name: &str, mock: &MockLlm, extra: &str) -> String {
    format!(
        "[providers.{name}]\nbase_url = \"{}\"\nmodel = \"gpt-4o-mini\"\n{extra}\n",
        mock.base_url()
    )
}

fn metrics(server: &Server) -> String {
    client()
        .get(server.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

#[test]
fn an_answer_cut_at_max_tokens_fails_as_length_and_is_not_retried() {
    // Vision's answers fit in 30 tokens; answer's JSON does not.
    let mock = MockLlm::start(&["--max-completion-tokens", "30"]);
    let data = tempfile::tempdir().unwrap();
    let server = stagehand_tests::serve_eco_scan(&mock, data.path(), &[]);
    let job = submit_job(&server, eco_items(2), json!({}));
    assert_eq!(wait_for_job(&server, &job)["failed"], 2);
    for result in job_results(&server, &job) {
        let error = &result["error"];
        assert_eq!(error["stage"], "answer", "{result}");
        assert_eq!(error["kind"], "length", "{result}");
        assert_eq!(error["retryable"], false, "{result}");
        assert_eq!(error["attempts"].as_array().unwrap().len(), 1, "{result}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("cut short at max_tokens"), "{message}");
        assert!(
            message.contains("the request's max_tokens: 400"),
            "{message}"
        );
        let calls = &error["attempts"][0]["llm"];
        assert_eq!(calls[0]["finish_reason"], "length", "{result}");
    }
    let stats = mock.stats();
    assert_eq!(stats["answer"], 2, "each cut answer was asked for once");
    assert_eq!(stats["cut"], 2);
}

#[test]
fn usage_is_estimated_and_marked_when_the_provider_reports_none() {
    let mock = MockLlm::start(&["--no-usage"]);
    let data = tempfile::tempdir().unwrap();
    let server = stagehand_tests::serve_eco_scan(&mock, data.path(), &[]);
    let job = submit_job(&server, eco_items(3), json!({}));
    assert_eq!(wait_for_job(&server, &job)["succeeded"], 3);
    for result in job_results(&server, &job) {
        // The answer stage streams; vision does not: both are estimated.
        let answer = &result["output"]["answer"];
        assert_eq!(answer["tokens_estimated"], true, "{result}");
        assert!(answer["tokens"].as_u64().unwrap() > 20, "{result}");
        for stage in ["vision", "answer"] {
            let call = &stage_run(&result, stage)["llm"][0];
            assert_eq!(call["usage_estimated"], true, "{result}");
            assert!(call["completion_tokens"].as_u64().unwrap() > 0, "{result}");
            assert!(call["prompt_tokens"].as_u64().unwrap() > 0, "{result}");
        }
    }
    let status = stagehand_tests::job_status(&server, &job);
    assert!(status["llm_tokens"].as_u64().unwrap() > 0, "{status}");
    let metrics = metrics(&server);
    assert!(
        metrics.lines().any(
            |l| l.starts_with("stagehand_llm_tokens_total") && l.contains("estimated=\"true\"")
        ),
        "{metrics}"
    );
}

#[test]
fn a_model_the_provider_lacks_is_rejected_once_with_its_cause_and_the_model_map_fixes_it() {
    let mock = MockLlm::start(&["--models", "mock-small"]);
    let data = tempfile::tempdir().unwrap();
    let server = stagehand_tests::serve_eco_scan(&mock, data.path(), &[]);
    let job = submit_job(&server, eco_items(1), json!({}));
    assert_eq!(wait_for_job(&server, &job)["failed"], 1);
    let error = &job_results(&server, &job)[0]["error"];
    assert_eq!(error["kind"], "fatal", "{error}");
    assert_eq!(error["attempts"].as_array().unwrap().len(), 1, "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("404 Not Found: The model `gpt-4o-mini` does not exist"),
        "the cause comes first: {message}"
    );
    drop(server);

    // prompt-eval's cases may name a model: the provider's map renames it.
    let dir = tempfile::tempdir().unwrap();
    let root = repo_root().display().to_string();
    let text = std::fs::read_to_string(repo_root().join("examples/prompt-eval/pipeline.toml"))
        .unwrap()
        .replace("\"../../target/", &format!("\"{root}/target/"))
        .replace(
            "model = \"gpt-4o-mini\"",
            &format!(
                "model = \"mock-small\"\nmodel_map = {{ \"gpt-4o\" = \"mock-small\" }}\nbase_url = \"{}\"",
                mock.base_url()
            ),
        )
        .replace("base_url = \"http://127.0.0.1:8090/v1\"\n", "");
    let path = dir.path().join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    let server = serve(&path, dir.path(), &[]);
    let case = json!({ "id": "c", "prompt": "Say hi", "expected": "hi", "match": "contains",
        "model": "gpt-4o" });
    let job = submit_job(&server, vec![case], json!({}));
    assert_eq!(wait_for_job(&server, &job)["succeeded"], 1);
    let result = &job_results(&server, &job)[0];
    assert_eq!(
        result["output"]["generate"]["model"], "mock-small",
        "{result}"
    );
    assert_eq!(
        stage_run(result, "generate")["llm"][0]["model"],
        "mock-small"
    );
}

#[test]
fn a_stage_fails_over_to_its_next_provider_and_the_choice_is_recorded() {
    let flaky = MockLlm::start(&["--rate-500", "1.0"]);
    let steady = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let llm = format!(
        "[llm]\nproviders = [\"flaky\", \"steady\"]\n{}{}",
        provider("flaky", &flaky, ""),
        provider("steady", &steady, "")
    );
    // The answer stage goes to `steady` alone; vision takes the default route.
    let pipeline = pipeline_with(data.path(), &llm, |text| {
        text.replace(
            "name = \"answer\"\n",
            "name = \"answer\"\nproviders = [\"steady\"]\n",
        )
    });
    let server = serve(&pipeline, data.path(), &[]);
    let job = submit_job(&server, eco_items(3), json!({}));
    assert_eq!(wait_for_job(&server, &job)["succeeded"], 3);
    for result in job_results(&server, &job) {
        let vision = &stage_run(&result, "vision")["llm"];
        assert_eq!(vision[0]["provider"], "flaky", "{result}");
        assert_eq!(vision[0]["outcome"], "unavailable", "{result}");
        assert_eq!(vision[1]["provider"], "steady", "{result}");
        assert_eq!(vision[1]["outcome"], "ok", "{result}");
        assert_eq!(stage_run(&result, "vision")["attempt"], 1, "{result}");
        let answer = &stage_run(&result, "answer")["llm"];
        assert_eq!(answer.as_array().unwrap().len(), 1, "{result}");
        assert_eq!(result["output"]["answer"]["provider"], "steady", "{result}");
    }
    assert_eq!(
        flaky.stats()["requests"],
        3,
        "only vision calls go to flaky"
    );
    assert_eq!(steady.stats()["requests"], 6);
    let metrics = metrics(&server);
    assert!(
        metrics.contains("stagehand_llm_failovers_total{provider=\"flaky\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("stagehand_llm_requests_total")
                && l.contains("provider=\"flaky\"")
                && l.contains("outcome=\"unavailable\"")),
        "{metrics}"
    );
}

#[test]
fn keys_are_used_in_turn_and_a_key_past_its_quota_is_passed_over() {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let keys = "keys = [{ env = \"SH_TEST_KEY_ONE\" }, { env = \"SH_TEST_KEY_TWO\", requests_per_minute = 6000 }]";
    let llm = provider("hosted", &mock, keys);
    let pipeline = pipeline_with(data.path(), &llm, |text| text);
    let server = serve(
        &pipeline,
        data.path(),
        &[("SH_TEST_KEY_ONE", "sk-one"), ("SH_TEST_KEY_TWO", "sk-two")],
    );
    let count = |key: &str| mock.stats()["keys"][key].as_u64().unwrap_or(0);

    // One item at a time: eight calls alternate between the keys.
    let job = submit_job(&server, eco_items(4), json!({ "concurrency": 1 }));
    assert_eq!(wait_for_job(&server, &job)["succeeded"], 4);
    assert_eq!((count("sk-one"), count("sk-two")), (4, 4));
    assert_eq!(count("-"), 0, "every request carries a key");

    // The second key's quota runs out: its 429 pauses it, and the first key carries on.
    let response = client()
        .post(format!("http://{}/admin/config", mock.address))
        .json(&json!({ "limited_keys": ["sk-two"] }))
        .send()
        .unwrap();
    assert!(response.status().is_success());
    let job = submit_job(&server, eco_items(6), json!({ "concurrency": 1 }));
    assert_eq!(wait_for_job(&server, &job)["succeeded"], 6);
    let (one, two) = (count("sk-one") - 4, count("sk-two") - 4);
    assert!(one >= 12, "the first key answered every call: {one}");
    assert!(
        two <= 3,
        "the paused key is passed over, not tried at every call: {two}"
    );
}
