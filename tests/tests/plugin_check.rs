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
        text.contains("    stagehand:pipeline/llm@0.1.0\n"),
        "{text}"
    );
    assert!(text.contains("  exports\n    run\n"), "{text}");
    assert!(text.contains("world `stage`: ok"), "{text}");
    assert!(
        text.contains("world `handler`: no: does not implement world `handler` of stagehand:pipeline@0.1.0: missing export `handle` (it exports: run)"),
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
