//! `cargo xtask <command>`: the project's build glue, so that a fresh machine needs nothing but
//! Rust and rustup.
//!
//! - `plugins`: build every guest in `plugins/` for wasm32-wasip2 (adding the target if missing),
//!   the Python stages of `plugins/python/` with componentize-py (installed from PyPI into a
//!   virtualenv under `target/python/`), and the JavaScript stages of `plugins/js/` with
//!   `jco componentize` (the npm packages `plugins/js/package-lock.json` pins, installed into
//!   `target/js/`).
//! - `demo [eco-scan]`: build everything, start the mock LLM, run the example end to end with
//!   `stagehand run`; `demo prompt-eval`: the same through `stagehand serve`, following the job
//!   over SSE and paging through its results.
//! - `test`: formatting, clippy, the plugins, the binaries, then every test (installing
//!   Debian's chromium, chromium-driver and redis-server for the tests if they are missing, and
//!   the compatibility suite's servers, llama-cpp-python and LiteLLM, from PyPI).
//! - `schemathesis`: the live server against its own OpenAPI document (part of `test`).
//! - `bench`: the benchmarks of docs/BENCHMARKS.md (`bench cluster`: Redis mode with 1-3
//!   nodes against embedded mode); `load` (or `bench load`): the seed-style load test, with
//!   thresholds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;
use stagehand_tests::{MockLlm, Server, read_frames};

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf();
    match args.first().map(String::as_str) {
        Some("plugins") => plugins(&root),
        Some("demo") => demo(&root, args.get(1).map(String::as_str)),
        Some("test") => test(&root),
        Some("schemathesis") => schemathesis(&root),
        Some("bench") => bench(&root, &args[1..]),
        // The seed-style load test (tests/benches/load.rs) is a benchmark with thresholds.
        Some("load") => bench(&root, &args),
        _ => {
            eprintln!(
                "usage: cargo xtask <plugins | demo [eco-scan | prompt-eval] | test | schemathesis | bench [server | load | cluster | inflight | outbound | languages | propagation | llm-client] | load>"
            );
            std::process::exit(2);
        }
    }
}

/// Run a command in `dir`, echoing it, and fail if it fails.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to add the wasm32-wasip2 target")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        run(Path::new("."), "rustup", &["target", "add", WASM_TARGET])?;
    }
    Ok(())
}

/// Where the guests land: `target/wasm32-wasip2/release/<crate>.wasm`.
fn plugins_dir(root: &Path) -> PathBuf {
    root.join("target").join(WASM_TARGET).join("release")
}

fn plugins(root: &Path) -> Result<()> {
    ensure_wasm_target()?;
    cargo_plugins(root, "build", &[])?;
    python_plugins(root)?;
    js_plugins(root)
}

/// The componentize-py release the Python stages are built with.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

/// Build each `plugins/python/<name>/app.py` into `<name>_py.wasm`, a component of the `stage`
/// world, unless it is newer than its sources and the WIT.
fn python_plugins(root: &Path) -> Result<()> {
    let venv = root.join("target/python/venv");
    let tool = venv.join("bin/componentize-py");
    let sdk = root.join("plugins/python/sdk");
    let stale = stale_guests(
        root,
        "python",
        "app.py",
        "py",
        &[&sdk.join("stagehand_sdk.py")],
    )?;
    for (app, out) in stale {
        if !tool.is_file() {
            ensure_python_venv(&venv)?;
            run(
                root,
                path(&venv.join("bin/pip")),
                &["install", "--quiet", COMPONENTIZE_PY],
            )?;
        }
        let dir = app.parent().expect("an app has a directory");
        run(
            root,
            path(&tool),
            &[
                "-d",
                "wit",
                "-w",
                "stage",
                "componentize",
                "-p",
                path(dir),
                "-p",
                path(&sdk),
                "app",
                "-o",
                path(&out),
            ],
        )?;
    }
    Ok(())
}

/// Build each `plugins/js/<name>/app.js` into `<name>_js.wasm`, a component of the `stage`
/// world, with `jco componentize`, unless it is newer than its source and the WIT. The npm
/// packages are those `plugins/js/package-lock.json` pins, installed into `target/js/` by
/// `npm ci` (with Debian's `npm` if the machine lacks it).
fn js_plugins(root: &Path) -> Result<()> {
    for (app, out) in stale_guests(root, "js", "app.js", "js", &[])? {
        let jco = js_toolchain(root)?;
        // jco reads the WIT through a WASI shim: paths relative to the checkout work.
        let app = app.strip_prefix(root)?;
        run(
            root,
            path(&jco),
            &[
                "componentize",
                path(app),
                "--wit",
                "wit",
                "--world-name",
                "stage",
                "-o",
                path(&out),
            ],
        )?;
    }
    Ok(())
}

/// The guests of `plugins/<language>/<name>/<source>` whose component,
/// `<name>_<suffix>.wasm`, is missing or older than the source, the WIT or one of `also`:
/// (source, component) pairs, the components' directory created.
fn stale_guests(
    root: &Path,
    language: &str,
    source: &str,
    suffix: &str,
    also: &[&Path],
) -> Result<Vec<(PathBuf, PathBuf)>> {
    let out_dir = plugins_dir(root);
    let wit = root.join("wit/pipeline.wit");
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(root.join("plugins").join(language))? {
        let app = entry?.path().join(source);
        if !app.is_file() {
            continue;
        }
        let name = app
            .parent()
            .and_then(Path::file_name)
            .expect("a directory name")
            .to_string_lossy();
        let out = out_dir.join(format!("{name}_{suffix}.wasm"));
        let mut sources = vec![app.as_path(), wit.as_path()];
        sources.extend_from_slice(also);
        if !is_newer(&out, &sources) {
            stale.push((app.clone(), out));
        }
    }
    if !stale.is_empty() {
        std::fs::create_dir_all(&out_dir)?;
    }
    Ok(stale)
}

/// `target/js/node_modules/.bin/jco`, installed by `npm ci` from `plugins/js/`'s lock file when
/// it is missing or older than the lock file.
fn js_toolchain(root: &Path) -> Result<PathBuf> {
    let tree = root.join("target/js");
    let jco = tree.join("node_modules/.bin/jco");
    let lock = root.join("plugins/js/package-lock.json");
    if is_newer(&jco, &[&lock]) {
        return Ok(jco);
    }
    if Command::new("npm").arg("--version").output().is_err() {
        run(Path::new("."), "apt-get", &["update", "-q"])?;
        run(
            Path::new("."),
            "apt-get",
            &["install", "-y", "-q", "nodejs", "npm"],
        )?;
    }
    std::fs::create_dir_all(&tree)?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(root.join("plugins/js").join(file), tree.join(file))?;
    }
    run(&tree, "npm", &["ci", "--no-audit", "--no-fund", "--quiet"])?;
    if !jco.is_file() {
        bail!("`npm ci` in {} did not install jco", tree.display());
    }
    // `npm ci` keeps the files' own times: mark the install as newer than the lock file.
    std::fs::File::options()
        .append(true)
        .open(&jco)?
        .set_modified(std::time::SystemTime::now())?;
    Ok(jco)
}

/// A virtualenv at `venv`; Debian splits `venv` out of python3, so install it if it is missing.
fn ensure_python_venv(venv: &Path) -> Result<()> {
    let create = || {
        Command::new("python3")
            .args(["-m", "venv", path(venv)])
            .status()
            .is_ok_and(|s| s.success())
    };
    if create() {
        return Ok(());
    }
    run(Path::new("."), "apt-get", &["update", "-q"])?;
    run(
        Path::new("."),
        "apt-get",
        &["install", "-y", "-q", "python3", "python3-venv"],
    )?;
    if !create() {
        bail!("cannot create a Python virtualenv at {}", venv.display());
    }
    Ok(())
}

/// `file` exists and was written after every one of `sources`.
fn is_newer(file: &Path, sources: &[&Path]) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(file) else {
        return false;
    };
    sources
        .iter()
        .all(|source| modified(source).is_some_and(|m| m < built))
}

/// `cargo <command>` on the guests' workspace, for wasm32-wasip2, into the one `target/`.
fn cargo_plugins(root: &Path, command: &str, extra: &[&str]) -> Result<()> {
    let target_dir = root.join("target");
    let mut args = vec![
        command,
        "--release",
        "--target",
        WASM_TARGET,
        "--manifest-path",
        "plugins/Cargo.toml",
    ];
    args.extend(["--target-dir", path(&target_dir)]);
    args.extend(extra);
    run(root, "cargo", &args)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("the checkout's path is UTF-8")
}

fn build_binaries(root: &Path) -> Result<()> {
    ensure_make()?;
    run(
        root,
        "cargo",
        &["build", "--release", "--workspace", "--bins"],
    )
}

/// `demo`: both examples through one server; `demo prompt-eval`: that one alone, through
/// the server; `demo eco-scan`: eco-scan offline (`stagehand run`).
fn demo(root: &Path, name: Option<&str>) -> Result<()> {
    let name = match name {
        None => return demo_both(root),
        Some("prompt-eval") => return demo_prompt_eval(root),
        Some(name) => name,
    };
    let example = root.join("examples").join(name);
    if !example.join("pipeline.toml").is_file() {
        bail!("no example `{name}` (examples/{name}/pipeline.toml)");
    }
    plugins(root)?;
    build_binaries(root)?;
    let flags = [
        "--latency-ms",
        "200",
        "--vision-latency-ms",
        "300",
        "--jitter-ms",
        "100",
    ];
    let mock = MockLlm::start_binary(&root.join("target/release/stagehand-mock-llm"), &flags)?;
    eprintln!("mock LLM at {}", mock.base_url());
    let data_dir = root.join("target/demo").join(name);
    let _ = std::fs::remove_dir_all(&data_dir);
    let results = root
        .join("target/demo")
        .join(format!("{name}-results.jsonl"));
    let status = Command::new(root.join("target/release/stagehand"))
        .args([
            "run",
            path(&example.join("pipeline.toml")),
            path(&example.join("items.jsonl")),
        ])
        .args([
            "--out",
            path(&results),
            "--data-dir",
            path(&data_dir),
            "--llm-base-url",
            &mock.base_url(),
        ])
        .status()?;
    eprintln!("results: {}", results.display());
    if let Some(first) = std::fs::read_to_string(&results)
        .ok()
        .and_then(|t| t.lines().next().map(str::to_string))
    {
        eprintln!("first result:\n{first}");
    }
    if !status.success() {
        bail!("the demo run failed ({status})");
    }
    Ok(())
}

/// The host links jemalloc, whose build (tikv-jemalloc-sys) runs `make`; a slim Debian with
/// Rust has a C compiler (the linker needs one) but not always `make`.
fn ensure_make() -> Result<()> {
    if Command::new("make").arg("--version").output().is_ok() {
        return Ok(());
    }
    run(Path::new("."), "apt-get", &["update", "-q"])?;
    run(Path::new("."), "apt-get", &["install", "-y", "-q", "make"])
}

/// Debian packages the tests drive: chromium (browser tests), chromium-driver (the dashboard
/// test's WebDriver) and redis-server (Redis mode); installed when one is missing.
fn ensure_test_packages() -> Result<()> {
    let needed = [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
        ("/usr/bin/redis-server", "redis-server"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(file, _)| !Path::new(file).is_file())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Path::new("."), "apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q"];
    args.extend(missing);
    run(Path::new("."), "apt-get", &args)
}

/// The mock LLM of the server demos: some latency, and prompt-eval's answers.
fn demo_mock(root: &Path) -> Result<MockLlm> {
    let answers = root.join("examples/prompt-eval/answers.json");
    let flags = [
        "--latency-ms",
        "200",
        "--vision-latency-ms",
        "300",
        "--jitter-ms",
        "200",
        "--answers",
        path(&answers),
    ];
    MockLlm::start_binary(&root.join("target/release/stagehand-mock-llm"), &flags)
}

/// The API key of the demo's facts service, which fact-check's pipeline file holds as a secret.
const DEMO_FACTS_KEY: &str = "demo-facts-key";

/// The facts service fact-check looks facts up in, where its pipeline file grants it
/// (`127.0.0.1:9200`).
fn demo_facts(root: &Path) -> Result<Server> {
    let mut command = Command::new(root.join("target/release/stagehand-facts-service"));
    command
        .args(["--addr", "127.0.0.1:9200"])
        .env("FACTS_API_KEY", DEMO_FACTS_KEY);
    Server::start_command(command).context("the facts service (is 127.0.0.1:9200 free?)")
}

/// `stagehand serve` of the examples' pipeline files `names` (`eco-scan` is
/// `examples/eco-scan/pipeline.toml`, `fact-check/polyglot` `examples/fact-check/polyglot.toml`)
/// in one server, on a fresh data directory.
fn demo_server(root: &Path, names: &[&str], mock: &MockLlm) -> Result<Server> {
    let data_dir = root.join("target/demo/server");
    let _ = std::fs::remove_dir_all(&data_dir);
    let files: Vec<PathBuf> = names
        .iter()
        .map(|name| match name.split_once('/') {
            Some((example, file)) => root
                .join("examples")
                .join(example)
                .join(format!("{file}.toml")),
            None => root.join("examples").join(name).join("pipeline.toml"),
        })
        .collect();
    let base_url = mock.base_url();
    let mut args = vec!["serve"];
    args.extend(files.iter().map(|file| path(file)));
    args.extend([
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        path(&data_dir),
        "--llm-base-url",
        &base_url,
    ]);
    let mut command = Command::new(root.join("target/release/stagehand"));
    // fact-check's secret: the host reads it, its stage only names it.
    command.args(&args).env("FACTS_API_KEY", DEMO_FACTS_KEY);
    let server = Server::start_command(command)?;
    eprintln!(
        "stagehand serving {} at http://{} (mock LLM at {base_url})",
        names.join(" and "),
        server.address
    );
    Ok(server)
}

/// The JSON lines of `file`.
fn json_lines(file: &Path) -> Result<Vec<serde_json::Value>> {
    std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// Submit `items` to `pipeline`: the job id.
fn demo_submit(
    http: &reqwest::blocking::Client,
    server: &Server,
    pipeline: &str,
    items: Vec<serde_json::Value>,
) -> Result<String> {
    let submitted: serde_json::Value = http
        .post(server.url(&format!("/v1/pipelines/{pipeline}/jobs")))
        .json(&json!({ "items": items, "options": { "concurrency": 8 } }))
        .send()?
        .error_for_status()?
        .json()?;
    let job = submitted["job_id"]
        .as_str()
        .context("no job id")?
        .to_string();
    eprintln!(
        "POST /v1/pipelines/{pipeline}/jobs -> job {job} (events: {})",
        submitted["events_url"]
    );
    Ok(job)
}

/// Follow `job` over SSE until it ends, printing its progress frames.
fn demo_follow(
    http: &reqwest::blocking::Client,
    server: &Server,
    label: &str,
    job: &str,
) -> Result<()> {
    let events = http
        .get(server.url(&format!(
            "/v1/jobs/{job}/events?max_items=10&interval_ms=1000"
        )))
        .send()?
        .error_for_status()?;
    read_frames(events, |frame| {
        match frame.event.as_str() {
            "job.progress" => {
                let d = &frame.data;
                eprintln!(
                    "  {label} [{:>3}] {:>5.1}%  {} done, {} failed",
                    frame.id.unwrap_or(0),
                    d["percent"],
                    d["completed"],
                    d["failed"]
                );
            }
            other => eprintln!(
                "  {label} [{:>3}] {other} {}",
                frame.id.unwrap_or(0),
                frame.data
            ),
        }
        matches!(
            frame.event.as_str(),
            "job.completed" | "job.cancelled" | "job.failed"
        )
    });
    Ok(())
}

/// Every result of `job`, paged through with `after`.
fn demo_results(
    http: &reqwest::blocking::Client,
    server: &Server,
    job: &str,
) -> Result<Vec<serde_json::Value>> {
    let (mut after, mut results) = (None::<u64>, Vec::new());
    loop {
        let query = after.map_or("?limit=25".to_string(), |a| format!("?limit=25&after={a}"));
        let page: serde_json::Value = http
            .get(server.url(&format!("/v1/jobs/{job}/results{query}")))
            .send()?
            .error_for_status()?
            .json()?;
        results.extend(
            page["results"]
                .as_array()
                .context("no results")?
                .iter()
                .cloned(),
        );
        match page["next_after"].as_u64() {
            Some(next) => after = Some(next),
            None => return Ok(results),
        }
    }
}

/// prompt-eval's graded results: how many passed, and the cases that did not.
fn print_grades(results: &[serde_json::Value]) {
    let mut failures = Vec::new();
    let mut passed = 0;
    for result in results {
        let grade = &result["output"]["grade"];
        if grade["passed"] == true {
            passed += 1;
        } else {
            failures.push(format!(
                "  case {}: expected {} ({}), got {}",
                result["index"], grade["expected"], grade["mode"], grade["answer"]
            ));
        }
    }
    println!("prompt-eval: {passed} of {} cases passed", results.len());
    for failure in failures {
        println!("{failure}");
    }
}

/// Both examples through one server, at once: eco-scan's items and prompt-eval's cases
/// submitted to their pipelines, followed over SSE, their results read back.
fn demo_both(root: &Path) -> Result<()> {
    plugins(root)?;
    build_binaries(root)?;
    let mock = demo_mock(root)?;
    let _facts = demo_facts(root)?;
    let server = demo_server(
        root,
        &[
            "eco-scan",
            "prompt-eval",
            "fact-check",
            "fact-check/polyglot",
        ],
        &mock,
    )?;
    let http = reqwest::blocking::Client::builder().timeout(None).build()?;
    let pipelines: serde_json::Value = http
        .get(server.url("/v1/pipelines"))
        .send()?
        .error_for_status()?
        .json()?;
    for pipeline in pipelines["pipelines"].as_array().context("no pipelines")? {
        let stages: Vec<&str> = pipeline["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["name"].as_str())
            .collect();
        eprintln!(
            "pipeline {} (revision {:.12}): {}",
            pipeline["name"].as_str().unwrap_or("?"),
            pipeline["revision"].as_str().unwrap_or("?"),
            stages.join(" -> ")
        );
    }
    let items = json_lines(&root.join("examples/eco-scan/items.jsonl"))?;
    let cases = json_lines(&root.join("examples/prompt-eval/cases.jsonl"))?;
    let questions = json_lines(&root.join("examples/fact-check/items.jsonl"))?;
    let eco = demo_submit(&http, &server, "eco-scan", items)?;
    let eval = demo_submit(&http, &server, "prompt-eval", cases)?;
    let facts = demo_submit(&http, &server, "fact-check", questions.clone())?;
    let polyglot = demo_submit(&http, &server, "fact-check-polyglot", questions)?;
    demo_follow(&http, &server, "eco-scan", &eco)?;
    demo_follow(&http, &server, "prompt-eval", &eval)?;
    demo_follow(&http, &server, "fact-check", &facts)?;
    demo_follow(&http, &server, "fact-check-polyglot", &polyglot)?;
    let eco_results = demo_results(&http, &server, &eco)?;
    let succeeded = eco_results
        .iter()
        .filter(|r| r["status"] == "succeeded")
        .count();
    println!(
        "eco-scan: {succeeded} of {} items succeeded",
        eco_results.len()
    );
    if let Some(first) = eco_results.first() {
        println!("eco-scan, first result: {}", first["output"]);
    }
    print_grades(&demo_results(&http, &server, &eval)?);
    if succeeded == 0 {
        bail!("no eco-scan item succeeded");
    }
    let checked = demo_results(&http, &server, &facts)?;
    let answered = succeeded_of(&checked);
    println!(
        "fact-check: {} of {} questions answered from the facts service (its key held by the host)",
        answered.len(),
        checked.len()
    );
    if let Some(first) = answered.first() {
        let lookup = &first["output"]["lookup"];
        println!(
            "fact-check, first: {} -> {} fact(s): {}",
            lookup["question"],
            lookup["facts"].as_array().map_or(0, Vec::len),
            lookup["facts"][0]["fact"]
        );
    }
    all_succeeded("fact-check", &checked)?;
    let cited = demo_results(&http, &server, &polyglot)?;
    let succeeded = succeeded_of(&cited);
    println!(
        "fact-check-polyglot (lookup in JavaScript, cite in Python): {} of {} questions answered and cited",
        succeeded.len(),
        cited.len()
    );
    if let Some(first) = succeeded
        .iter()
        .find(|r| r["output"]["cite"]["citations"][0].is_object())
    {
        println!(
            "fact-check-polyglot, first cited: {} -> {}",
            first["output"]["lookup"]["question"], first["output"]["cite"]["citations"][0]
        );
    }
    all_succeeded("fact-check-polyglot", &cited)
}

/// The results that succeeded.
fn succeeded_of(results: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    results
        .iter()
        .filter(|r| r["status"] == "succeeded")
        .collect()
}

/// An error naming `pipeline`'s first failed result, if one failed.
fn all_succeeded(pipeline: &str, results: &[serde_json::Value]) -> Result<()> {
    match results.iter().find(|r| r["status"] != "succeeded") {
        Some(failed) => bail!("a {pipeline} question failed: {failed}"),
        None => Ok(()),
    }
}

/// Seed 000's batch tester through the server: submit the 100 cases over HTTP, follow the
/// progress over SSE, then page through the graded results.
fn demo_prompt_eval(root: &Path) -> Result<()> {
    plugins(root)?;
    build_binaries(root)?;
    let mock = demo_mock(root)?;
    let server = demo_server(root, &["prompt-eval"], &mock)?;
    let http = reqwest::blocking::Client::builder().timeout(None).build()?;
    let cases = json_lines(&root.join("examples/prompt-eval/cases.jsonl"))?;
    let job = demo_submit(&http, &server, "prompt-eval", cases)?;
    demo_follow(&http, &server, "prompt-eval", &job)?;
    print_grades(&demo_results(&http, &server, &job)?);
    Ok(())
}

fn test(root: &Path) -> Result<()> {
    run(root, "cargo", &["fmt", "--all", "--check"])?;
    run(
        root,
        "cargo",
        &[
            "fmt",
            "--all",
            "--check",
            "--manifest-path",
            "plugins/Cargo.toml",
        ],
    )?;
    ensure_test_packages()?;
    plugins(root)?;
    build_binaries(root)?;
    run(
        root,
        "cargo",
        &[
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    cargo_plugins(root, "clippy", &["--", "-D", "warnings"])?;
    let plugins_dir = plugins_dir(root);
    eprintln!(
        "+ STAGEHAND_PLUGINS_DIR={} cargo test --release --workspace",
        plugins_dir.display()
    );
    let compat_python = compat_python(root)?;
    let status = Command::new("cargo")
        .args(["test", "--release", "--workspace"])
        .env("STAGEHAND_PLUGINS_DIR", &plugins_dir)
        .env("STAGEHAND_COMPAT_PYTHON", &compat_python)
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("tests failed ({status})");
    }
    schemathesis(root)
}

/// The compatibility suite's servers (llama-cpp-python, LiteLLM's proxy, `gguf`), pinned in
/// tests/compat/requirements.txt, in a virtualenv of their own under `target/python/compat`:
/// installed once (llama.cpp's libraries are compiled from source, a few minutes on two cores) and
/// again only when the requirements change. Returns its interpreter.
fn compat_python(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/python/compat");
    let requirements = root.join("tests/compat/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)?;
    let stamp = venv.join("installed-requirements.txt");
    let python = venv.join("bin/python");
    if std::fs::read_to_string(&stamp).is_ok_and(|installed| installed == wanted) {
        return Ok(python);
    }
    if !venv.join("bin/pip").is_file() {
        ensure_python_venv(&venv)?;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!("+ pip install -r tests/compat/requirements.txt (llama.cpp builds from source)");
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "-r", path(&requirements)])
        .env("CMAKE_BUILD_PARALLEL_LEVEL", cores.to_string())
        // Only the text model's libraries: the suite needs no multimodal (mtmd/llava) library,
        // which llama-cpp-python loads only for a vision chat format.
        .env("CMAKE_ARGS", "-DLLAVA_BUILD=OFF")
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("installing the compatibility suite's servers failed ({status})");
    }
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// schemathesis from PyPI, pinned, in the project's virtualenv.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// Check the live server against its own `/openapi.json` with schemathesis: generated and
/// fuzzed requests to every operation (with the admin token, so admin routes are reached too)
/// must get no 5xx and no response outside the documented schema, and requests with data
/// outside the schema (negative data) must be refused with a 4xx.
fn schemathesis(root: &Path) -> Result<()> {
    let venv = root.join("target/python/venv");
    let tool = venv.join("bin/schemathesis");
    if !tool.is_file() {
        if !venv.join("bin/pip").is_file() {
            ensure_python_venv(&venv)?;
        }
        run(
            root,
            path(&venv.join("bin/pip")),
            &["install", "--quiet", SCHEMATHESIS],
        )?;
    }
    build_binaries(root)?;
    let mock = MockLlm::start_binary(
        &root.join("target/release/stagehand-mock-llm"),
        &["--latency-ms", "0"],
    )?;
    let data = root.join("target/schemathesis");
    let _ = std::fs::remove_dir_all(&data);
    let pipeline = root.join("examples/eco-scan/pipeline.toml");
    let llm = mock.base_url();
    let server = Server::start(
        &root.join("target/release/stagehand"),
        &[
            "serve",
            path(&pipeline),
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            path(&data),
            "--llm-base-url",
            &llm,
            "--api-token",
            "schemathesis-api",
            "--admin-token",
            "schemathesis-admin",
        ],
    )?;
    // Real ids, so that operations on a job, a dead letter, a stage or a namespace are reached
    // beyond their 404: a finished job with one dead letter (an item no rule knows).
    let http = reqwest::blocking::Client::new();
    let submitted: serde_json::Value = http
        .post(server.url("/v1/jobs"))
        .bearer_auth("schemathesis-admin")
        .json(&json!({ "items": [
            { "user_id": "u1", "image_url": "https://images.example/pet_bottle.jpg" },
            { "user_id": "u2", "image_url": "https://images.example/alien_thing.jpg" },
        ] }))
        .send()?
        .error_for_status()?
        .json()?;
    let job = submitted["job_id"]
        .as_str()
        .context("a job id")?
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status: serde_json::Value = http
            .get(server.url(&format!("/v1/jobs/{job}")))
            .bearer_auth("schemathesis-admin")
            .send()?
            .json()?;
        if status["state"] != "running" {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the seed job for schemathesis did not finish");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let config = root.join("target/schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[parameters]\nid = \"{job}\"\njob = \"{job}\"\nindex = 1\nname = \"answer\"\n\
             namespace = \"characters\"\npipeline = \"eco-scan\"\n\n\
             # Deleting the pipeline every other operation uses would leave them 404s.\n\
             [[operations]]\ninclude-name = \"DELETE /v1/pipelines/{{pipeline}}\"\n\
             parameters = {{ pipeline = \"not-served\" }}\n"
        ),
    )?;
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    run(
        root,
        path(&tool),
        &[
            "--config-file",
            path(&config),
            "run",
            &server.url("/openapi.json"),
            "--header",
            "Authorization: Bearer schemathesis-admin",
            // Negative data (values outside the schema: past a maximum, the wrong type, an
            // unknown field) is generated too (`--mode all`, the default), and must be refused.
            "--mode",
            "all",
            "--checks",
            "not_a_server_error,response_schema_conformance,negative_data_rejection,\
             status_code_conformance,content_type_conformance",
            "--max-examples",
            "30",
            "--seed",
            &seed,
            "--report-dir",
            path(&root.join("target/test-artifacts/schemathesis")),
        ],
    )
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    plugins(root)?;
    build_binaries(root)?;
    // `bench server ...` runs the server benchmarks (tests/benches/server.rs); anything else
    // goes to the pipeline benchmarks (host/benches/pipeline.rs).
    let (package, name, rest) = match args.first().map(String::as_str) {
        Some("server") => ("stagehand-tests", "server", &args[1..]),
        Some("load") => ("stagehand-tests", "load", &args[1..]),
        Some("cluster") => ("stagehand-tests", "cluster", &args[1..]),
        Some("inflight") => ("stagehand-tests", "inflight", &args[1..]),
        Some("outbound") => ("stagehand-tests", "outbound", &args[1..]),
        Some("languages") => ("stagehand-tests", "languages", &args[1..]),
        Some("propagation") => ("stagehand-tests", "propagation", &args[1..]),
        Some("llm-client") => ("stagehand-tests", "llm_client", &args[1..]),
        _ => ("stagehand", "pipeline", args),
    };
    let mut cargo = vec!["bench", "--package", package, "--bench", name, "--"];
    cargo.extend(rest.iter().map(String::as_str));
    let status = Command::new("cargo")
        .args(&cargo)
        .env("STAGEHAND_PLUGINS_DIR", plugins_dir(root))
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}
