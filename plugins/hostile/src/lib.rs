//! A stage that misbehaves on request, for the runtime's tests and the hostile suite: the item's
//! `do` field says how (`flaky` fails retryably until try `until`). The floods do what an
//! attacker's stage would within one try: `size` log lines, emits, LLM calls, `dispatch.call`s
//! or kv key bytes, an output `size` levels deep, or recursion until the stack runs out.

use serde::Deserialize;
use stagehand_sdk::{
    Context, Envelope, StageError, config, dispatch, fatal, kv, llm, log, output, progress,
    retryable, stage::Guest, text_message,
};

#[derive(Deserialize)]
struct Item {
    #[serde(rename = "do")]
    action: String,
    #[serde(default)]
    size: usize,
    /// For `flaky` and `questions`: the first try that succeeds.
    #[serde(default)]
    until: u32,
    /// For `socket`: the address to connect to; for `emit-flood` and `call-flood`: the handler;
    /// for `config`: the setting to read; for `fetch`: the URL.
    #[serde(default)]
    target: String,
    /// For `fetch`: the method (GET when empty), headers and body of each request.
    #[serde(default)]
    method: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: String,
}

/// A guest-side stack overflow: each frame keeps a little memory alive.
#[inline(never)]
fn recurse(depth: u64, pad: &mut [u8; 256]) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    pad[(depth % 256) as usize] = depth as u8;
    let mut next = [0u8; 256];
    next.copy_from_slice(pad);
    recurse(std::hint::black_box(depth + 1), &mut next) + u64::from(next[0])
}

/// Numbers from both of WASI's random sources: `insecure-seed` (std seeds hash maps with it)
/// and `random` (what `getrandom`, so UUIDs and keys, read).
fn random_number() -> u64 {
    use std::hash::BuildHasher;
    let hashed = std::collections::hash_map::RandomState::new().hash_one("seeded");
    hashed ^ getrandom::u64().unwrap_or(0)
}

/// Every kind of host call, in an order where each depends on the one before: what a replay
/// must reproduce exactly. Its output shows everything the stage saw.
fn journal(ctx: &Context, handler: &str) -> Result<String, StageError> {
    let ask = |text: String| llm::ChatRequest {
        model: None,
        messages: vec![text_message(llm::Role::User, text)],
        max_tokens: Some(32),
        temperature: None,
        json_mode: false,
    };
    let random = random_number();
    stagehand_sdk::log(log::Level::Info, "journal: starting");
    progress::report(0.1, "starting");
    let rule = kv::get("disposal_rules", "glass").map_err(|e| fatal(format!("{e:?}")))?;
    let first = llm::chat(&ask(format!("first question, random {random}")))?;
    progress::report(0.5, "asked once");
    let second = llm::chat_stream(&ask(format!("second question after {:?}", first.text)))?;
    let payload = serde_json::json!({ "category": { "major": "glass", "middle": "bottle", "minor": "clear" }, "text": second.text });
    let emitted = dispatch::emit(
        handler,
        &payload.to_string(),
        &format!("{}:journal", ctx.item_id),
    );
    let called = dispatch::call(handler, &payload.to_string());
    let third = llm::chat(&ask(format!("third question after {called:?}")))?;
    stagehand_sdk::log(log::Level::Info, "journal: done");
    output(&serde_json::json!({
        "random": random,
        "random_after": random_number(),
        "rule": rule,
        "first": first.text,
        "second": second.text,
        "third": third.text,
        "emitted": format!("{emitted:?}"),
        "called": format!("{called:?}"),
    }))
}

/// `size` questions to the LLM, each after the answer to the one before, then a retryable
/// failure while the try is before `until` (the guest did not like the answers): what a retry
/// may reuse and what it must ask again. No randomness, so every try asks the same.
fn questions(ctx: &Context, size: usize, until: u32) -> Result<String, StageError> {
    let mut answers = Vec::with_capacity(size);
    for question in 1..=size {
        let request = llm::ChatRequest {
            model: None,
            messages: vec![text_message(
                llm::Role::User,
                format!("question {question} of item {}", ctx.item_index),
            )],
            max_tokens: Some(32),
            temperature: None,
            json_mode: false,
        };
        answers.push(llm::chat(&request)?.text);
    }
    if ctx.attempt < until {
        return Err(retryable(format!(
            "try {} does not like the answers",
            ctx.attempt
        )));
    }
    output(&serde_json::json!({ "answers": answers, "attempt": ctx.attempt }))
}

struct Hostile;

impl Guest for Hostile {
    fn run(ctx: Context, input: String) -> Result<String, StageError> {
        let item = Envelope::<Item>::parse(&input)?.item;
        match item.action.as_str() {
            "echo" => output(&serde_json::json!({ "echo": item.action })),
            "trap" => panic!("hostile stage asked to trap"),
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "spin" => {
                // `size` million steps of busy work, then done: a guest that needs some CPU.
                let mut n: u64 = 0;
                for _ in 0..item.size as u64 * 1_000_000 {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
                output(&serde_json::json!({ "spun": n }))
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "big-output" => Ok("x".repeat(item.size)),
            "env" => output(
                &serde_json::json!({ "vars": std::env::vars().count(), "home": std::env::var("HOME").ok() }),
            ),
            "file" => match std::fs::read_to_string("/etc/passwd") {
                Ok(_) => Err(fatal("read a host file")),
                Err(e) => output(&serde_json::json!({ "file_error": e.to_string() })),
            },
            "socket" => match std::net::TcpStream::connect(&item.target) {
                Ok(_) => Err(fatal("opened a socket")),
                Err(e) => output(&serde_json::json!({ "socket_error": e.to_string() })),
            },
            "clock" => {
                let wall = || {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0)
                };
                let (wall_before, start) = (wall(), std::time::Instant::now());
                // Some milliseconds of work between the two readings.
                let mut n: u64 = 0;
                for _ in 0..20_000_000 {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
                output(&serde_json::json!({
                    "wall_ms": [wall_before, wall()],
                    "elapsed_ns": start.elapsed().as_nanos() as u64,
                    "n": n,
                }))
            }
            "log" => {
                stagehand_sdk::log(log::Level::Info, "hello from a guest");
                output(&serde_json::json!({ "logged": true }))
            }
            "log-flood" => {
                let line = "x".repeat(1024);
                for _ in 0..item.size {
                    stagehand_sdk::log(log::Level::Warn, &line);
                }
                output(&serde_json::json!({ "logged": item.size }))
            }
            "emit-flood" => {
                let payload = serde_json::json!({ "pad": "x".repeat(10_000) }).to_string();
                for n in 0..item.size {
                    let key = format!("{}:{n}", ctx.item_id);
                    let _ = dispatch::emit(&item.target, &payload, &key);
                }
                output(&serde_json::json!({ "emitted": item.size }))
            }
            "call-flood" => {
                for _ in 0..item.size {
                    let _ = dispatch::call(&item.target, "{}");
                }
                output(&serde_json::json!({ "called": item.size }))
            }
            "llm-loop" => {
                let request = llm::ChatRequest {
                    model: None,
                    messages: vec![text_message(llm::Role::User, "say something")],
                    max_tokens: Some(16),
                    temperature: None,
                    json_mode: false,
                };
                for _ in 0..item.size {
                    let _ = llm::chat(&request);
                }
                output(&serde_json::json!({ "calls": item.size }))
            }
            "llm-once" => {
                let request = llm::ChatRequest {
                    model: None,
                    messages: vec![text_message(llm::Role::User, "x".repeat(item.size))],
                    max_tokens: Some(16),
                    temperature: None,
                    json_mode: false,
                };
                let answer = llm::chat(&request)?;
                output(
                    &serde_json::json!({ "tokens": answer.usage.prompt_tokens + answer.usage.completion_tokens }),
                )
            }
            "deep-output" => Ok(format!(
                "{}{}",
                "[".repeat(item.size),
                "]".repeat(item.size)
            )),
            "huge-kv-key" => {
                let found = kv::get("rules", &"k".repeat(item.size))?;
                output(&serde_json::json!({ "found": found.is_some() }))
            }
            "fetch" => {
                // `size` requests in a row (at least one), each reported.
                let replies: Vec<serde_json::Value> = (0..item.size.max(1))
                    .map(|_| {
                        let method = if item.method.is_empty() {
                            "GET"
                        } else {
                            &item.method
                        };
                        let mut request = stagehand_sdk::http::Request::new(method, &item.target)
                            .body(item.body.as_bytes());
                        for (name, value) in &item.headers {
                            request = request.header(name, value);
                        }
                        match request.send() {
                            Ok(reply) => serde_json::json!({
                                "status": reply.status,
                                "body": reply.text(),
                                "headers": reply
                                    .headers
                                    .iter()
                                    .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
                                    .collect::<Vec<_>>(),
                            }),
                            Err(error) => serde_json::json!({ "error": error.to_string() }),
                        }
                    })
                    .collect();
                log::write(log::Level::Info, &format!("fetched: {replies:?}"));
                output(&serde_json::json!({ "replies": replies }))
            }
            "config" => {
                let value = match config::get(&item.target) {
                    Ok(value) => value,
                    Err(config::ConfigError::Missing(name)) => format!("no setting `{name}`"),
                };
                output(&serde_json::json!({ "value": value, "all": config::get_all() }))
            }
            "big-progress" => {
                progress::report(0.5, &"p".repeat(item.size));
                output(&serde_json::json!({ "reported": item.size }))
            }
            "deep-recursion" => {
                let mut pad = [0u8; 256];
                output(&serde_json::json!({ "depth": recurse(0, &mut pad) }))
            }
            "random" => output(&serde_json::json!({
                "hashed": std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 1),
                "random": getrandom::u64().map_err(fatal)?,
            })),
            "journal" => journal(&ctx, &item.target),
            "questions" => questions(&ctx, item.size.min(16), item.until),
            "retryable" => Err(retryable("asked to fail, retryably")),
            "flaky" if ctx.attempt < item.until => {
                Err(retryable(format!("try {} fails", ctx.attempt)))
            }
            "flaky" => output(&serde_json::json!({ "succeeded_at": ctx.attempt })),
            "fatal" => Err(fatal("asked to fail")),
            other => Err(fatal(format!("unknown action {other:?}"))),
        }
    }
}

stagehand_sdk::export_stage!(Hostile);
