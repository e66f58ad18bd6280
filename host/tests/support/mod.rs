//! Shared by the host's integration tests: pipelines over the guests built by `cargo xtask
//! plugins`, in a temporary folder.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use stagehand::config::PipelineConfig;
use stagehand::jobs::item::{ItemLimits, ItemRef, run_item};
use stagehand::model::{ItemResult, JobRecord};
use stagehand::pipeline::Pipeline;
use stagehand::store::Store;
use tokio_util::sync::CancellationToken;

/// Where `cargo xtask plugins` puts the guests.
pub fn plugins_dir() -> PathBuf {
    let dir = std::env::var_os("STAGEHAND_PLUGINS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release")
        });
    assert!(
        dir.join("hostile.wasm").is_file(),
        "no guests in {}: run `cargo xtask plugins` (or `cargo xtask test`)",
        dir.display()
    );
    dir
}

pub fn plugin(name: &str) -> String {
    plugins_dir()
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

/// A pipeline file in a fresh folder, with the store and compile cache beside it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write fixture file");
        path
    }

    /// `body` goes after a `name` and an `[llm]` section that points nowhere.
    pub fn config(&self, body: &str) -> PipelineConfig {
        let text = format!(
            "name = \"test\"\n[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n{body}"
        );
        let path = self.write("pipeline.toml", &text);
        PipelineConfig::load(&path).expect("a valid pipeline")
    }

    pub async fn load(&self, config: PipelineConfig) -> Arc<Pipeline> {
        let store = Store::open(&self.dir.path().join("store")).expect("open store");
        let resources =
            stagehand::pipeline::NodeResources::for_one(&config, self.dir.path(), store)
                .expect("resources");
        Pipeline::load(config, String::new(), &resources)
            .await
            .expect("load pipeline")
    }
}

/// Run one item through `pipeline` as item 0 of a new job.
pub async fn run_one(pipeline: &Pipeline, item: &str, cancel: &CancellationToken) -> ItemResult {
    run_one_with(pipeline, item, ItemLimits::default(), cancel).await
}

/// [`run_one`] with a job's time limits.
pub async fn run_one_with(
    pipeline: &Pipeline,
    item: &str,
    limits: ItemLimits,
    cancel: &CancellationToken,
) -> ItemResult {
    let job = JobRecord::new("test");
    let item_ref = ItemRef {
        job_id: job.id,
        item_id: job.item_id(0),
        index: 0,
    };
    run_item(
        pipeline,
        item_ref,
        item.as_bytes().into(),
        false,
        limits,
        cancel,
        &Default::default(),
    )
    .await
    .expect("the host itself does not fail")
}
