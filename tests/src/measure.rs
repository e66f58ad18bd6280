//! What the benchmarks measure with: percentiles, a process's memory and CPU, and an async
//! client's way to submit a job and wait for it.

use std::time::{SystemTime, UNIX_EPOCH};

/// `p` (0..1) of sorted milliseconds.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most resident memory a process has held at once, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// A `kB` field of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// CPU time a process has used (user + system), in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The value after `name` on the benchmark's command line (`--vus 300`).
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// `POST /v1/jobs` of `items` at `concurrency` on the server at `url`: the job's id.
pub async fn submit_job_async(
    http: &reqwest::Client,
    url: &str,
    items: Vec<serde_json::Value>,
    concurrency: u64,
) -> String {
    let response = http
        .post(format!("{url}/v1/jobs"))
        .json(&serde_json::json!({ "items": items, "options": { "concurrency": concurrency } }))
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let body: serde_json::Value = response.json().await.expect("JSON");
    body["job_id"].as_str().expect("a job id").to_string()
}

/// Poll the job until it ends, calling `sample` every 200 ms; its final status.
/// `GET url` as JSON.
pub async fn get_json_async(http: &reqwest::Client, url: &str) -> serde_json::Value {
    http.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

pub async fn wait_job_async(
    http: &reqwest::Client,
    url: &str,
    job: &str,
    mut sample: impl FnMut(&serde_json::Value),
) -> serde_json::Value {
    loop {
        let status = get_json_async(http, &format!("{url}/v1/jobs/{job}")).await;
        sample(&status);
        if status["state"] != "running" {
            return status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
