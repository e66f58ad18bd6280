//! A stage written in Python (plugins/python/rule, built with componentize-py by `cargo xtask
//! plugins`) runs in the eco-scan pipeline in place of the Rust `rule` stage, over real HTTP:
//! it reads the envelope, calls the host's `kv` and `log`, and fails an item with a fatal
//! `stage-error` exactly as the Rust stage does.

use serde_json::{Value, json};
use stagehand_tests::{
    MockLlm, eco_items, eco_scan_pipeline, job_results, repo_root, submit_job, wait_for_job,
};

#[test]
fn a_python_rule_stage_runs_in_the_eco_scan_pipeline() {
    let mock = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = eco_scan_pipeline(dir.path(), |text| {
        text.replace("release/rule.wasm\"", "release/rule_py.wasm\"")
    });
    assert!(
        std::fs::read_to_string(&pipeline)
            .unwrap()
            .contains("rule_py.wasm")
    );
    let server = stagehand_tests::serve(&pipeline, &dir.path().join("data"), Some(&mock), &[]);

    let mut items = eco_items(12);
    items.push(json!({ "user_id": "u1", "image_url": "https://images.example/alien_thing.jpg" }));
    let job = submit_job(&server, items, json!({}));
    wait_for_job(&server, &job);
    let results = job_results(&server, &job);
    let rules: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("examples/eco-scan/disposal_rules.json"))
            .unwrap(),
    )
    .unwrap();

    for result in &results[..12] {
        assert_eq!(result["status"], "succeeded", "{result}");
        // The Python stage's output is the Rust stage's: the rule under the vision category.
        let rule = &result["output"]["rule"];
        let key = rule["rule_key"].as_str().unwrap();
        let category = &result["output"]["vision"]["category"];
        assert_eq!(
            key,
            format!(
                "{}/{}/{}",
                category["major"].as_str().unwrap(),
                category["middle"].as_str().unwrap(),
                category["minor"].as_str().unwrap()
            )
        );
        assert_eq!(rule["rule"], rules[key], "{result}");
        // ... and the later Rust stages read it.
        assert!(result["output"]["answer"]["answer"].is_string());
    }
    let alien = &results[12];
    assert_eq!(alien["status"], "failed");
    assert_eq!(alien["error"]["stage"], "rule");
    assert_eq!(alien["error"]["kind"], "fatal");
    let message = alien["error"]["message"].as_str().unwrap();
    assert!(message.contains("unknown category"), "{message}");
}
