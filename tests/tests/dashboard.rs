//! The dashboard at `/`, driven in headless Chromium through WebDriver (Debian's `chromium` and
//! `chromium-driver`, which `cargo xtask test` installs): the jobs list, a job followed live
//! and cancelled, results paged, the time per stage, a dead letter reprocessed and discarded, a
//! stage uploaded and rolled back, another tried as a canary and promoted, the jobs list paged
//! older and newer and filtered by state; all with tokens, and nothing loaded from outside the
//! server.
//! Screenshots are kept in `target/test-artifacts/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use stagehand_tests::{
    MockLlm, Server, eco_items, plugin_bytes, prompt_eval_pipeline, repo_root, serve,
    serve_eco_scan, with_custom_section,
};

const API: &str = "dashboard-api-token";
const ADMIN: &str = "dashboard-admin-token";

/// `chromedriver` on a free port; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let driver = Path::new("/usr/bin/chromedriver");
        assert!(
            driver.is_file(),
            "Debian's chromium-driver is missing: `cargo xtask test` installs it \
             (apt-get install chromium-driver)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--no-first-run", "--disable-background-networking",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    // chromedriver is on loopback: plain HTTP, no TLS stack needed.
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session")
}

/// Wait until the JavaScript expression is true; its last value on failure.
async fn until(browser: &Client, what: &str, expression: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let script = format!("return ({expression});");
    loop {
        let value = browser.execute(&script, vec![]).await.unwrap();
        if value == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let banner = text_of(browser, "#banner").await;
            panic!("{what}: `{expression}` is {value} (banner: {banner:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(browser: &Client, selector: &str) -> String {
    let script =
        format!("const e = document.querySelector({selector:?}); return e ? e.textContent : null;");
    browser
        .execute(&script, vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn click(browser: &Client, selector: &str) {
    browser
        .find(Locator::Css(selector))
        .await
        .unwrap_or_else(|e| panic!("no {selector}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn screenshot(browser: &Client, name: &str) {
    let artifacts = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = browser.screenshot().await.unwrap();
    assert!(png.len() > 1000, "a real screenshot");
    std::fs::write(artifacts.join(name), png).unwrap();
}

fn submit(server: &Server, items: Vec<Value>, options: Value) -> String {
    let answer: Value = stagehand_tests::client()
        .post(server.url("/v1/jobs"))
        .bearer_auth(API)
        .json(&json!({ "items": items, "options": options }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    answer["job_id"].as_str().unwrap().to_string()
}

fn http_get(server: &Server, path: &str) -> Value {
    stagehand_tests::client()
        .get(server.url(path))
        .bearer_auth(API)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_cancels_pages_reprocesses_and_swaps() {
    let mock = MockLlm::start(&["--latency-ms", "150", "--vision-latency-ms", "150"]);
    let dir = tempfile::tempdir().unwrap();
    let server = serve_eco_scan(
        &mock,
        &dir.path().join("data"),
        &["--api-token", API, "--admin-token", ADMIN],
    );
    let driver = Driver::start();
    let browser = browser(&driver, &dir.path().join("profile")).await;

    // Without a token the page loads but the API refuses, and the page says so.
    browser.goto(&server.url("/")).await.unwrap();
    until(
        &browser,
        "the refusal is shown",
        "document.querySelector('#banner').textContent.includes('bearer token')",
    )
    .await;
    // The operator's token: the admin token passes everywhere.
    let field = browser.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(ADMIN).await.unwrap();
    click(&browser, "#token-save").await;

    // A long job appears in the list; its page follows it live over SSE (the cookie carries the
    // token for EventSource), then Cancel stops it.
    let long = submit(&server, eco_items(60), json!({ "concurrency": 2 }));
    let row = format!("#jobs tr[data-job='{long}']");
    until(
        &browser,
        "the job is listed",
        &format!("document.querySelector(\"{row}\") !== null"),
    )
    .await;
    click(&browser, &row).await;
    until(&browser, "live progress", "document.querySelector('#job-progress').value > 0 && document.querySelector('#job-state').textContent === 'running'").await;
    screenshot(&browser, "dashboard-job-running.png").await;
    click(&browser, "#cancel").await;
    until(
        &browser,
        "cancelled",
        "document.querySelector('#job-state').textContent === 'cancelled'",
    )
    .await;
    assert_eq!(
        http_get(&server, &format!("/v1/jobs/{long}"))["state"],
        "cancelled"
    );

    // A finished job with 26 items, one of which fails at `rule`: results in pages of 20, time
    // per stage for the four stages.
    let mut items = eco_items(25);
    items.push(json!({ "user_id": "u1", "image_url": "https://images.example/alien_thing.jpg" }));
    let job = submit(&server, items, json!({ "concurrency": 8 }));
    browser
        .goto(&server.url(&format!("/#/jobs/{job}")))
        .await
        .unwrap();
    until(
        &browser,
        "completed",
        "document.querySelector('#job-state').textContent === 'completed'",
    )
    .await;
    until(
        &browser,
        "first page",
        "document.querySelectorAll('#results tbody tr[data-index]').length === 20",
    )
    .await;
    assert_eq!(text_of(&browser, "#job-counts").await, "26 / 26 (1 failed)");
    until(
        &browser,
        "the job's LLM tokens",
        "/^[1-9][0-9]* LLM tokens$/.test(document.querySelector('#job-tokens').textContent)",
    )
    .await;
    until(&browser, "stage times", "document.querySelectorAll('#stage-times tbody tr').length === 4 && document.querySelector('#stage-times tr[data-stage=vision] td:nth-child(2)').textContent === '26'").await;
    let shares: f64 = browser
        .execute("return [...document.querySelectorAll('#stage-times td.share')].reduce((s, td) => s + parseFloat(td.textContent), 0);", vec![])
        .await
        .unwrap()
        .as_f64()
        .unwrap();
    assert!((shares - 100.0).abs() < 0.5, "shares add up to {shares}");
    screenshot(&browser, "dashboard-job.png").await;
    click(&browser, "#results-next").await;
    until(&browser, "second page", "document.querySelectorAll('#results tbody tr[data-index]').length === 6 && document.querySelector('#results tbody tr').dataset.index === '20'").await;
    assert!(
        text_of(&browser, "#results tr[data-index='25']")
            .await
            .contains("unknown category")
    );
    click(&browser, "#results-prev").await;
    until(
        &browser,
        "back to the first page",
        "document.querySelector('#results tbody tr').dataset.index === '0'",
    )
    .await;

    // Its dead letter: reprocessed (it fails again, so it stays with one more reprocess), then
    // discarded.
    browser
        .goto(&server.url(&format!("/#/dead-letters?job={job}")))
        .await
        .unwrap();
    let letter = format!("#dead-letters tr[data-key='{job}/25']");
    until(
        &browser,
        "the dead letter",
        &format!("document.querySelector(\"{letter}\") !== null"),
    )
    .await;
    click(&browser, &format!("{letter} button.reprocess")).await;
    until(
        &browser,
        "reprocessed",
        &format!("document.querySelector(\"{letter} td.reprocessed\")?.textContent === '1'"),
    )
    .await;
    screenshot(&browser, "dashboard-dead-letters.png").await;
    click(&browser, &format!("{letter} button.discard")).await;
    until(&browser, "discarded", &format!("document.querySelector(\"{letter}\") === null && document.querySelector('#banner').textContent.includes('discarded')")).await;
    let left = http_get(&server, &format!("/v1/dead-letters?job={job}"));
    assert_eq!(left["dead_letters"], json!([]), "{left}");

    // Stages: upload a new `answer` (same code, another digest), then roll back.
    browser.goto(&server.url("/#/pipelines")).await.unwrap();
    let answer_row = "#pipelines section[data-pipeline=eco-scan] tr[data-stage=answer]";
    until(
        &browser,
        "stages listed",
        &format!("document.querySelector('{answer_row} code.current') !== null"),
    )
    .await;
    let original = current_digest(&server, "answer");
    let new_wasm: PathBuf = dir.path().join("answer-v2.wasm");
    std::fs::write(
        &new_wasm,
        with_custom_section(plugin_bytes("answer"), "dashboard-v2"),
    )
    .unwrap();
    browser
        .find(Locator::Css(&format!("{answer_row} input.upload-file")))
        .await
        .unwrap()
        .send_keys(new_wasm.to_str().unwrap())
        .await
        .unwrap();
    click(&browser, &format!("{answer_row} button.upload")).await;
    until(
        &browser,
        "uploaded",
        &format!("document.querySelector('{answer_row} code.current').title !== '{original}'"),
    )
    .await;
    let uploaded = current_digest(&server, "answer");
    assert_ne!(uploaded, original);
    assert_eq!(
        text_of(&browser, &format!("{answer_row} code.current")).await,
        uploaded[..12]
    );
    screenshot(&browser, "dashboard-stages.png").await;
    click(&browser, &format!("{answer_row} button.rollback")).await;
    until(
        &browser,
        "rolled back",
        &format!("document.querySelector('{answer_row} code.current').title === '{original}'"),
    )
    .await;
    assert_eq!(current_digest(&server, "answer"), original);

    // A canary: upload another `answer` on trial for 30 %, then promote it.
    let canary_wasm = dir.path().join("answer-v3.wasm");
    std::fs::write(
        &canary_wasm,
        with_custom_section(plugin_bytes("answer"), "dashboard-v3"),
    )
    .unwrap();
    browser
        .find(Locator::Css(&format!("{answer_row} input.upload-file")))
        .await
        .unwrap()
        .send_keys(canary_wasm.to_str().unwrap())
        .await
        .unwrap();
    browser
        .find(Locator::Css(&format!("{answer_row} input.canary-percent")))
        .await
        .unwrap()
        .send_keys("30")
        .await
        .unwrap();
    click(&browser, &format!("{answer_row} button.upload")).await;
    until(
        &browser,
        "on trial",
        &format!("document.querySelector('{answer_row} code.canary') !== null"),
    )
    .await;
    let answer = stage(&server, "answer");
    assert_eq!(answer["current"]["digest"], original.as_str(), "{answer}");
    assert_eq!(answer["canary"]["percent"], 30, "{answer}");
    let trial = answer["canary"]["digest"].as_str().unwrap().to_string();
    assert_ne!(trial, original);
    assert_eq!(
        text_of(&browser, &format!("{answer_row} code.canary")).await,
        trial[..12]
    );
    screenshot(&browser, "dashboard-canary.png").await;
    click(&browser, &format!("{answer_row} button.promote")).await;
    until(
        &browser,
        "promoted",
        &format!(
            "document.querySelector('{answer_row} code.current').title === '{trial}' \
             && document.querySelector('{answer_row} code.canary') === null"
        ),
    )
    .await;
    let answer = stage(&server, "answer");
    assert_eq!(answer["current"]["digest"], trial.as_str(), "{answer}");
    assert!(answer["canary"].is_null(), "{answer}");

    // The jobs list: 28 more jobs make 30, two pages of 25 newest first; the state filter.
    // Blocking requests inside this async test spend tokio's cooperative budget, and once it is
    // spent reqwest's blocking wait spins forever: yield after each one to renew it.
    let mut quick = Vec::new();
    for _ in 0..28 {
        quick.push(submit(&server, eco_items(1), json!({})));
        tokio::task::yield_now().await;
    }
    for id in &quick {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(&server, &format!("/v1/jobs/{id}"))["state"] == "running" {
            assert!(Instant::now() < deadline, "job {id} did not end");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::yield_now().await;
    }
    browser.goto(&server.url("/#/jobs")).await.unwrap();
    let rows = "[...document.querySelectorAll('#jobs tbody tr[data-job]')].map(r => r.dataset.job)";
    let newest: Vec<&str> = quick.iter().rev().map(String::as_str).take(25).collect();
    until(
        &browser,
        "the newest 25",
        &format!("JSON.stringify({rows}) === '{}'", json!(newest)),
    )
    .await;
    assert!(
        browser
            .execute(
                "return document.querySelector('#jobs-newer').disabled;",
                vec![]
            )
            .await
            .unwrap()
            == Value::Bool(true)
    );
    click(&browser, "#jobs-older").await;
    let oldest = json!([quick[2], quick[1], quick[0], job, long]);
    until(
        &browser,
        "the older page",
        &format!("JSON.stringify({rows}) === '{oldest}' && document.querySelector('#jobs-older').disabled"),
    )
    .await;
    click(&browser, "#jobs-newer").await;
    until(
        &browser,
        "back to the newest",
        &format!("JSON.stringify({rows}) === '{}'", json!(newest)),
    )
    .await;
    browser
        .find(Locator::Css("#state-filter"))
        .await
        .unwrap()
        .select_by_value("cancelled")
        .await
        .unwrap();
    until(
        &browser,
        "only the cancelled job",
        &format!("JSON.stringify({rows}) === '{}'", json!([long])),
    )
    .await;
    screenshot(&browser, "dashboard-jobs-cancelled.png").await;

    // Offline: every resource the page loaded came from the server itself.
    let foreign = browser
        .execute("return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith(location.origin));", vec![])
        .await
        .unwrap();
    assert_eq!(foreign, json!([]));
    browser.close().await.unwrap();
}

fn stage(server: &Server, name: &str) -> Value {
    let stages = http_get(server, "/v1/stages");
    stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
        .clone()
}

fn current_digest(server: &Server, name: &str) -> String {
    stage(server, name)["current"]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// With two pipelines: the Pipelines page shows each with its revision and stages, a stage
/// uploaded there changes its own pipeline only, and the jobs list filters by pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_each_pipeline_and_filters_jobs_by_pipeline() {
    let answers = repo_root().join("examples/prompt-eval/answers.json");
    let mock = MockLlm::start(&["--answers", &answers.display().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let prompt_eval = prompt_eval_pipeline(dir.path());
    let server = serve(
        &repo_root().join("examples/eco-scan/pipeline.toml"),
        &dir.path().join("data"),
        Some(&mock),
        &[prompt_eval.to_str().unwrap(), "--admin-token", ADMIN],
    );
    let submit_to = |pipeline: &str, item: Value| -> String {
        let answer: Value = stagehand_tests::client()
            .post(server.url(&format!("/v1/pipelines/{pipeline}/jobs")))
            .json(&json!({ "items": [item] }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        answer["job_id"].as_str().unwrap().to_string()
    };
    let eco = submit_to("eco-scan", eco_items(1).remove(0));
    tokio::task::yield_now().await;
    let cases =
        std::fs::read_to_string(repo_root().join("examples/prompt-eval/cases.jsonl")).unwrap();
    let case: Value = serde_json::from_str(cases.lines().next().unwrap()).unwrap();
    let eval = submit_to("prompt-eval", case);
    tokio::task::yield_now().await;
    let driver = Driver::start();
    let browser = browser(&driver, &dir.path().join("profile")).await;
    browser.goto(&server.url("/")).await.unwrap();
    let field = browser.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(ADMIN).await.unwrap();
    click(&browser, "#token-save").await;

    browser.goto(&server.url("/#/pipelines")).await.unwrap();
    let eval_section = "#pipelines section[data-pipeline=prompt-eval]";
    until(
        &browser,
        "both pipelines with their stages",
        &format!(
            "document.querySelector('{eval_section} tr[data-stage=grade] code.current') !== null \
             && document.querySelector('#pipelines section[data-pipeline=eco-scan] tr[data-stage=vision]') !== null"
        ),
    )
    .await;
    let revision = http_get(&server, "/v1/pipelines/prompt-eval")["revision"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        text_of(&browser, &format!("{eval_section} code.revision")).await,
        revision[..12]
    );
    let grade_row = format!("{eval_section} tr[data-stage=grade]");
    let original =
        http_get(&server, "/v1/stages?pipeline=prompt-eval")["stages"][1]["current"]["digest"]
            .clone();
    let eco_before = http_get(&server, "/v1/stages?pipeline=eco-scan");
    let new_wasm = dir.path().join("grade-v2.wasm");
    std::fs::write(
        &new_wasm,
        with_custom_section(plugin_bytes("grade"), "dashboard-pipelines"),
    )
    .unwrap();
    browser
        .find(Locator::Css(&format!("{grade_row} input.upload-file")))
        .await
        .unwrap()
        .send_keys(new_wasm.to_str().unwrap())
        .await
        .unwrap();
    click(&browser, &format!("{grade_row} button.upload")).await;
    until(
        &browser,
        "uploaded to prompt-eval",
        &format!("document.querySelector('{grade_row} code.current').title !== {original}"),
    )
    .await;
    let after = http_get(&server, "/v1/stages?pipeline=prompt-eval");
    assert_eq!(after["stages"][1]["name"], "grade");
    assert_ne!(after["stages"][1]["current"]["digest"], original);
    assert_eq!(
        http_get(&server, "/v1/stages?pipeline=eco-scan"),
        eco_before,
        "the other pipeline is untouched"
    );
    screenshot(&browser, "dashboard-pipelines.png").await;

    browser.goto(&server.url("/#/jobs")).await.unwrap();
    let rows = "[...document.querySelectorAll('#jobs tbody tr[data-job]')].map(r => r.dataset.job)";
    until(
        &browser,
        "both jobs",
        &format!(
            "{rows}.length === 2 && document.querySelector('#pipeline-filter').options.length === 3"
        ),
    )
    .await;
    browser
        .find(Locator::Css("#pipeline-filter"))
        .await
        .unwrap()
        .select_by_value("prompt-eval")
        .await
        .unwrap();
    until(
        &browser,
        "only the prompt-eval job",
        &format!("JSON.stringify({rows}) === '{}'", json!([eval])),
    )
    .await;
    assert_eq!(
        text_of(
            &browser,
            &format!("#jobs tr[data-job='{eval}'] td.pipeline")
        )
        .await,
        "prompt-eval"
    );
    assert_ne!(eco, eval);
    browser.close().await.unwrap();
}
