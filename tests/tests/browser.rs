//! A real browser follows a job: headless Chromium (Debian's `chromium`, which `cargo xtask
//! test` installs) loads the server's watch page, whose `EventSource` follows the job live to
//! its end. A screenshot is kept in `target/test-artifacts/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use stagehand_tests::{MockLlm, Server, binary, repo_root};

fn chromium() -> PathBuf {
    let path = PathBuf::from("/usr/bin/chromium");
    assert!(
        path.is_file(),
        "Debian's chromium is missing: `cargo xtask test` installs it (apt-get install chromium)"
    );
    path
}

/// Chromium as this machine allows it: headless, as root, with no network beyond loopback.
fn headless(profile: &Path) -> Command {
    let mut command = Command::new(chromium());
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=60000",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
}

#[test]
fn a_browser_follows_a_job_to_its_end() {
    let mock = MockLlm::start(&["--latency-ms", "150"]);
    let data = tempfile::tempdir().unwrap();
    let pipeline = repo_root()
        .join("examples/eco-scan/pipeline.toml")
        .display()
        .to_string();
    let data_dir = data.path().display().to_string();
    let base_url = mock.base_url();
    let server = Server::start(
        &binary("stagehand"),
        &[
            "serve",
            &pipeline,
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
            "--llm-base-url",
            &base_url,
        ],
    )
    .unwrap();
    let items: Vec<Value> =
        (0..15).map(|i| json!({ "user_id": format!("u{i}"), "image_url": format!("https://images.example/soda_can_{i}.jpg") })).collect();
    let submitted: Value = reqwest::blocking::Client::new()
        .post(server.url("/v1/jobs"))
        .json(&json!({ "items": items, "options": { "concurrency": 3 } }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let job = submitted["job_id"].as_str().unwrap();
    let page = server.url(&format!("/v1/jobs/{job}/watch"));

    // Opened while the job runs (15 items, 3 at a time, ~300 ms each): the page must follow it live.
    let dom = headless(&data.path().join("profile-1"))
        .arg("--dump-dom")
        .arg(&page)
        .output()
        .unwrap();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8(dom.stdout).unwrap();
    assert!(
        dom.contains(r#"<span id="state">completed</span>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<span id="counts">15 / 15 (0 failed)</span>"#),
        "{dom}"
    );
    assert_eq!(
        dom.matches(": succeeded").count(),
        15,
        "every item was shown once: {dom}"
    );

    let artifacts = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("watch-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let shot = headless(&data.path().join("profile-2"))
        .args([
            "--window-size=900,650",
            &format!("--screenshot={}", screenshot.display()),
            &page,
        ])
        .output()
        .unwrap();
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 1000,
        "a real screenshot"
    );
}
