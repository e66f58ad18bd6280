//! Stage versions installed by an operator while the server runs (hot swap), kept so that a
//! restart serves the same versions: the `.wasm` files in the node's [`Blobs`], and per stage
//! the current digest and the ones before it in the sled tree `stage_versions`, under
//! `<pipeline>/<stage>` (names have no `/`), with the pipeline revision they were installed on.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::pipeline::{Canary, KEPT_VERSIONS, Pipeline, Stage};
use crate::runtime::StageComponent;
use crate::store::{Blobs, Store};
use crate::watch::FileChanges;

/// What an install did.
pub struct Installed {
    pub version: Arc<StageComponent>,
    /// The version it replaced.
    pub replaced: String,
}

/// Why an install was refused: the old version keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no stage `{stage}` in pipeline `{pipeline}`")]
    UnknownStage { pipeline: String, stage: String },
    #[error("{0:#}")]
    Invalid(anyhow::Error),
    #[error(transparent)]
    Host(#[from] anyhow::Error),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// The pipeline revision the versions were installed on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    revision: String,
    current: String,
    previous: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    canary: Option<CanaryRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CanaryRecord {
    digest: String,
    percent: u8,
}

/// What a rollback did.
pub enum Rollback {
    /// A canary was on trial: it is gone, the current version stays.
    CanaryDropped(Arc<StageComponent>),
    /// The version before the current one is current again.
    Back(Arc<StageComponent>),
    /// Nothing to go back to.
    Nothing,
}

#[derive(Clone)]
pub struct StageVersions {
    blobs: Blobs,
    /// Where versions were kept before blobs: `<data-dir>/stages/<sha256>.wasm`.
    legacy_dir: PathBuf,
    tree: sled::Tree,
    store: Store,
}

impl StageVersions {
    pub fn open(store: &Store, data_dir: &std::path::Path) -> Result<Self> {
        Ok(Self {
            blobs: Blobs::open(data_dir)?,
            legacy_dir: data_dir.join("stages"),
            tree: store.tree("stage_versions")?,
            store: store.clone(),
        })
    }

    /// Where version `digest`'s component is kept.
    fn path(&self, digest: &str) -> PathBuf {
        let path = self.blobs.path(digest);
        match path.is_file() {
            true => path,
            false => self.legacy_dir.join(format!("{digest}.wasm")),
        }
    }

    /// Validate `bytes` against the `stage` world and compile them (on a blocking thread), keep
    /// them on disk, then make them the version new entries of stage `name` get, or with
    /// `canary`, the version that share (in %) of them gets.
    pub async fn install(
        &self,
        pipeline: &Pipeline,
        name: &str,
        bytes: Vec<u8>,
        canary: Option<u8>,
    ) -> Result<Installed, InstallError> {
        let stage = stage_of(pipeline, name)?;
        let version = StageComponent::from_bytes(&pipeline.caps.runtime, name, bytes.clone())
            .await
            .map_err(InstallError::Invalid)?;
        self.blobs.put(&bytes)?;
        let replaced = stage.current().meta.digest.clone();
        match canary {
            Some(percent) => stage.set_canary(Some(Canary {
                version: version.clone(),
                percent,
            })),
            None => stage.swap(version.clone()),
        }
        let change = if canary.is_some() { "canary" } else { "swap" };
        crate::metrics::stage_change(pipeline.name(), name, change);
        self.save(pipeline, stage).await?;
        Ok(Installed { version, replaced })
    }

    /// Make stage `name`'s canary its current version; `None` if it has no canary.
    pub async fn promote(
        &self,
        pipeline: &Pipeline,
        name: &str,
    ) -> Result<Option<Arc<StageComponent>>, InstallError> {
        let stage = stage_of(pipeline, name)?;
        let Some(canary) = stage.canary() else {
            return Ok(None);
        };
        stage.swap(canary.version.clone());
        crate::metrics::stage_change(pipeline.name(), name, "promote");
        self.save(pipeline, stage).await?;
        Ok(Some(canary.version.clone()))
    }

    /// End stage `name`'s canary trial if it has one, else go back to the version before the
    /// current one.
    pub async fn rollback(
        &self,
        pipeline: &Pipeline,
        name: &str,
    ) -> Result<Rollback, InstallError> {
        let stage = stage_of(pipeline, name)?;
        let outcome = if let Some(canary) = stage.canary() {
            stage.set_canary(None);
            crate::metrics::stage_change(pipeline.name(), name, "canary_dropped");
            Rollback::CanaryDropped(canary.version.clone())
        } else if let Some(back) = stage.rollback() {
            crate::metrics::stage_change(pipeline.name(), name, "rollback");
            Rollback::Back(back)
        } else {
            return Ok(Rollback::Nothing);
        };
        self.save(pipeline, stage).await?;
        Ok(outcome)
    }

    /// Record the stage's versions, durably: an operator's change survives a crash once
    /// acknowledged.
    async fn save(&self, pipeline: &Pipeline, stage: &Stage) -> Result<()> {
        let record = Record {
            revision: pipeline.revision.clone(),
            current: stage.current().meta.digest.clone(),
            previous: stage
                .previous()
                .iter()
                .map(|v| v.meta.digest.clone())
                .collect(),
            canary: stage.canary().map(|c| CanaryRecord {
                digest: c.version.meta.digest.clone(),
                percent: c.percent,
            }),
        };
        self.tree
            .insert(key(pipeline, stage), serde_json::to_vec(&record)?)?;
        self.store.flush().await
    }

    /// At start-up: give each stage of `pipeline` the versions an operator installed before
    /// the restart. A version whose file is gone is skipped (with a warning), never fatal.
    /// `only`: the node serves this pipeline alone, so versions recorded before records were
    /// kept per pipeline (under the stage's name) are its. `deployed`: the pipeline is a
    /// deployed revision, which serves its own components: versions installed on another
    /// revision are not restored over them (a pipeline file edited between restarts keeps its
    /// installed versions, as before deploys).
    pub async fn restore(&self, pipeline: &Pipeline, only: bool, deployed: bool) -> Result<usize> {
        let mut restored = 0;
        for stage in &pipeline.stages {
            let raw = match self.tree.get(key(pipeline, stage))? {
                Some(raw) => raw,
                None if only => match self.tree.get(stage.config.name.as_bytes())? {
                    Some(raw) => raw,
                    None => continue,
                },
                None => continue,
            };
            let record: Record = serde_json::from_slice(&raw).context("corrupt stage_versions")?;
            if deployed && record.revision != pipeline.revision {
                continue;
            }
            let from_file = stage.current();
            if record.current == from_file.meta.digest
                && record.previous.is_empty()
                && record.canary.is_none()
            {
                continue;
            }
            let load = async |digest: &String| {
                if *digest == from_file.meta.digest {
                    return Some(from_file.clone());
                }
                let path = self.path(digest);
                match StageComponent::load(&pipeline.caps.runtime, &stage.config.name, &path).await
                {
                    Ok(version) => Some(version),
                    Err(error) => {
                        tracing::warn!(stage = %stage.config.name, %digest, error = %format!("{error:#}"), "an installed version cannot be restored");
                        None
                    }
                }
            };
            let mut chain = Vec::new();
            for digest in record.previous.iter().chain([&record.current]) {
                chain.extend(load(digest).await);
            }
            let Some(current) = chain.pop() else { continue };
            let keep = chain.len().saturating_sub(KEPT_VERSIONS);
            stage.restore(current, chain.split_off(keep));
            if let Some(canary) = &record.canary
                && let Some(version) = load(&canary.digest).await
            {
                stage.set_canary(Some(Canary {
                    version,
                    percent: canary.percent,
                }));
            }
            restored += 1;
        }
        Ok(restored)
    }
}

/// Where a stage's versions are recorded.
fn key(pipeline: &Pipeline, stage: &Stage) -> Vec<u8> {
    format!("{}/{}", pipeline.name(), stage.config.name).into_bytes()
}

fn stage_of<'a>(pipeline: &'a Pipeline, name: &str) -> Result<&'a Stage, InstallError> {
    pipeline
        .stage(name)
        .ok_or_else(|| InstallError::UnknownStage {
            pipeline: pipeline.name().to_string(),
            stage: name.to_string(),
        })
}

impl StageVersions {
    /// `serve --watch`: when a stage's component file (the path in the pipeline file) changes,
    /// install it as that stage's new version; an invalid file is logged and the old version
    /// keeps serving. Ends when `stop` is cancelled.
    pub fn watch(
        &self,
        pipeline: Arc<Pipeline>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let files = pipeline
            .stages
            .iter()
            .map(|s| (s.config.component.as_path(), s.config.name.as_str()));
        let mut changes = FileChanges::watch(files).context("cannot watch the component files")?;
        let versions = self.clone();
        Ok(tokio::spawn(async move {
            while let Some(changed) = changes.next(&stop).await {
                for name in changed {
                    versions.reload(&pipeline, &name).await;
                }
            }
        }))
    }

    async fn reload(&self, pipeline: &Pipeline, name: &str) {
        let Some(stage) = pipeline.stage(name) else {
            return;
        };
        let bytes = match std::fs::read(&stage.config.component) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(stage = %name, %error, "cannot read the changed component");
                return;
            }
        };
        if crate::runtime::digest(&bytes) == stage.current().meta.digest {
            return;
        }
        match self.install(pipeline, name, bytes, None).await {
            Ok(installed) => {
                tracing::info!(stage = %name, digest = %installed.version.meta.digest, replaced = %installed.replaced, "stage swapped (file changed)")
            }
            Err(error) => {
                tracing::warn!(pipeline = %pipeline.name(), stage = %name, error = %error, "the changed component is refused; the old version keeps serving");
                crate::metrics::watched_change_refused("stage", name);
            }
        }
    }
}
