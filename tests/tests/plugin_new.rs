//! `stagehand plugin new --lang rust|python|js`: each template builds as its README says into a
//! component of the `stage` world, passes `plugin check`, and runs in a served pipeline, over
//! HTTP: an LLM call, and a fatal error for an item without `text`. Each test prints how long
//! each step took, from `plugin new` to the results (no timing is asserted).
//!
//! The toolchains are those `cargo xtask plugins` installed: rustup's wasm32-wasip2 target,
//! componentize-py in `target/python/venv`, jco in `target/js`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use serde_json::{Value, json};
use stagehand_tests::{MockLlm, binary, job_results, repo_root, serve, submit_job, wait_for_job};

fn stagehand(args: &[&str]) -> Output {
    Command::new(binary("stagehand"))
        .args(args)
        .output()
        .expect("stagehand runs")
}

fn succeeded(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The steps' durations, printed at the end.
struct Clock {
    lang: &'static str,
    start: Instant,
    last: Instant,
    steps: Vec<(&'static str, f64)>,
}

impl Clock {
    fn new(lang: &'static str) -> Self {
        let now = Instant::now();
        Self {
            lang,
            start: now,
            last: now,
            steps: Vec::new(),
        }
    }

    fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps
            .push((step, now.duration_since(self.last).as_secs_f64()));
        self.last = now;
    }

    fn report(&self) {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(step, secs)| format!("{step} {secs:.1} s"))
            .collect();
        eprintln!(
            "plugin new --lang {} to results over HTTP: {:.1} s ({})",
            self.lang,
            self.start.elapsed().as_secs_f64(),
            steps.join(", ")
        );
    }
}

/// `plugin new short-summary --lang LANG` in a fresh directory, timed: that directory (kept
/// while the test runs), the stage's, and the clock.
fn new_stage(lang: &'static str) -> (tempfile::TempDir, PathBuf, Clock) {
    let parent = tempfile::tempdir().unwrap();
    let mut clock = Clock::new(lang);
    let p = parent.path().to_str().unwrap();
    succeeded(
        "plugin new",
        stagehand(&["plugin", "new", "short-summary", "--dir", p, "--lang", lang]),
    );
    clock.lap("new");
    let dir = parent.path().join("short-summary");
    assert!(dir.join("wit/pipeline.wit").is_file());
    assert!(dir.join("wit/deps/http.wit").is_file());
    (parent, dir, clock)
}

/// `plugin check` says the component is a stage; then a served pipeline runs it over HTTP on
/// two items with text and one without.
fn check_and_run(dir: &Path, wasm: &Path, clock: &mut Clock) {
    let checked = succeeded(
        "plugin check",
        stagehand(&[
            "plugin",
            "check",
            wasm.to_str().unwrap(),
            "--data-dir",
            dir.join("cache").to_str().unwrap(),
        ]),
    );
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(text.contains("world `stage`: ok"), "{text}");
    clock.lap("check");

    let mock = MockLlm::start(&[]);
    let pipeline = dir.join("pipeline.toml");
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
    let server = serve(&pipeline, &dir.join("data"), Some(&mock), &[]);
    let items = vec![
        json!({"text": "a long story"}),
        json!({"text": "another one"}),
        json!({"no_text": 1}),
    ];
    let job = submit_job(&server, items, json!({}));
    wait_for_job(&server, &job);
    let results: Vec<Value> = job_results(&server, &job);
    clock.lap("serve and run");
    clock.report();

    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0]["output"]["summary"]["summary"],
        "Mock answer: Summarise in one line: a long story",
        "{results:?}"
    );
    assert_eq!(results[1]["status"], "succeeded");
    assert_eq!(results[2]["status"], "failed");
    assert_eq!(results[2]["error"]["kind"], "fatal");
    assert!(
        results[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the item has no `text`"),
        "{}",
        results[2]
    );
}

#[test]
fn a_new_rust_stage_builds_checks_and_runs() {
    let (parent, dir, mut clock) = new_stage("rust");

    // Refused: the same name again (nothing overwritten), a name that is no crate name, and a
    // language there is no template for.
    let p = parent.path().to_str().unwrap();
    let again = stagehand(&["plugin", "new", "short-summary", "--dir", p]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = stagehand(&["plugin", "new", "Bad Name", "--dir", p]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a usable name"));
    let lang = stagehand(&["plugin", "new", "x", "--dir", p, "--lang", "cobol"]);
    assert!(!lang.status.success());
    assert!(String::from_utf8_lossy(&lang.stderr).contains("cobol"));

    // Built the way its README says, into a target dir kept warm across runs.
    let target = repo_root().join("target/plugin-template");
    succeeded(
        "cargo build",
        Command::new("cargo")
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(&dir)
            .output()
            .expect("cargo runs"),
    );
    clock.lap("build");
    let wasm = target.join("wasm32-wasip2/release/short_summary.wasm");
    check_and_run(&dir, &wasm, &mut clock);
}

#[test]
fn a_new_python_stage_builds_checks_and_runs() {
    let (_parent, dir, mut clock) = new_stage("python");
    // The README's command, with the componentize-py `cargo xtask plugins` installed.
    let tool = repo_root().join("target/python/venv/bin/componentize-py");
    succeeded(
        "componentize-py",
        Command::new(tool)
            .args(["-d", "wit", "-w", "stage", "componentize", "-p", ".", "app"])
            .args(["-o", "short_summary.wasm"])
            .current_dir(&dir)
            .output()
            .expect("componentize-py runs"),
    );
    clock.lap("build");
    check_and_run(&dir, &dir.join("short_summary.wasm"), &mut clock);
}

#[test]
fn a_new_javascript_stage_builds_checks_and_runs() {
    let (_parent, dir, mut clock) = new_stage("js");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("package.json")).unwrap()).unwrap();
    let pinned: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("plugins/js/package.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["devDependencies"]["@bytecodealliance/jco"],
        pinned["devDependencies"]["@bytecodealliance/jco"]
    );
    // The README's `npm run build`, with the jco `cargo xtask plugins` installed on the PATH
    // instead of a second `npm install` of the same release.
    let bin = repo_root().join("target/js/node_modules/.bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    succeeded(
        "npm run build",
        Command::new("npm")
            .args(["run", "build"])
            .env("PATH", path)
            .current_dir(&dir)
            .output()
            .expect("npm runs"),
    );
    clock.lap("build");
    check_and_run(&dir, &dir.join("short_summary.wasm"), &mut clock);
}
