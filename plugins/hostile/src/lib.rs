//! A stage that misbehaves on request, for the runtime's tests: the item's `do` field says how
//! (`flaky` fails retryably until try `until`).

use serde::Deserialize;
use stagehand_sdk::{Context, Envelope, StageError, fatal, log, output, retryable, stage::Guest};

#[derive(Deserialize)]
struct Item {
    #[serde(rename = "do")]
    action: String,
    #[serde(default)]
    size: usize,
    /// For `flaky`: the first try that succeeds.
    #[serde(default)]
    until: u32,
    /// For `socket`: the address to connect to.
    #[serde(default)]
    target: String,
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
