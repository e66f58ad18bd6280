//! `stagehand-facts-service`: a small HTTP service that a stage looks facts up in, standing for
//! the search API, vector database or company service real pipelines call. It needs an API
//! key, so that the examples and tests show a secret held by the host.
//!
//! - `GET /facts?q=WORDS` (header `authorization: Bearer KEY`): facts whose topic is one of the
//!   words, as `{"query", "facts": [{"topic", "fact"}]}`; 401 without the key.
//! - `GET /sources?topics=T1,T2`: where each topic's fact comes from, as
//!   `{"sources": [{"topic", "title", "url"}]}`; no key needed.
//! - `GET|POST /echo`: the request's method, headers and body, as JSON (what a hostile
//!   service would do with a secret it was sent).
//! - `GET /redirect?to=URL`: a 302 to `URL`.
//! - `GET /bytes?n=N`: `N` bytes of `x` (at most 64 MiB).
//! - `GET /slow?ms=N`: answers after `N` ms (at most 10 minutes).
//! - `GET /admin/stats`: requests received per path, and the last `authorization` header seen.
//!
//! The key is read from the variable `--key-env` names (`FACTS_API_KEY` by default). The first
//! line on stdout is `listening on http://ADDR`, so that a parent process finds the port.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    name = "stagehand-facts-service",
    about = "A facts service with an API key"
)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:9200")]
    addr: SocketAddr,
    /// The variable that holds the API key clients must send.
    #[arg(long, default_value = "FACTS_API_KEY")]
    key_env: String,
}

struct Service {
    key: String,
    stats: Mutex<Stats>,
}

#[derive(Default)]
struct Stats {
    requests: BTreeMap<String, u64>,
    last_authorization: Option<String>,
}

/// What the service knows: topic -> fact.
const FACTS: &[(&str, &str)] = &[
    (
        "pet",
        "PET bottles are recycled into fibre and new bottles; rinse them and keep the cap on.",
    ),
    (
        "can",
        "Aluminium cans can be recycled endlessly; crush them to save space.",
    ),
    (
        "glass",
        "Glass jars go to the bottle bank by colour; lids go to metal.",
    ),
    (
        "battery",
        "Batteries must never go in household waste: shops that sell them take them back.",
    ),
    (
        "paper",
        "Paper and cardboard go to the paper bin, clean and dry.",
    ),
    (
        "organic",
        "Food scraps and garden waste become compost in the organic bin.",
    ),
];

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let key = std::env::var(&args.key_env)
        .with_context(|| format!("the API key: set `{}`", args.key_env))?;
    let service = Arc::new(Service {
        key,
        stats: Mutex::default(),
    });
    let app = Router::new()
        .route("/facts", get(facts))
        .route("/sources", get(sources))
        .route("/echo", get(echo).post(echo))
        .route("/redirect", get(redirect))
        .route("/bytes", get(bytes))
        .route("/slow", get(slow))
        .route("/admin/stats", get(stats))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{}", listener.local_addr()?)?;
    stdout.flush()?;
    drop(stdout);
    axum::serve(listener, app).await?;
    Ok(())
}

fn count(service: &Service, path: &str, headers: &HeaderMap) {
    let mut stats = service.stats.lock().expect("never poisoned");
    *stats.requests.entry(path.to_string()).or_default() += 1;
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        stats.last_authorization = Some(String::from_utf8_lossy(auth.as_bytes()).into_owned());
    }
}

#[derive(Deserialize)]
struct FactsQuery {
    #[serde(default)]
    q: String,
}

async fn facts(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Query(query): Query<FactsQuery>,
) -> Response {
    count(&service, "/facts", &headers);
    let expected = format!("Bearer {}", service.key);
    if headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "a valid `authorization: Bearer KEY` is required"})),
        )
            .into_response();
    }
    let words: Vec<String> = query
        .q
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let found: Vec<Value> = FACTS
        .iter()
        .filter(|(topic, _)| words.iter().any(|w| w == topic))
        .map(|(topic, fact)| json!({"topic": topic, "fact": fact}))
        .collect();
    Json(json!({"query": query.q, "facts": found})).into_response()
}

#[derive(Deserialize)]
struct SourcesQuery {
    #[serde(default)]
    topics: String,
}

async fn sources(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Query(query): Query<SourcesQuery>,
) -> Json<Value> {
    count(&service, "/sources", &headers);
    let sources: Vec<Value> = query
        .topics
        .split(',')
        .filter(|topic| FACTS.iter().any(|(known, _)| known == topic))
        .map(|topic| {
            json!({
                "topic": topic,
                "title": format!("Recycling guide: {topic}"),
                "url": format!("https://facts.example/guide/{topic}"),
            })
        })
        .collect();
    Json(json!({ "sources": sources }))
}

async fn echo(
    State(service): State<Arc<Service>>,
    method: Method,
    headers: HeaderMap,
    body: String,
) -> Json<Value> {
    count(&service, "/echo", &headers);
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    Json(json!({"method": method.as_str(), "headers": headers, "body": body}))
}

#[derive(Deserialize)]
struct RedirectQuery {
    to: String,
}

async fn redirect(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Query(query): Query<RedirectQuery>,
) -> Response {
    count(&service, "/redirect", &headers);
    (StatusCode::FOUND, [(header::LOCATION, query.to)]).into_response()
}

#[derive(Deserialize)]
struct BytesQuery {
    n: usize,
}

async fn bytes(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Query(query): Query<BytesQuery>,
) -> Response {
    count(&service, "/bytes", &headers);
    if query.n > 64 << 20 {
        return (StatusCode::BAD_REQUEST, "n is at most 67108864").into_response();
    }
    "x".repeat(query.n).into_response()
}

#[derive(Deserialize)]
struct SlowQuery {
    ms: u64,
}

async fn slow(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Query(query): Query<SlowQuery>,
) -> Response {
    count(&service, "/slow", &headers);
    if query.ms > 600_000 {
        return (StatusCode::BAD_REQUEST, "ms is at most 600000").into_response();
    }
    tokio::time::sleep(Duration::from_millis(query.ms)).await;
    "slow answer".into_response()
}

async fn stats(State(service): State<Arc<Service>>) -> Json<Value> {
    let stats = service.stats.lock().expect("never poisoned");
    Json(json!({
        "requests": stats.requests,
        "last_authorization": stats.last_authorization,
    }))
}
