//! Benchmarks of issue 2 (figures in docs/BENCHMARKS.md). Run with `cargo xtask bench`, or
//! `cargo bench -p stagehand --bench pipeline -- [--items N] [--eco-items N]` after
//! `cargo xtask plugins` and `cargo build --release --workspace --bins`.
//!
//! (a) Host overhead: four pass-through stages, results persisted. Throughput over a batch of
//!     `--items` (default 100,000) and the latency of one item at idle (p50/p99 of 2,000 items
//!     run one after the other); the same with one stage, and the runtime's floor (one
//!     invocation in a loop, no job runner, no store) to show where the time goes.
//! (b) The eco-scan pipeline with the mock LLM answering at once: throughput over
//!     `--eco-items` (default 5,000) items.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stagehand::config::PipelineConfig;
use stagehand::jobs::{EffectRunner, ItemHooks, ItemRef, RunSettings, run_item, run_job};
use stagehand::model::JobRecord;
use stagehand::pipeline::{NodeResources, Pipeline, Pipelines, Revisions};
use stagehand::runtime::bindings::types::Context;
use stagehand::store::Store;
use stagehand_tests::{MockLlm, repo_root};
use tokio_util::sync::CancellationToken;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn plugins_dir() -> std::path::PathBuf {
    std::env::var_os("STAGEHAND_PLUGINS_DIR")
        .map(Into::into)
        .unwrap_or_else(|| repo_root().join("target/wasm32-wasip2/release"))
}

async fn load(config: PipelineConfig, dir: &Path) -> Arc<Pipeline> {
    load_with_resources(config, dir).await.0
}

async fn load_with_resources(config: PipelineConfig, dir: &Path) -> (Arc<Pipeline>, NodeResources) {
    let store = Store::open(&dir.join("store")).expect("store");
    let resources = NodeResources::for_one(&config, dir, store).expect("resources");
    let pipeline = Pipeline::load(config, String::new(), &resources)
        .await
        .expect("pipeline");
    (pipeline, resources)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// A pipeline of `stages` pass-through stages in `dir`.
async fn passthrough_pipeline(dir: &Path, stages: usize) -> Arc<Pipeline> {
    let stage = plugins_dir().join("passthrough.wasm");
    let stages: String = (1..=stages)
        .map(|i| {
            format!(
                "[[stage]]\nname = \"pass{i}\"\ncomponent = \"{}\"\n",
                stage.display()
            )
        })
        .collect();
    let text = format!(
        "name = \"passthrough\"\n[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n[run]\nconcurrency = 32\n{stages}"
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    load(PipelineConfig::load(&path).unwrap(), dir).await
}

/// The runtime's own floor: one stage invocation (fresh store, instantiate, call, drop) in a
/// loop, without the job runner or the store, on one task and then on two.
async fn runtime_floor(calls: u64) {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = passthrough_pipeline(dir.path(), 1).await;
    let invoke = |pipeline: Arc<Pipeline>, n: u64| async move {
        let input = r#"{"item":{"n":1,"text":"an item of modest size"},"stages":{}}"#;
        let stage = &pipeline.stages[0];
        for index in 0..n {
            let context = Context {
                job_id: "j".into(),
                item_id: "i".into(),
                item_index: index,
                attempt: 1,
                stage: "pass1".into(),
            };
            let call = pipeline.stage_call(context, stage.config.limits);
            stage.current().run(call, input).await.0.unwrap();
        }
    };
    let started = Instant::now();
    invoke(pipeline.clone(), calls).await;
    let one = started.elapsed();
    let started = Instant::now();
    let a = tokio::spawn(invoke(pipeline.clone(), calls / 2));
    let b = tokio::spawn(invoke(pipeline.clone(), calls / 2));
    a.await.unwrap();
    b.await.unwrap();
    let two = started.elapsed();
    println!(
        "runtime floor, one invocation: {:.1} us on one task; {:.0} invocations/s on two tasks",
        one.as_secs_f64() * 1e6 / calls as f64,
        calls as f64 / two.as_secs_f64()
    );
}

async fn passthrough(items: u64, stages: usize) {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = passthrough_pipeline(dir.path(), stages).await;
    let store = pipeline.store().clone();

    // Latency of one item at idle.
    let cancel = CancellationToken::new();
    let job = store
        .create_job(JobRecord::new("latency"), std::iter::empty())
        .await
        .unwrap();
    let mut latencies = Vec::new();
    for index in 0..2_000u64 {
        let input = format!("{{\"n\":{index},\"text\":\"an item of modest size\"}}");
        let started = Instant::now();
        let item = ItemRef {
            job_id: job.id,
            item_id: job.item_id(index),
            index,
        };
        run_item(
            &pipeline,
            item,
            input.as_bytes().into(),
            false,
            Default::default(),
            &cancel,
            &ItemHooks::default(),
        )
        .await
        .unwrap();
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "passthrough x{stages}, one item at idle: p50 {:.3} ms, p99 {:.3} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );

    // Throughput of a batch.
    let started = Instant::now();
    let inputs = (0..items)
        .map(|n| Ok(format!("{{\"n\":{n},\"text\":\"an item of modest size\"}}").into_bytes()));
    let job = store
        .create_job(JobRecord::new("batch"), inputs)
        .await
        .unwrap();
    let submitted = started.elapsed();
    let started = Instant::now();
    let outcome = run_job(
        pipeline.clone(),
        job,
        RunSettings::fresh(32),
        cancel,
        ItemHooks::default(),
        |_| {},
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(outcome.job.succeeded, items);
    println!(
        "passthrough x{stages}, batch of {items}: {:.0} items/s ({:.2} s; writing the items took {:.2} s)",
        items as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        submitted.as_secs_f64()
    );
}

async fn eco_scan(items: u64) {
    let mock = MockLlm::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        PipelineConfig::load(&repo_root().join("examples/eco-scan/pipeline.toml")).unwrap();
    config.llm.point_all_at(&mock.base_url());
    let (pipeline, resources) = load_with_resources(config, dir.path()).await;
    let example =
        std::fs::read_to_string(repo_root().join("examples/eco-scan/items.jsonl")).unwrap();
    let lines: Vec<&str> = example.lines().collect();
    let inputs = (0..items as usize).map(|i| Ok(lines[i % lines.len()].as_bytes().to_vec()));
    let job = pipeline
        .store()
        .create_job(JobRecord::new("eco"), inputs)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let revisions = Revisions::open(&resources.store, dir.path(), None).expect("revisions");
    let pipelines = Arc::new(Pipelines::new(
        [pipeline.clone()],
        revisions,
        resources.clone(),
    ));
    let (effects, task) = EffectRunner::spawn(&resources, pipelines, shutdown.clone());
    let started = Instant::now();
    let concurrency = pipeline.config.run.concurrency;
    let outcome = run_job(
        pipeline.clone(),
        job,
        RunSettings::fresh(concurrency),
        CancellationToken::new(),
        ItemHooks::default(),
        |_| {},
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    effects.wait_idle().await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(outcome.job.succeeded, items);
    println!(
        "eco-scan (mock LLM, no latency), batch of {items}: {:.0} items/s ({:.2} s, {} LLM requests)",
        items as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        mock.stats()["requests"]
    );
}

fn main() {
    // `cargo bench` passes `--bench`; only our own flags matter.
    let items = arg("--items", 100_000);
    let eco_items = arg("--eco-items", 5_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        runtime_floor(20_000).await;
        passthrough(items, 1).await;
        passthrough(items, 4).await;
        eco_scan(eco_items).await;
    });
}
