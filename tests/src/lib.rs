//! Helpers for end-to-end tests, which drive the real binaries as separate processes: the
//! `stagehand` built by `cargo xtask test` and the mock LLM from `examples/mock-llm`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

pub mod backends;
pub mod bundles;
pub mod cluster;
pub mod measure;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// A binary of this workspace, next to the running test (`target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask test`, which builds the binaries first",
        path.display()
    );
    path
}

/// A child process that prints `listening on http://ADDR` first; killed when dropped.
pub struct Server {
    child: Child,
    /// `127.0.0.1:port`
    pub address: String,
}

impl Server {
    /// Start `binary` with `args` and wait for its `listening on` line.
    pub fn start(binary: &Path, args: &[&str]) -> Result<Self> {
        Self::start_with_stderr(binary, args, Stdio::inherit())
    }

    /// [`Server::start`] with the process' stderr (its log) going to `stderr`.
    pub fn start_with_stderr(binary: &Path, args: &[&str], stderr: Stdio) -> Result<Self> {
        let mut command = Command::new(binary);
        command.args(args).stderr(stderr);
        Self::start_command(command)
    }

    /// Start `command` (its arguments and environment set by the caller), stdout piped.
    pub fn start_command(mut command: Command) -> Result<Self> {
        let binary = PathBuf::from(command.get_program());
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let Some(address) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            bail!(
                "{} did not say where it listens: {line:?}",
                binary.display()
            );
        };
        Ok(Self {
            address: address.to_string(),
            child,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process, e.g. to signal it.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Stop the process as an operator does (SIGTERM: a graceful shutdown) and wait for it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(term.success(), "cannot signal the server");
        self.child.wait().expect("the server exits")
    }

    /// The most memory the process has held at once (its peak resident set), in bytes.
    pub fn peak_memory(&self) -> u64 {
        measure::peak_rss_kib(self.child.id()) * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mock LLM as a child process on a free port; killed when dropped.
pub struct MockLlm {
    server: Server,
    /// `127.0.0.1:port`
    pub address: String,
}

impl MockLlm {
    /// Start `binary` (the `stagehand-mock-llm` executable) with extra flags.
    pub fn start_binary(binary: &Path, flags: &[&str]) -> Result<Self> {
        let mut args = vec!["--addr", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let server = Server::start(binary, &args)?;
        Ok(Self {
            address: server.address.clone(),
            server,
        })
    }

    /// Start the workspace's mock LLM with extra flags.
    pub fn start(flags: &[&str]) -> Self {
        Self::start_binary(&binary("stagehand-mock-llm"), flags).expect("the mock LLM starts")
    }

    /// The API root to give a pipeline.
    pub fn base_url(&self) -> String {
        self.server.url("/v1")
    }

    /// `GET /admin/stats`: what the mock has answered.
    pub fn stats(&self) -> serde_json::Value {
        let body = http_get(&self.address, "/admin/stats").expect("the mock answers");
        serde_json::from_str(&body).expect("stats are JSON")
    }
}

/// The examples' facts service (`stagehand-facts-service`): what outbound HTTP tests reach.
pub struct FactsService {
    server: Server,
    /// The API key it asks for.
    pub key: String,
}

impl FactsService {
    pub fn start(key: &str) -> Self {
        let mut command = Command::new(binary("stagehand-facts-service"));
        command
            .args(["--addr", "127.0.0.1:0"])
            .env("FACTS_API_KEY", key);
        let server = Server::start_command(command).expect("the facts service starts");
        Self {
            server,
            key: key.to_string(),
        }
    }

    /// `http://127.0.0.1:PORT`, as `allowed_hosts` names it.
    pub fn origin(&self) -> String {
        format!("http://{}", self.server.address)
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// `GET /admin/stats`: requests received per path, the last `authorization` seen.
    pub fn stats(&self) -> serde_json::Value {
        let body = http_get(&self.server.address, "/admin/stats").expect("the service answers");
        serde_json::from_str(&body).expect("stats are JSON")
    }

    /// Requests received on `path`.
    pub fn received(&self, path: &str) -> u64 {
        self.stats()["requests"][path].as_u64().unwrap_or(0)
    }
}

/// `stagehand serve <pipeline>` on a free port, its store in `data`, its LLM calls to `mock`.
pub fn serve(pipeline: &Path, data: &Path, mock: Option<&MockLlm>, extra: &[&str]) -> Server {
    serve_logged(pipeline, data, mock, extra, Stdio::inherit())
}

/// [`serve`] with the server's log (stderr) going to `stderr`.
pub fn serve_logged(
    pipeline: &Path,
    data: &Path,
    mock: Option<&MockLlm>,
    extra: &[&str],
    stderr: Stdio,
) -> Server {
    let (pipeline, data) = (pipeline.display().to_string(), data.display().to_string());
    let llm = mock.map(MockLlm::base_url);
    let mut args = vec![
        "serve",
        &pipeline,
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        &data,
    ];
    if let Some(llm) = &llm {
        args.extend(["--llm-base-url", llm]);
    }
    args.extend_from_slice(extra);
    Server::start_with_stderr(&binary("stagehand"), &args, stderr).expect("stagehand serve starts")
}

/// `stagehand serve <pipeline>` with `env` set, its LLM calls wherever the pipeline says.
pub fn serve_with_env(pipeline: &Path, data: &Path, env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(binary("stagehand"));
    command.args(["serve", &pipeline.display().to_string()]);
    command.args(["--addr", "127.0.0.1:0", "--data-dir"]);
    command.arg(data);
    command.envs(env.iter().copied());
    Server::start_command(command).expect("stagehand serve starts")
}

/// The run of `stage` in an item's result (`stages[]`).
pub fn stage_run<'a>(result: &'a serde_json::Value, stage: &str) -> &'a serde_json::Value {
    result["stages"]
        .as_array()
        .expect("a result has stage runs")
        .iter()
        .find(|run| run["stage"] == stage)
        .unwrap_or_else(|| panic!("no run of {stage} in {result}"))
}

/// [`serve`] of the eco-scan example.
pub fn serve_eco_scan(mock: &MockLlm, data: &Path, extra: &[&str]) -> Server {
    let pipeline = repo_root().join("examples/eco-scan/pipeline.toml");
    serve(&pipeline, data, Some(mock), extra)
}

/// A copy of the eco-scan pipeline file in `dir`, with absolute paths and `edit` applied to its
/// text: for tests that change a limit or point a kv namespace elsewhere.
pub fn eco_scan_pipeline(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let root = repo_root().display().to_string();
    let text = std::fs::read_to_string(repo_root().join("examples/eco-scan/pipeline.toml"))
        .expect("the eco-scan pipeline file")
        .replace("\"../../target/", &format!("\"{root}/target/"))
        .replace("file = \"", &format!("file = \"{root}/examples/eco-scan/"));
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, edit(text)).expect("a writable test directory");
    path
}

/// A copy of the prompt-eval pipeline file in `dir` (as `prompt-eval.toml`), with absolute
/// paths: served next to eco-scan's by tests of several pipelines.
pub fn prompt_eval_pipeline(dir: &Path) -> PathBuf {
    let root = repo_root().display().to_string();
    let text = std::fs::read_to_string(repo_root().join("examples/prompt-eval/pipeline.toml"))
        .expect("the prompt-eval pipeline file")
        .replace("\"../../target/", &format!("\"{root}/target/"));
    let path = dir.join("prompt-eval.toml");
    std::fs::write(&path, text).expect("a writable test directory");
    path
}

/// A pipeline of one `hostile` stage (with `stage` settings added to it) next to eco-scan's
/// handlers and kv, which the `journal` action reaches; `run` is added to `[run]`.
pub fn hostile_pipeline(dir: &Path, run: &str, stage: &str) -> PathBuf {
    eco_scan_pipeline(dir, |text| {
        let (head, rest) = text.split_once("[[stage]]").expect("stages");
        let handlers = &rest[rest.find("[handlers.").expect("handlers")..];
        format!(
            "{}[[stage]]\nname = \"hostile\"\ncomponent = \"{}\"\n{stage}\n\n{handlers}",
            head.replace("[run]\n", &format!("[run]\n{run}\n")),
            plugin_path("hostile").display()
        )
    })
}

/// `stagehand inspect <what>` of the store in `data` (which no server may hold): its JSON lines.
pub fn inspect(data: &Path, what: &[&str]) -> Vec<serde_json::Value> {
    inspect_with(what, &["--data-dir", &data.display().to_string()])
}

/// `stagehand inspect <what> --redis <url>`: effects or records of a Redis-mode cluster, read
/// while it serves.
pub fn inspect_redis(url: &str, what: &[&str]) -> Vec<serde_json::Value> {
    inspect_with(what, &["--redis", url])
}

fn inspect_with(what: &[&str], flags: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(binary("stagehand"))
        .arg("inspect")
        .args(what)
        .args(flags)
        .output()
        .expect("stagehand inspect runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `n` eco-scan items, all with known categories, seven users.
pub fn eco_items(n: usize) -> Vec<serde_json::Value> {
    let names = [
        "pet_bottle",
        "soda_can",
        "glass_bottle",
        "milk_carton",
        "aa_battery",
        "banana_peel",
    ];
    (0..n)
        .map(|i| {
            serde_json::json!({
                "user_id": format!("u{}", i % 7),
                "image_url": format!("https://images.example/{}_{i}.jpg", names[i % names.len()]),
            })
        })
        .collect()
}

/// A blocking HTTP client for tests, with a generous timeout.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("an HTTP client")
}

/// `POST /v1/jobs` with `items` and `options`, which must be accepted: the job id.
pub fn submit_job(
    server: &Server,
    items: Vec<serde_json::Value>,
    options: serde_json::Value,
) -> String {
    let response = client()
        .post(server.url("/v1/jobs"))
        .json(&serde_json::json!({ "items": items, "options": options }))
        .send()
        .expect("the server answers");
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().expect("a JSON answer");
    let job = body["job_id"].as_str().expect("a job id").to_string();
    assert_eq!(body["events_url"], format!("/v1/jobs/{job}/events"));
    job
}

/// `POST /v1/scans` with `item`, which must be accepted: the job (task) id.
pub fn submit_scan(server: &Server, item: serde_json::Value) -> String {
    let response = client()
        .post(server.url("/v1/scans"))
        .json(&item)
        .send()
        .expect("the server answers");
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().expect("a JSON answer");
    body["task_id"].as_str().expect("a task id").to_string()
}

/// Wait (at most two minutes) until `job` is no longer running; its status then.
pub fn wait_for_job(server: &Server, job: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let status = job_status(server, job);
        if status["state"] != "running" {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {job} did not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The results of `job` (its first 1,000), in item order.
pub fn job_results(server: &Server, job: &str) -> Vec<serde_json::Value> {
    let page: serde_json::Value = client()
        .get(server.url(&format!("/v1/jobs/{job}/results?limit=1000")))
        .send()
        .expect("the server answers")
        .json()
        .expect("a JSON answer");
    page["results"].as_array().expect("results").clone()
}

/// `GET /v1/jobs/{job}`.
pub fn job_status(server: &Server, job: &str) -> serde_json::Value {
    get_json(server, &format!("/v1/jobs/{job}"))
}

/// The value of the metric `series` (name and labels as `/metrics` writes them), if the server
/// shows it.
pub fn metric(server: &Server, series: &str) -> Option<f64> {
    metric_in(&metrics_text(server), series)
}

/// A server's `/metrics` page.
pub fn metrics_text(server: &Server) -> String {
    client()
        .get(server.url("/metrics"))
        .send()
        .expect("the server answers")
        .text()
        .expect("metrics are text")
}

/// The value of `series` in a Prometheus text page.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse::<f64>().ok())?
    })
}

/// Wait (at most 30 s) until the metric `series` reaches `at_least`: a visible sign that
/// something asynchronous has happened.
pub fn wait_for_metric(server: &Server, series: &str, at_least: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let value = metric(server, series);
        if value.is_some_and(|v| v >= at_least) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} did not reach {at_least} (it is {value:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Wait (at most 60 s) until `ready` holds.
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `GET path`, answered with JSON (whatever the status).
pub fn get_json(server: &Server, path: &str) -> serde_json::Value {
    client()
        .get(server.url(path))
        .send()
        .expect("the server answers")
        .json()
        .expect("a JSON answer")
}

/// `GET /v1/stages`' entry for stage `name`.
pub fn stage_entry(server: &Server, name: &str) -> serde_json::Value {
    let all = get_json(server, "/v1/stages");
    let entry = all["stages"]
        .as_array()
        .and_then(|stages| stages.iter().find(|s| s["name"] == name).cloned());
    entry.unwrap_or_else(|| panic!("no stage `{name}` in {all}"))
}

/// (current digest, previous digests newest first) of stage `name`.
pub fn stage_digests(server: &Server, name: &str) -> (String, Vec<String>) {
    let stage = stage_entry(server, name);
    let digest = |v: &serde_json::Value| v["digest"].as_str().unwrap().to_string();
    let previous = stage["previous"]
        .as_array()
        .unwrap()
        .iter()
        .map(digest)
        .collect();
    (digest(&stage["current"]), previous)
}

/// Where a built plugin is (`STAGEHAND_PLUGINS_DIR`, else the workspace's target dir).
pub fn plugin_path(name: &str) -> PathBuf {
    let dir = std::env::var("STAGEHAND_PLUGINS_DIR").map_or_else(
        |_| repo_root().join("target/wasm32-wasip2/release"),
        PathBuf::from,
    );
    dir.join(format!("{name}.wasm"))
}

/// The bytes of a built plugin.
pub fn plugin_bytes(name: &str) -> Vec<u8> {
    let path = plugin_path(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask plugins`", path.display()))
}

/// `wasm` with a custom section appended: another digest, the same behaviour (a new "version"
/// of a stage for hot-swap tests).
pub fn with_custom_section(mut wasm: Vec<u8>, tag: &str) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"stagehand-test-version";
    let mut content = Vec::new();
    leb128(name.len(), &mut content);
    content.extend_from_slice(name);
    content.extend_from_slice(tag.as_bytes());
    wasm.push(0); // a custom section
    leb128(content.len(), &mut wasm);
    wasm.extend_from_slice(&content);
    wasm
}

/// One Server-Sent Events message.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: Option<u64>,
    pub event: String,
    pub data: serde_json::Value,
}

/// Read SSE messages from `stream` until it ends or `stop` returns true for a message.
pub fn read_frames(stream: impl Read, mut stop: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
    let mut frames = Vec::new();
    let (mut id, mut event, mut data) = (None, String::new(), String::new());
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if line.is_empty() {
            if !data.is_empty() {
                let parsed =
                    serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data.clone()));
                let frame = Frame {
                    id,
                    event: std::mem::take(&mut event),
                    data: parsed,
                };
                data.clear();
                let done = stop(&frame);
                frames.push(frame);
                if done {
                    break;
                }
            }
            id = None;
            continue;
        }
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    frames
}

/// A minimal HTTP/1.1 GET, enough for the mock's admin routes.
fn http_get(address: &str, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(address)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (_, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok(body.to_string())
}
