//! The compatibility suite: Stagehand against OpenAI-compatible servers we did not write.
//!
//! - llama.cpp's server, through llama-cpp-python, serving a tiny random-weight model that
//!   `tests/compat/tiny_gguf.py` writes: its schema takes text content as a string only, it
//!   streams without usage, and its answers run to `max_tokens` (`finish_reason: length`).
//! - LiteLLM's proxy (`tests/compat/litellm.yaml`), whose models answer with `mock_response`:
//!   a gateway with its own master key, streaming, and usage in a last chunk.
//!
//! `cargo xtask test` installs both, pinned (`tests/compat/requirements.txt`), into
//! `target/python/compat` and points `STAGEHAND_COMPAT_PYTHON` at its interpreter.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagehand_tests::{
    client, eco_items, eco_scan_pipeline, job_results, repo_root, serve_with_env as serve,
    stage_run, submit_job, wait_for_job,
};

/// The compat virtualenv's interpreter.
fn python() -> PathBuf {
    let python = std::env::var_os("STAGEHAND_COMPAT_PYTHON").map_or_else(
        || repo_root().join("target/python/compat/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask test`, which installs tests/compat/requirements.txt",
        python.display()
    );
    python
}

/// A server process we did not write, on a free port; killed when dropped.
struct Foreign {
    child: Child,
    base_url: String,
}

impl Foreign {
    /// Start `args` (after the interpreter) with `--port` appended, and wait until `ready`
    /// (a path) answers.
    fn start(args: &[&str], env: &[(&str, &str)], ready: &str, log: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(python())
            .args(args)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .stdin(Stdio::null())
            .spawn()
            .expect("the server starts");
        let mut server = Self {
            child,
            base_url: format!("http://127.0.0.1:{port}/v1"),
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        let url = format!("http://127.0.0.1:{port}{ready}");
        loop {
            if client()
                .get(&url)
                .send()
                .is_ok_and(|r| r.status().is_success())
            {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "{args:?} exited ({status}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{args:?} did not get ready");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prompt_eval_runs_against_llama_cpp_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let made = Command::new(python())
        .arg(repo_root().join("tests/compat/tiny_gguf.py"))
        .arg(&model)
        .status()
        .unwrap();
    assert!(made.success(), "the tiny model is written");
    let llama = Foreign::start(
        &[
            "-m",
            "llama_cpp.server",
            "--model",
            &model.display().to_string(),
            "--model_alias",
            "tiny",
            "--chat_format",
            "chatml",
            "--n_ctx",
            "2048",
        ],
        &[],
        "/v1/models",
        &dir.path().join("llama.log"),
    );

    let root = repo_root().display().to_string();
    let text = std::fs::read_to_string(repo_root().join("examples/prompt-eval/pipeline.toml"))
        .unwrap()
        .replace("\"../../target/", &format!("\"{root}/target/"))
        .replace("http://127.0.0.1:8090/v1", &llama.base_url)
        .replace("model = \"gpt-4o-mini\"", "model = \"tiny\"");
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(&pipeline, text).unwrap();
    let server = serve(&pipeline, dir.path(), &[]);

    // A system message and a user message, text only, each case; half of them streamed.
    let cases: Vec<Value> = (0..4)
        .map(|i| {
            json!({ "id": format!("c{i}"), "prompt": format!("What is {i} + {i}?"),
                "expected": "x", "match": "contains", "stream": i % 2 == 1 })
        })
        .collect();
    let job = submit_job(&server, cases, json!({ "concurrency": 2 }));
    let status = wait_for_job(&server, &job);
    let results = job_results(&server, &job);
    assert_eq!(status["succeeded"], 4, "{status} {results:?}");
    for (i, result) in results.iter().enumerate() {
        let generate = &result["output"]["generate"];
        assert_eq!(generate["provider"], "default", "{result}");
        assert!(generate["tokens"].as_u64().unwrap() > 0, "{result}");
        let call = &stage_run(result, "generate")["llm"][0];
        assert_eq!(call["outcome"], "ok", "{result}");
        assert!(call["finish_reason"].is_string(), "{result}");
        // llama-cpp-python reports usage for whole answers, and none in a stream.
        let streamed = i % 2 == 1;
        assert_eq!(
            call["usage_estimated"].as_bool().unwrap_or(false),
            streamed,
            "{result}"
        );
    }
}

#[test]
fn eco_scan_runs_through_litellm_proxy_with_a_provider_per_stage() {
    let dir = tempfile::tempdir().unwrap();
    let key = "sk-compat-0123456789abcdef0123456789abcdef";
    let config = repo_root().join("tests/compat/litellm.yaml");
    let gateway = Foreign::start(
        &[
            "-m",
            "litellm.proxy.proxy_cli",
            "--config",
            &config.display().to_string(),
        ],
        &[
            ("LITELLM_MASTER_KEY", key),
            ("LITELLM_TELEMETRY", "False"),
            ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
        ],
        "/health/liveliness",
        &dir.path().join("litellm.log"),
    );

    let providers = format!(
        "[llm]\nproviders = [\"vision-gw\"]\n\
         [providers.vision-gw]\nbase_url = \"{url}\"\nmodel = \"vision-model\"\napi_key_env = \"GATEWAY_KEY\"\n\
         [providers.answer-gw]\nbase_url = \"{url}\"\nmodel = \"answer-model\"\napi_key_env = \"GATEWAY_KEY\"\n",
        url = gateway.base_url
    );
    let pipeline = eco_scan_pipeline(dir.path(), |text| {
        let (start, end) = (text.find("[llm]").unwrap(), text.find("[run]").unwrap());
        format!("{}{providers}\n{}", &text[..start], &text[end..]).replace(
            "name = \"answer\"\n",
            "name = \"answer\"\nproviders = [\"answer-gw\"]\n",
        )
    });
    let server = serve(&pipeline, dir.path(), &[("GATEWAY_KEY", key)]);
    let job = submit_job(&server, eco_items(3), json!({}));
    let status = wait_for_job(&server, &job);
    let results = job_results(&server, &job);
    assert_eq!(status["succeeded"], 3, "{status} {results:?}");
    for result in &results {
        let output = &result["output"];
        assert_eq!(
            output["vision"]["category"]["minor"], "pet_bottle",
            "{result}"
        );
        let answer = &output["answer"];
        assert_eq!(answer["answer"], "Put it in the plastics bin.", "{result}");
        assert_eq!(answer["provider"], "answer-gw", "{result}");
        assert!(answer.get("tokens_estimated").is_none(), "{result}");
        let call = &stage_run(result, "vision")["llm"][0];
        assert_eq!(call["provider"], "vision-gw", "{result}");
        assert_eq!(call["finish_reason"], "stop", "{result}");
    }
}
