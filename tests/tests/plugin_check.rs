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

    // A Python or JavaScript component carries its interpreter, whose own strings (the
    // standard library's documentation URLs) are not taken for hosts it needs.
    let polyglot = std::fs::read_to_string(root.join("examples/fact-check/polyglot.toml"))
        .unwrap()
        .replace("\"../../target/", &format!("\"{}/target/", root.display()));
    let polyglot_file = dir.path().join("polyglot.toml");
    std::fs::write(&polyglot_file, polyglot).unwrap();
    for (plugin, stage, language) in [
        ("cite_py", "cite", "Python"),
        ("lookup_js", "lookup", "JavaScript"),
    ] {
        let out = Command::new(binary("stagehand"))
            .args(["plugin", "check"])
            .arg(stagehand_tests::plugin_path(plugin))
            .arg("--pipeline")
            .arg(&polyglot_file)
            .args(["--stage", stage, "--data-dir"])
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains(&format!(
                "its code is not scanned for hosts: a {language} component"
            )),
            "{text}"
        );
        assert!(text.contains("(in its settings): granted"), "{text}");
        assert!(!text.contains("NOT granted"), "{text}");
    }

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
