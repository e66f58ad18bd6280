//! The eco-scan example end to end: `stagehand run` (the real binary) over the real compiled
//! plugins, with the mock LLM answering over HTTP from its own process.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use base64::Engine;
use serde_json::Value;
use stagehand_tests::{MockLlm, binary, inspect, repo_root};
use uuid::Uuid;

fn example(file: &str) -> String {
    repo_root()
        .join("examples/eco-scan")
        .join(file)
        .display()
        .to_string()
}

/// `stagehand <args>` with a data dir and the mock's URL.
fn stagehand(data: &Path, mock: &MockLlm, args: &[&str]) -> Output {
    Command::new(binary("stagehand"))
        .args(args)
        .args([
            "--data-dir",
            &data.display().to_string(),
            "--llm-base-url",
            &mock.base_url(),
        ])
        .output()
        .expect("stagehand runs")
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What each photo in items.jsonl shows, independent of the mock's own table.
const EXPECTED: &[(&str, &str)] = &[
    ("pet_bottle", "recyclable/plastic/pet_bottle"),
    ("yogurt_container", "recyclable/plastic/other_plastic"),
    ("milk_carton", "recyclable/paper/paper_pack"),
    ("newspaper_bundle", "recyclable/paper/paper"),
    ("cardboard_box", "recyclable/paper/paper"),
    ("soda_can", "recyclable/metal/can"),
    ("glass_bottle", "recyclable/glass/glass_bottle"),
    ("soju_bottle", "recyclable/glass/glass_bottle"),
    ("vinyl_bag", "recyclable/vinyl/vinyl"),
    ("snack_wrapper", "recyclable/vinyl/vinyl"),
    ("styrofoam_tray", "recyclable/styrofoam/styrofoam"),
    ("banana_peel", "food_waste/food/food_waste"),
    ("leftover_rice", "food_waste/food/food_waste"),
    ("aa_battery", "hazardous/battery/battery"),
    ("fluorescent_lamp", "hazardous/lighting/fluorescent_lamp"),
    ("used_tissue", "general_waste/general/general_waste"),
    ("receipt", "general_waste/general/general_waste"),
];

fn expected_category(item: &Value) -> &'static str {
    let name = match (item["image_url"].as_str(), item["image_base64"].as_str()) {
        (Some(url), _) => url.rsplit('/').next().unwrap().to_string(),
        (None, Some(data)) => String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap(),
        )
        .unwrap()
        .replace(' ', "_"),
        _ => panic!("item without an image: {item}"),
    };
    EXPECTED
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .unwrap_or_else(|| panic!("no expectation for {name}"))
        .1
}

fn ownership_key(user: &str, character: &str) -> String {
    Uuid::new_v5(
        &Uuid::NAMESPACE_DNS,
        format!("ownership:{user}:{character}").as_bytes(),
    )
    .to_string()
}

#[test]
fn the_example_batch_runs_end_to_end() {
    // As strict as llama.cpp's server: text-only content must be a string.
    let mock = MockLlm::start(&["--string-content"]);
    let data = tempfile::tempdir().unwrap();
    let out = data.path().join("results.jsonl");
    let run = stagehand(
        data.path(),
        &mock,
        &[
            "run",
            &example("pipeline.toml"),
            &example("items.jsonl"),
            "--out",
            &out.display().to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );

    let items: Vec<Value> = read_jsonl(Path::new(&example("items.jsonl")));
    let rules: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(example("disposal_rules.json")).unwrap())
            .unwrap();
    let characters: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(example("characters.json")).unwrap())
            .unwrap();
    let results = read_jsonl(&out);
    assert_eq!(results.len(), items.len(), "one result per item");
    assert!(
        stdout.starts_with(&format!(
            "{0} succeeded, 0 failed of {0} items",
            items.len()
        )),
        "{stdout}"
    );

    let mut accepted: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for (index, (item, result)) in items.iter().zip(&results).enumerate() {
        assert_eq!(result["index"], index as u64);
        assert_eq!(result["status"], "succeeded", "{result}");
        let output = &result["output"];
        let category = expected_category(item);
        let c = &output["vision"]["category"];
        assert_eq!(
            format!(
                "{}/{}/{}",
                c["major"].as_str().unwrap(),
                c["middle"].as_str().unwrap(),
                c["minor"].as_str().unwrap()
            ),
            category
        );

        let rule = &rules[category];
        assert_eq!(output["rule"]["rule_key"], category);
        assert_eq!(&output["rule"]["rule"], rule);
        assert_eq!(
            output["answer"]["steps"], rule["steps"],
            "the answer's steps come from the rule"
        );
        let answer = output["answer"]["answer"].as_str().unwrap();
        assert!(answer.contains(rule["label"].as_str().unwrap()), "{answer}");

        let parts: Vec<&str> = category.split('/').collect();
        let character = [
            category.to_string(),
            format!("{}/{}", parts[0], parts[1]),
            parts[0].to_string(),
        ]
        .iter()
        .find_map(|k| characters.get(k))
        .cloned()
        .unwrap_or(Value::Null);
        let reward = &output["reward"];
        assert_eq!(reward["character"], character, "item {index}");
        if character.is_null() {
            assert_eq!(reward["effects"], serde_json::json!([]));
            continue;
        }
        let key = ownership_key(
            item["user_id"].as_str().unwrap(),
            character["id"].as_str().unwrap(),
        );
        assert_eq!(reward["ownership_id"], key.as_str());
        let effects = reward["effects"].as_array().unwrap();
        assert_eq!(
            effects
                .iter()
                .map(|e| e["handler"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["save-ownership", "save-character"]
        );
        for effect in effects {
            assert_eq!(effect["key"], key.as_str());
            let slot = accepted
                .entry((effect["handler"].as_str().unwrap().into(), key.clone()))
                .or_default();
            if effect["outcome"] == "accepted" {
                *slot += 1;
            } else {
                assert_eq!(effect["outcome"], "duplicate");
            }
        }
        keys.insert(key);
        // Every stage ran once, and the result names the version that ran.
        let stages: Vec<&str> = result["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        assert_eq!(stages, ["vision", "rule", "answer", "reward"]);
        assert!(
            result["stages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["digest"].as_str().unwrap().len() == 64)
        );
    }
    // Each (handler, key) was accepted exactly once, even for the scans repeated in items.jsonl.
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    assert_eq!(accepted.len(), keys.len() * 2);
    assert!(
        keys.len() < results.len(),
        "items.jsonl repeats some scans, whose effects must be duplicates"
    );

    // The effects ran, once each, and the handlers' records are there.
    let effects = inspect(data.path(), &["effects"]);
    assert_eq!(effects.len(), keys.len() * 2);
    assert!(effects.iter().all(|e| e["state"] == "done"), "{effects:?}");
    let ownership = inspect(data.path(), &["records", "ownership"]);
    assert_eq!(
        ownership
            .iter()
            .map(|r| r["key"].as_str().unwrap().to_string())
            .collect::<BTreeSet<_>>(),
        keys
    );
    assert_eq!(mock.stats()["vision"], items.len() as u64);
    assert_eq!(mock.stats()["bad_requests"], 0, "{}", mock.stats());
}

#[test]
fn failed_items_fail_alone_and_set_the_exit_status() {
    let mock = MockLlm::start(&[]);
    let (run, results) = run_items(
        &mock,
        |_| example("pipeline.toml"),
        &[
            r#"{"user_id": "u1", "image_url": "https://images.example/alien_artifact.jpg"}"#,
            r#"{"user_id": "u2"}"#,
            r#"{"user_id": "u3", "image_url": "https://images.example/soda_can.jpg"}"#,
        ],
    );
    assert_eq!(
        run.status.code(),
        Some(3),
        "exit 3 when items failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let error = |i: usize| {
        (
            results[i]["error"]["stage"].as_str().unwrap(),
            results[i]["error"]["kind"].as_str().unwrap(),
            results[i]["error"]["message"].as_str().unwrap(),
        )
    };
    assert_eq!(
        error(0),
        (
            "rule",
            "fatal",
            "stage `rule`: the guest returned a fatal error: unknown category `general_waste/mystery/alien_artifact`: no disposal rule for it"
        )
    );
    assert_eq!(
        error(1),
        (
            "vision",
            "fatal",
            "stage `vision`: the guest returned a fatal error: the item has neither `image_url` nor `image_base64`"
        )
    );
    assert_eq!(results[2]["status"], "succeeded");
    assert!(String::from_utf8_lossy(&run.stdout).starts_with("1 succeeded, 2 failed of 3 items"));
}

#[test]
fn an_llm_outage_is_retried_then_fails_the_item_as_retryable() {
    let mock = MockLlm::start(&["--rate-500", "1.0"]);
    let error = single_item_error(&mock, |_| example("pipeline.toml"));
    assert_retryable_vision_error(&error, "LLM unavailable: 500 Internal Server Error");
    // Three tries (the default `max_attempts`), each recorded, half a second and then a
    // second apart at least (exponential back-off, half of it jitter).
    let times = attempt_times(&error, 3);
    assert!(
        times[1] - times[0] >= 250 && times[2] - times[1] >= 500,
        "{times:?}"
    );
    assert_eq!(mock.stats()["requests"], 3);
}

/// The `at` of each of the `n` attempts an error records.
fn attempt_times(error: &Value, n: usize) -> Vec<u64> {
    let attempts = error["attempts"].as_array().expect("attempts are recorded");
    assert_eq!(attempts.len(), n, "{error}");
    for (i, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt["attempt"], i as u64 + 1, "{error}");
        assert_eq!(attempt["kind"], "retryable", "{error}");
    }
    attempts.iter().map(|a| a["at"].as_u64().unwrap()).collect()
}

#[test]
fn a_broken_pipeline_file_is_reported_with_its_line() {
    let mock = MockLlm::start(&[]);
    let data = tempfile::tempdir().unwrap();
    let pipeline = data.path().join("pipeline.toml");
    let text = "name = \"broken\"\n[llm]\nbase_url = \"http://x/v1\"\nmodel = \"m\"\n\n[[stage]]\nname = \"vision\"\ncpu_ms = \"fast\"\n";
    std::fs::write(&pipeline, text).unwrap();
    let run = stagehand(
        data.path(),
        &mock,
        &[
            "run",
            &pipeline.display().to_string(),
            &example("items.jsonl"),
        ],
    );
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("TOML parse error at line 8")
            && stderr.contains("invalid type: string \"fast\""),
        "{stderr}"
    );
}

/// The example pipeline with absolute paths and `[llm] timeout_ms` set, in `dir`.
fn pipeline_with_llm_timeout(dir: &Path, timeout_ms: u64) -> String {
    let root = repo_root().display().to_string();
    let text = std::fs::read_to_string(example("pipeline.toml"))
        .unwrap()
        .replace("\"../../target/", &format!("\"{root}/target/"))
        .replace("file = \"", &format!("file = \"{root}/examples/eco-scan/"))
        .replace("timeout_ms = 60000", &format!("timeout_ms = {timeout_ms}"));
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Run `lines` as items through the pipeline file that `pipeline` writes (or names) for a
/// fresh data dir: the finished process and the results it wrote.
fn run_items(
    mock: &MockLlm,
    pipeline: impl FnOnce(&Path) -> String,
    lines: &[&str],
) -> (Output, Vec<Value>) {
    let data = tempfile::tempdir().unwrap();
    let items = data.path().join("items.jsonl");
    std::fs::write(&items, lines.join("\n")).unwrap();
    let out = data.path().join("results.jsonl");
    let pipeline = pipeline(data.path());
    let run = stagehand(
        data.path(),
        mock,
        &[
            "run",
            &pipeline,
            &items.display().to_string(),
            "--out",
            &out.display().to_string(),
        ],
    );
    let results = if out.is_file() {
        read_jsonl(&out)
    } else {
        Vec::new()
    };
    (run, results)
}

/// `error` must be a retryable failure of the vision stage whose message contains `text`.
fn assert_retryable_vision_error(error: &Value, text: &str) {
    assert_eq!(
        (error["stage"].as_str(), error["kind"].as_str()),
        (Some("vision"), Some("retryable")),
        "{error}"
    );
    assert!(error["message"].as_str().unwrap().contains(text), "{error}");
}

/// One pet bottle through the pipeline, which must fail: its error.
fn single_item_error(mock: &MockLlm, pipeline: impl FnOnce(&Path) -> String) -> Value {
    let item = r#"{"user_id": "u1", "image_url": "https://images.example/pet_bottle.jpg"}"#;
    let (run, results) = run_items(mock, pipeline, &[item]);
    assert_eq!(
        run.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    results[0]["error"].clone()
}

#[test]
fn a_rate_limit_is_retried_after_the_providers_retry_after() {
    let mock = MockLlm::start(&["--rate-429", "1.0", "--retry-after-s", "2"]);
    let error = single_item_error(&mock, |_| example("pipeline.toml"));
    assert_retryable_vision_error(&error, "LLM rate limited; retry after 2000 ms");
    // The back-off alone would be 0.25-0.5 s, then 0.5-1 s: the provider's 2 s wins.
    let times = attempt_times(&error, 3);
    assert!(
        times[1] - times[0] >= 1900 && times[2] - times[1] >= 1900,
        "{times:?}"
    );
    assert_eq!(mock.stats()["rate_limited"], 3);
}

#[test]
fn a_provider_that_never_answers_times_out_as_retryable() {
    let mock = MockLlm::start(&["--rate-hang", "1.0"]);
    let error = single_item_error(&mock, |dir| pipeline_with_llm_timeout(dir, 500));
    assert_retryable_vision_error(&error, "LLM unavailable: request timed out");
    attempt_times(&error, 3);
}

/// Ctrl-C (SIGINT) while items wait on the LLM: the run stops at once, the interrupted items
/// are `cancelled` in the results file, the rest not run, and the exit status is 3.
#[test]
fn ctrl_c_cancels_the_run_and_exits_3() {
    let mock = MockLlm::start(&["--rate-hang", "1.0"]);
    let data = tempfile::tempdir().unwrap();
    let out = data.path().join("results.jsonl");
    let items = data.path().join("items.jsonl");
    let lines: Vec<String> = stagehand_tests::eco_items(6)
        .iter()
        .map(Value::to_string)
        .collect();
    std::fs::write(&items, lines.join("\n")).unwrap();
    let child = Command::new(binary("stagehand"))
        .args(["run", &example("pipeline.toml")])
        .arg(&items)
        .args(["--concurrency", "2", "--out"])
        .arg(&out)
        .args([
            "--data-dir",
            &data.path().join("store").display().to_string(),
        ])
        .args(["--llm-base-url", &mock.base_url()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while mock.stats()["in_flight"].as_u64().unwrap() < 2 {
        assert!(std::time::Instant::now() < deadline, "the run never asked");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let interrupt = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cancelling"), "{stderr}");
    let results = read_jsonl(&out);
    assert_eq!(results.len(), 2, "{results:?}");
    for result in &results {
        assert_eq!(result["error"]["kind"], "cancelled", "{result}");
    }
    assert_eq!(mock.stats()["in_flight"], 0, "the requests were dropped");
}
