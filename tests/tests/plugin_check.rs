//! `stagehand plugin check`: what a plugin author sees before deploying a component.

use std::process::{Command, Output};

use stagehand_tests::{binary, plugin_bytes};

fn check(file: &std::path::Path) -> Output {
    let data = tempfile::tempdir().unwrap();
    Command::new(binary("stagehand"))
        .args(["plugin", "check"])
        .arg(file)
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .expect("stagehand runs")
}

#[test]
fn a_stage_and_a_handler_are_told_apart_with_their_imports_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("answer.wasm");
    std::fs::write(&stage, plugin_bytes("answer")).unwrap();
    let out = check(&stage);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("    stagehand:pipeline/llm@0.2.0\n"),
        "{text}"
    );
    assert!(text.contains("  exports\n    run\n"), "{text}");
    assert!(text.contains("world `stage`: ok"), "{text}");
    assert!(
        text.contains("world `handler`: no: does not implement world `handler` of stagehand:pipeline@0.2.0: missing export `handle` (it exports: run)"),
        "{text}"
    );

    let handler = dir.path().join("save_ownership.wasm");
    std::fs::write(&handler, plugin_bytes("save_ownership")).unwrap();
    let text = String::from_utf8_lossy(&check(&handler).stdout).into_owned();
    assert!(text.contains("world `handler`: ok"), "{text}");
    assert!(text.contains("world `stage`: no:"), "{text}");
}

#[test]
fn a_file_that_is_not_a_component_fails_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.wasm");
    std::fs::write(&file, "not wasm at all").unwrap();
    let out = check(&file);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a WebAssembly file"), "{stderr}");
}

fn stagehand(args: &[&str]) -> Output {
    Command::new(binary("stagehand"))
        .args(args)
        .output()
        .expect("stagehand runs")
}

/// `stagehand plugin new`: the crate it writes builds as it is into a component of the `stage`
/// world, which runs in a pipeline (LLM call, fatal error for a bad item included).
#[test]
fn a_new_stage_from_the_template_builds_checks_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().to_str().unwrap();
    let out = stagehand(&["plugin", "new", "short-summary", "--dir", parent]);
    assert!(out.status.success(), "{out:?}");
    let crate_dir = dir.path().join("short-summary");
    assert!(crate_dir.join("wit/pipeline.wit").is_file());

    // Refused: the same name again (nothing overwritten), and a name that is no crate name.
    let again = stagehand(&["plugin", "new", "short-summary", "--dir", parent]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = stagehand(&["plugin", "new", "Bad Name", "--dir", parent]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a usable name"));

    // Built the way its README says, into a target dir kept warm across runs.
    let target = stagehand_tests::repo_root().join("target/plugin-template");
    let build = Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&crate_dir)
        .output()
        .expect("cargo runs");
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let wasm = target.join("wasm32-wasip2/release/short_summary.wasm");
    let checked = check(&wasm);
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(text.contains("world `stage`: ok"), "{text}");

    // In a pipeline, with the mock as its LLM.
    let mock = stagehand_tests::MockLlm::start(&[]);
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "name = \"summaries\"\n[llm]\nbase_url = \"{}\"\nmodel = \"m\"\n\
             [[stage]]\nname = \"summary\"\ncomponent = \"{}\"\nmax_attempts = 1\n",
            mock.base_url(),
            wasm.display()
        ),
    )
    .unwrap();
    let items = dir.path().join("items.jsonl");
    std::fs::write(
        &items,
        "{\"text\": \"a long story\"}\n{\"text\": \"another one\"}\n{\"no_text\": 1}\n",
    )
    .unwrap();
    let results = dir.path().join("out.jsonl");
    let data = dir.path().join("data");
    let run = stagehand(&[
        "run",
        pipeline.to_str().unwrap(),
        items.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        results.to_str().unwrap(),
    ]);
    let results: Vec<serde_json::Value> = std::fs::read_to_string(&results)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 3, "{run:?}");
    assert_eq!(
        results[0]["output"]["summary"]["summary"],
        "Mock answer: Summarise in one line: a long story"
    );
    assert_eq!(results[1]["status"], "succeeded");
    assert_eq!(results[2]["status"], "failed");
    assert_eq!(results[2]["error"]["kind"], "fatal");
    assert!(
        results[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the item has no `text`")
    );
}

/// With `--pipeline`, the hosts a component could need (the origins in its code and in its
/// stage's settings) are set against what the pipeline grants it.
#[test]
fn outbound_http_needs_are_set_against_the_pipelines_grant() {
    let dir = tempfile::tempdir().unwrap();
    let root = stagehand_tests::repo_root();
    let wasm = stagehand_tests::plugin_path("lookup");
    let example = std::fs::read_to_string(root.join("examples/fact-check/pipeline.toml"))
        .unwrap()
        .replace(
            "\"../../target/wasm32-wasip2/release/lookup.wasm\"",
            &format!("\"{}\"", wasm.display()),
        );
    let run = |text: &str| {
        let pipeline = dir.path().join("pipeline.toml");
        std::fs::write(&pipeline, text).unwrap();
        let out = Command::new(binary("stagehand"))
            .args(["plugin", "check"])
            .arg(&wasm)
            .arg("--pipeline")
            .arg(&pipeline)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&example);
    assert!(
        text.contains("imports wasi:http/outgoing-handler"),
        "{text}"
    );
    assert!(
        text.contains("may need http://127.0.0.1:9200 (in its settings): granted"),
        "{text}"
    );
    assert!(
        text.contains("`lookup` is granted: http://127.0.0.1:9200"),
        "{text}"
    );

    let narrower = example.replace(
        "allowed_hosts = [\"http://127.0.0.1:9200\"]",
        "allowed_hosts = [\"https://api.example.com\"]",
    );
    let text = run(&narrower);
    assert!(
        text.contains("may need http://127.0.0.1:9200 (in its settings): NOT granted"),
        "{text}"
    );
    assert!(
        text.contains("`lookup` is granted: https://api.example.com:443"),
        "{text}"
    );

    // A component without the import says so.
    let plain = Command::new(binary("stagehand"))
        .args(["plugin", "check"])
        .arg(stagehand_tests::plugin_path("save_ownership"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(
        text.contains("does not import wasi:http/outgoing-handler"),
        "{text}"
    );
}
