//! Stage settings (`[stage.config]`, the `config` import): a stage reads its own settings, a
//! missing one is an error it handles, a deploy changes them, and each result records the
//! digest of the settings its stage ran with. Settings past their limits are refused when the
//! pipeline file is read.

use std::path::Path;

use reqwest::StatusCode;
use serde_json::{Value, json};
use stagehand_tests::backends::Backend;
use stagehand_tests::bundles::{Files, tar};
use stagehand_tests::{
    Server, binary, client, job_results, on_both_backends, plugin_bytes, serve, stage_run,
    submit_job, wait_for_job,
};

on_both_backends!(a_stage_reads_its_settings_and_a_deploy_changes_them);

const ADMIN: &str = "settings-admin-token";

/// A pipeline of one hostile stage with `settings` as its `[stage.config]` table.
fn pipeline_text(settings: &str) -> String {
    format!(
        r#"name = "settings"
[llm]
base_url = "http://127.0.0.1:9/v1"
model = "mock"

[[stage]]
name = "hostile"
component = "c/hostile.wasm"
max_attempts = 1

[stage.config]
{settings}
"#
    )
}

fn bundle(settings: &str) -> Files {
    let mut files = Files::new();
    files.insert("c/hostile.wasm".into(), plugin_bytes("hostile"));
    files.insert("pipeline.toml".into(), pipeline_text(settings).into_bytes());
    files
}

fn write_bundle(dir: &Path, files: &Files) {
    for (path, bytes) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// What the stage read for setting `name`: its output and its run's settings digest.
fn read_setting(server: &Server, name: &str) -> (Value, String) {
    let job = submit_job(
        server,
        vec![json!({"do": "config", "target": name})],
        json!({}),
    );
    let status = wait_for_job(server, &job);
    assert_eq!(status["succeeded"], 1, "{status}");
    let result = &job_results(server, &job)[0];
    let digest = stage_run(result, "hostile")["config_digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (result["output"]["hostile"].clone(), digest)
}

fn a_stage_reads_its_settings_and_a_deploy_changes_them(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    write_bundle(
        &files,
        &bundle("model = \"small\"\nprompt = \"Say {x} in \\\"one\\\" word\""),
    );
    let server = serve(
        &files.join("pipeline.toml"),
        &dir.path().join("data"),
        None,
        &backend.flags(&["--admin-token", ADMIN]),
    );

    let (output, first) = read_setting(&server, "prompt");
    assert_eq!(output["value"], "Say {x} in \"one\" word");
    assert_eq!(
        output["all"],
        json!([["model", "small"], ["prompt", "Say {x} in \"one\" word"]])
    );
    assert_eq!(first.len(), 64, "a sha256 in hex: {first}");
    let (missing, again) = read_setting(&server, "absent");
    assert_eq!(
        missing["value"], "no setting `absent`",
        "the guest handles it"
    );
    assert_eq!(again, first, "the same settings, the same digest");

    let response = client()
        .put(server.url("/v1/pipelines/settings"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/x-tar")
        .body(tar(&bundle("model = \"large\"")))
        .send()
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{}",
        response.text().unwrap()
    );
    let (output, deployed) = read_setting(&server, "model");
    assert_eq!(output["value"], "large");
    assert_eq!(output["all"], json!([["model", "large"]]));
    assert_eq!(deployed.len(), 64);
    assert_ne!(deployed, first, "new settings, a new digest");
}

/// `stagehand run` with `settings` as the stage's table: whether it started, and its stderr.
fn run_with(settings: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), &bundle(settings));
    let items = dir.path().join("items.jsonl");
    std::fs::write(&items, "{\"do\": \"config\", \"target\": \"a\"}\n").unwrap();
    let out = std::process::Command::new(binary("stagehand"))
        .arg("run")
        .arg(dir.path().join("pipeline.toml"))
        .arg(&items)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn settings_past_their_limits_are_refused_with_the_limit_named() {
    let (ok, _) = run_with("a = \"fine\"");
    assert!(ok, "a pipeline within the limits runs");

    let long_value = format!("a = \"{}\"", "v".repeat(65_537));
    let (ok, stderr) = run_with(&long_value);
    assert!(!ok);
    assert!(
        stderr.contains("setting `a` is 65537 bytes; at most 65536"),
        "{stderr}"
    );

    let long_name = format!("{} = \"v\"", "n".repeat(129));
    let (ok, stderr) = run_with(&long_name);
    assert!(!ok);
    assert!(stderr.contains("1 to 128 bytes"), "{stderr}");

    let many: String = (0..257).map(|i| format!("s{i} = \"v\"\n")).collect();
    let (ok, stderr) = run_with(&many);
    assert!(!ok);
    assert!(stderr.contains("has 257 settings; at most 256"), "{stderr}");

    let big: String = (0..5)
        .map(|i| format!("s{i} = \"{}\"\n", "v".repeat(60_000)))
        .collect();
    let (ok, stderr) = run_with(&big);
    assert!(!ok);
    assert!(stderr.contains("over 262144 bytes in all"), "{stderr}");

    let (ok, stderr) = run_with("threshold = 0.8");
    assert!(!ok);
    assert!(stderr.contains("expected a string"), "{stderr}");
}
