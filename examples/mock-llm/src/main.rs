//! `stagehand-mock-llm`: an OpenAI-compatible `/v1/chat/completions` server for the examples
//! and tests, which run without internet.
//!
//! Answers are deterministic, so results can be checked:
//! - a request with an image part is a *vision* request: the category comes from the image's
//!   name (the URL's last segment, or the decoded text of a `data:` URL), matched against
//!   keywords such as `pet`, `can`, `battery`; an image with no known keyword gets a category
//!   picked by hash, and one named `alien...` gets a category no rule knows;
//! - a request whose prompt carries `Disposal rule: {...}` is an *answer* request: the steps
//!   come from the rule;
//! - a request carrying `Expected answer:` and `Given answer:` is a *judge* request: correct
//!   when the given answer contains the expected one (case and final period ignored);
//! - any other prompt found in the `--answers` file (a JSON object prompt -> answer) gets that
//!   answer; the rest is echoed back as `Mock answer: <last user text>`.
//!
//! Latency (`--latency-ms`, `--vision-latency-ms`, `--jitter-ms`) and faults (`--rate-429` with
//! `--retry-after-s`, `--rate-500`, `--rate-hang`) are set by flags, or changed while running
//! with `POST /admin/config`; `GET /admin/stats` counts what happened. `"stream": true` gets
//! OpenAI's streamed chunks, one per word, `--token-delay-ms` apart (usage in a last chunk with
//! `stream_options.include_usage`). Modes imitate what real servers do differently:
//! `--string-content` (content as a string only, a 500 with a validation error otherwise, as
//! llama.cpp's server through llama-cpp-python), `--no-usage` (no `usage`, streamed or not),
//! `--max-completion-tokens` (answers cut with `finish_reason: "length"`; the request's
//! `max_tokens` always cuts too), `--models` (other models are a 404) and `--limited-keys`
//! (keys that always get 429; `/admin/stats` counts requests per key). The first line on stdout is `listening on http://ADDR`, so
//! a parent process can find an ephemeral port.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Parser, Debug)]
#[command(
    name = "stagehand-mock-llm",
    about = "OpenAI-compatible mock chat server with latency and fault injection"
)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8090")]
    addr: SocketAddr,
    /// A JSON object of prompt -> answer for text requests.
    #[arg(long)]
    answers: Option<std::path::PathBuf>,
    #[command(flatten)]
    behaviour: Behaviour,
}

/// How the server behaves; every field can be changed at run time with `POST /admin/config`.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
struct Behaviour {
    /// Delay before every text answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay before every vision answer (default: --latency-ms).
    #[arg(long)]
    vision_latency_ms: Option<u64>,
    /// Extra random delay, up to this much.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Share of requests answered 429 with a `Retry-After` header.
    #[arg(long, default_value_t = 0.0)]
    rate_429: f64,
    /// The `Retry-After` value of 429 answers, in seconds.
    #[arg(long, default_value_t = 1)]
    retry_after_s: u64,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    rate_500: f64,
    /// Share of requests that never get an answer.
    #[arg(long, default_value_t = 0.0)]
    rate_hang: f64,
    /// Seed of the fault and jitter draws.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Delay between the pieces of a streamed answer (`"stream": true`).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    token_delay_ms: u64,
    /// Answer like a server whose request schema takes a message's content as a string only
    /// (llama.cpp's server through llama-cpp-python): content sent as an array of parts with
    /// no image in it is a 500 carrying the schema's validation error.
    #[arg(long)]
    #[serde(default)]
    string_content: bool,
    /// Answer without `usage`, and ignore `stream_options.include_usage`, as some servers and
    /// gateways do.
    #[arg(long)]
    #[serde(default)]
    no_usage: bool,
    /// The server's own cap on an answer's tokens (about 4 bytes each): a longer answer is cut
    /// and finishes with `length`, as one cut by the request's `max_tokens` does.
    #[arg(long)]
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    /// The models the server has (comma-separated); a request for another is a 404. Empty:
    /// every model name is taken.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    models: Vec<String>,
    /// API keys (bearer tokens) that always get 429, as a key past its quota does.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    limited_keys: Vec<String>,
}

#[derive(Default, Serialize)]
struct Stats {
    requests: AtomicU64,
    vision: AtomicU64,
    answer: AtomicU64,
    judge: AtomicU64,
    echo: AtomicU64,
    rate_limited: AtomicU64,
    server_errors: AtomicU64,
    hung: AtomicU64,
    bad_requests: AtomicU64,
    streamed: AtomicU64,
    /// Answers cut at `max_tokens` or `--max-completion-tokens`.
    cut: AtomicU64,
    /// Requests by API key (bearer token; `-` for none).
    keys: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Requests by model asked for.
    models: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// Counts a request in flight until it is answered (or its client goes away).
struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn new(stats: &'a Stats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Mock {
    behaviour: Mutex<(Behaviour, fastrand::Rng)>,
    stats: Stats,
    answers: std::collections::HashMap<String, String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // One connection per request in flight: benchmarks hold ten thousand.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rng = fastrand::Rng::with_seed(args.behaviour.seed);
    let answers = match &args.answers {
        Some(path) => serde_json::from_str(&std::fs::read_to_string(path)?)?,
        None => Default::default(),
    };
    let mock = Arc::new(Mock {
        behaviour: Mutex::new((args.behaviour, rng)),
        stats: Stats::default(),
        answers,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/admin/config", get(get_config).post(set_config))
        .route("/admin/stats", get(stats))
        .with_state(mock);
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{}", listener.local_addr()?)?;
    stdout.flush()?;
    drop(stdout);
    axum::serve(listener, app).await?;
    Ok(())
}

fn openai_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "message": message, "type": kind, "code": null } })),
    )
        .into_response()
}

/// What a request asks for, decided by its content.
enum Task {
    Vision(String),
    Answer { category: String, rule: Value },
    Judge { expected: String, given: String },
    Echo(String),
}

async fn chat(
    State(mock): State<Arc<Mock>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    mock.stats.requests.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::new(&mock.stats);
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("-")
        .to_string();
    *mock
        .stats
        .keys
        .lock()
        .expect("not poisoned")
        .entry(key.clone())
        .or_default() += 1;
    let request: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => {
            mock.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("body is not JSON: {e}"),
            );
        }
    };
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        mock.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "`messages` must be an array",
        );
    };
    let asked_model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-1")
        .to_string();
    *mock
        .stats
        .models
        .lock()
        .expect("not poisoned")
        .entry(asked_model.clone())
        .or_default() += 1;
    let (string_content, known_models, limited) = {
        let guard = mock.behaviour.lock().expect("not poisoned");
        (
            guard.0.string_content,
            guard.0.models.clone(),
            guard.0.limited_keys.contains(&key),
        )
    };
    if limited {
        mock.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        let mut response = openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "You exceeded your current quota (mock: a limited key)",
        );
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(1));
        return response;
    }
    if !known_models.is_empty() && !known_models.contains(&asked_model) {
        mock.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        return openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("The model `{asked_model}` does not exist or you do not have access to it."),
        );
    }
    if string_content && let Some(index) = messages.iter().position(parts_without_image) {
        mock.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "1 validation error for ChatCompletionRequest\nmessages.{index}.content\n  \
                 Input should be a valid string [type=string_type]"
            ),
        )
            .into_response();
    }
    let task = classify(messages, &mock.answers);

    // Draw the fault and the delay under one lock, then act without it.
    let (fault, delay, retry_after, token_delay, no_usage, server_cap) = {
        let mut guard = mock.behaviour.lock().expect("not poisoned");
        let (behaviour, rng) = &mut *guard;
        let draw = rng.f64();
        let fault = if draw < behaviour.rate_429 {
            Some(StatusCode::TOO_MANY_REQUESTS)
        } else if draw < behaviour.rate_429 + behaviour.rate_500 {
            Some(StatusCode::INTERNAL_SERVER_ERROR)
        } else if draw < behaviour.rate_429 + behaviour.rate_500 + behaviour.rate_hang {
            Some(StatusCode::REQUEST_TIMEOUT)
        } else {
            None
        };
        let base = match task {
            Task::Vision(_) => behaviour.vision_latency_ms.unwrap_or(behaviour.latency_ms),
            _ => behaviour.latency_ms,
        };
        let jitter = if behaviour.jitter_ms > 0 {
            rng.u64(0..=behaviour.jitter_ms)
        } else {
            0
        };
        (
            fault,
            Duration::from_millis(base + jitter),
            behaviour.retry_after_s,
            Duration::from_millis(behaviour.token_delay_ms),
            behaviour.no_usage,
            behaviour.max_completion_tokens,
        )
    };
    match fault {
        Some(StatusCode::TOO_MANY_REQUESTS) => {
            mock.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let mut response = openai_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "Rate limit reached (mock)",
            );
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(retry_after));
            return response;
        }
        Some(StatusCode::INTERNAL_SERVER_ERROR) => {
            mock.stats.server_errors.fetch_add(1, Ordering::Relaxed);
            return openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "The server had an error (mock)",
            );
        }
        Some(_) => {
            mock.stats.hung.fetch_add(1, Ordering::Relaxed);
            std::future::pending::<()>().await;
        }
        None => {}
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let content = match task {
        Task::Vision(image) => {
            mock.stats.vision.fetch_add(1, Ordering::Relaxed);
            let (major, middle, minor) = categorise(&image);
            json!({ "major": major, "middle": middle, "minor": minor }).to_string()
        }
        Task::Answer { category, rule } => {
            mock.stats.answer.fetch_add(1, Ordering::Relaxed);
            answer(&category, &rule)
        }
        Task::Judge { expected, given } => {
            mock.stats.judge.fetch_add(1, Ordering::Relaxed);
            let normalise = |s: &str| s.trim().trim_end_matches('.').to_lowercase();
            let correct = normalise(&given).contains(&normalise(&expected));
            let reason = if correct {
                "matches the expected answer"
            } else {
                "differs from the expected answer"
            };
            json!({ "correct": correct, "reason": reason }).to_string()
        }
        Task::Echo(text) => {
            mock.stats.echo.fetch_add(1, Ordering::Relaxed);
            text
        }
    };
    let model = asked_model;
    // A real server stops at the request's `max_tokens` or at its own limit.
    let cap = [
        request.get("max_tokens").and_then(Value::as_u64),
        server_cap,
    ]
    .into_iter()
    .flatten()
    .min();
    let (content, finish_reason) = match cap {
        Some(cap) if content.len().div_ceil(4) as u64 > cap => {
            mock.stats.cut.fetch_add(1, Ordering::Relaxed);
            let mut end = (cap as usize * 4).min(content.len());
            while !content.is_char_boundary(end) {
                end -= 1;
            }
            (content[..end].to_string(), "length")
        }
        _ => (content, "stop"),
    };
    let prompt_tokens = (body.len() / 4) as u64;
    let completion_tokens = (content.len() / 4).max(1) as u64;
    let usage = json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens });
    let id = format!(
        "chatcmpl-mock-{}",
        mock.stats.requests.load(Ordering::Relaxed)
    );
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        mock.stats.streamed.fetch_add(1, Ordering::Relaxed);
        let include_usage = request.pointer("/stream_options/include_usage") == Some(&json!(true));
        return streamed(
            id,
            model,
            content,
            finish_reason,
            (include_usage && !no_usage).then_some(usage),
            token_delay,
        );
    }
    let mut answer = json!({
        "id": id,
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": finish_reason }],
    });
    if !no_usage {
        answer["usage"] = usage;
    }
    Json(answer).into_response()
}

/// OpenAI's streamed answer: Server-Sent Events of `chat.completion.chunk` objects, one per
/// word of `content`, `delay` apart; then the usage if asked for, then `[DONE]`.
fn streamed(
    id: String,
    model: String,
    content: String,
    finish_reason: &str,
    usage: Option<Value>,
    delay: Duration,
) -> Response {
    let chunk = |choices: Value, usage: Option<&Value>| {
        json!({ "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": choices, "usage": usage })
        .to_string()
    };
    let mut messages: Vec<String> = content
        .split_inclusive(' ')
        .map(|piece| chunk(json!([{ "index": 0, "delta": { "content": piece } }]), None))
        .collect();
    messages.push(chunk(
        json!([{ "index": 0, "delta": {}, "finish_reason": finish_reason }]),
        None,
    ));
    if let Some(usage) = &usage {
        messages.push(chunk(json!([]), Some(usage)));
    }
    messages.push("[DONE]".to_string());
    let events = futures::stream::unfold(
        (messages.into_iter(), true),
        move |(mut messages, first)| async move {
            let data = messages.next()?;
            if !first && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let event = axum::response::sse::Event::default().data(data);
            Some((Ok::<_, std::convert::Infallible>(event), (messages, false)))
        },
    );
    axum::response::sse::Sse::new(events).into_response()
}

/// A message whose content is an array of parts none of which is an image: what a server
/// that wants string content refuses.
fn parts_without_image(message: &Value) -> bool {
    message
        .get("content")
        .and_then(Value::as_array)
        .is_some_and(|parts| parts.iter().all(|p| p.get("image_url").is_none()))
}

/// The texts and image URLs of all messages, in order.
fn parts(messages: &[Value]) -> (Vec<&str>, Vec<&str>) {
    let mut texts = Vec::new();
    let mut images = Vec::new();
    for message in messages {
        match message.get("content") {
            Some(Value::String(text)) => texts.push(text.as_str()),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        texts.push(text);
                    }
                    if let Some(url) = part.pointer("/image_url/url").and_then(Value::as_str) {
                        images.push(url);
                    }
                }
            }
            _ => {}
        }
    }
    (texts, images)
}

fn classify(messages: &[Value], answers: &std::collections::HashMap<String, String>) -> Task {
    let (texts, images) = parts(messages);
    if let Some(image) = images.first() {
        return Task::Vision(image_name(image));
    }
    for text in &texts {
        if let Some(rule_at) = text.find("Disposal rule: ") {
            let category = text
                .lines()
                .find_map(|l| l.strip_prefix("Category: "))
                .unwrap_or("unknown")
                .trim()
                .to_string();
            let rule = serde_json::from_str(text[rule_at + "Disposal rule: ".len()..].trim())
                .unwrap_or(Value::Null);
            return Task::Answer { category, rule };
        }
    }
    for text in &texts {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if let (Some(expected), Some(given)) = (field("Expected answer:"), field("Given answer:")) {
            return Task::Judge { expected, given };
        }
    }
    let last = texts.last().copied().unwrap_or_default();
    Task::Echo(
        answers
            .get(last.trim())
            .cloned()
            .unwrap_or_else(|| format!("Mock answer: {last}")),
    )
}

/// What the mock "sees" in an image: the URL's file name, or a data URL's decoded text.
fn image_name(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("data:") {
        let data = rest.split_once(",").map(|(_, d)| d).unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_default();
        return match String::from_utf8(bytes) {
            Ok(text) => text.to_lowercase(),
            Err(e) => hex(&Sha256::digest(e.as_bytes())),
        };
    }
    url.rsplit('/').next().unwrap_or(url).to_lowercase()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keyword -> category, first match wins (so `pet_bottle` is PET, not glass).
const KEYWORDS: &[(&str, (&str, &str, &str))] = &[
    ("pet", ("recyclable", "plastic", "pet_bottle")),
    ("yogurt", ("recyclable", "plastic", "other_plastic")),
    ("container", ("recyclable", "plastic", "other_plastic")),
    ("carton", ("recyclable", "paper", "paper_pack")),
    ("newspaper", ("recyclable", "paper", "paper")),
    ("cardboard", ("recyclable", "paper", "paper")),
    ("box", ("recyclable", "paper", "paper")),
    ("can", ("recyclable", "metal", "can")),
    ("glass", ("recyclable", "glass", "glass_bottle")),
    ("soju", ("recyclable", "glass", "glass_bottle")),
    ("vinyl", ("recyclable", "vinyl", "vinyl")),
    ("wrapper", ("recyclable", "vinyl", "vinyl")),
    ("styrofoam", ("recyclable", "styrofoam", "styrofoam")),
    ("banana", ("food_waste", "food", "food_waste")),
    ("leftover", ("food_waste", "food", "food_waste")),
    ("battery", ("hazardous", "battery", "battery")),
    ("lamp", ("hazardous", "lighting", "fluorescent_lamp")),
    ("tissue", ("general_waste", "general", "general_waste")),
    ("receipt", ("general_waste", "general", "general_waste")),
    ("alien", ("general_waste", "mystery", "alien_artifact")),
];

fn categorise(name: &str) -> (&'static str, &'static str, &'static str) {
    if let Some((_, category)) = KEYWORDS.iter().find(|(keyword, _)| name.contains(keyword)) {
        return *category;
    }
    // Unknown pictures still get a stable, valid category.
    let known: Vec<_> = KEYWORDS.iter().filter(|(k, _)| *k != "alien").collect();
    let hash = Sha256::digest(name.as_bytes());
    known[hash[0] as usize % known.len()].1
}

fn answer(category: &str, rule: &Value) -> String {
    let steps: Vec<String> = rule
        .get("steps")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .filter(|s: &Vec<String>| !s.is_empty())
        .unwrap_or_else(|| vec!["Check your local disposal rules.".to_string()]);
    let label = rule
        .get("label")
        .and_then(Value::as_str)
        .unwrap_or(category);
    let bin = rule
        .get("bin")
        .and_then(Value::as_str)
        .unwrap_or("the right bin");
    let answer = format!("This is {label}. {} Then put it in {bin}.", steps[0]);
    json!({ "steps": steps, "answer": answer }).to_string()
}

async fn models() -> Json<Value> {
    Json(
        json!({ "object": "list", "data": [{ "id": "mock-1", "object": "model", "owned_by": "stagehand" }] }),
    )
}

async fn get_config(State(mock): State<Arc<Mock>>) -> Json<Behaviour> {
    Json(mock.behaviour.lock().expect("not poisoned").0.clone())
}

/// Change some settings: the body's fields replace the current ones, the rest stay.
async fn set_config(State(mock): State<Arc<Mock>>, Json(patch): Json<Value>) -> Response {
    let mut guard = mock.behaviour.lock().expect("not poisoned");
    let mut merged = serde_json::to_value(&guard.0).expect("settings serialise");
    let Some(fields) = patch.as_object() else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "expected a JSON object of settings",
        );
    };
    for (key, value) in fields {
        merged[key] = value.clone();
    }
    match serde_json::from_value::<Behaviour>(merged) {
        Ok(behaviour) => {
            guard.1 = fastrand::Rng::with_seed(behaviour.seed);
            guard.0 = behaviour.clone();
            Json(behaviour).into_response()
        }
        Err(e) => openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("invalid settings: {e}"),
        ),
    }
}

async fn stats(State(mock): State<Arc<Mock>>) -> Json<Value> {
    Json(serde_json::to_value(&mock.stats).expect("counters serialise"))
}
