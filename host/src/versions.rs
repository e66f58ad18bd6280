//! Stage versions installed by an operator while the server runs (hot swap), kept so that a
//! restart serves the same versions: the `.wasm` files in the node's [`Blobs`], and per stage
//! the current digest and the ones before it in the sled tree `stage_versions`, under
//! `<pipeline>/<stage>` (names have no `/`), with the pipeline revision they were installed on.
//!
//! A stage's versions are one [`Record`] (current, previous, canary). Every change computes the
//! stage's next record, then [`StageVersions::commit`]s it: in Redis mode it is published first
//! ([`Changes`], the component bytes with it), so the cluster's record is the truth and a
//! refused publish changes nothing; then it is applied here and kept in sled. Every other node
//! applies the record when the change counter moves, fetching the
//! component from Redis if it does not have it ([`StageVersions::apply_records`], run by
//! [`crate::follow`], also before the node takes work). Items in a stage finish on the version
//! they entered with.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::{Changes, pipeline_records};
use crate::pipeline::{Canary, KEPT_VERSIONS, Pipeline, Pipelines, Stage};
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
    /// Another node changed the stage first (Redis mode): a 409.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Host(#[from] anyhow::Error),
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// The pipeline revision the versions were installed on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    revision: String,
    current: String,
    previous: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    canary: Option<CanaryRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CanaryRecord {
    digest: String,
    percent: u8,
}

impl Record {
    /// The versions `stage` of `pipeline` serves now.
    fn of(pipeline: &Pipeline, stage: &Stage) -> Self {
        Self {
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
        }
    }

    /// `digest` current, the current one kept for rollback, no canary.
    fn swapped(mut self, digest: &str) -> Self {
        let old = std::mem::replace(&mut self.current, digest.to_string());
        self.previous.push(old);
        if self.previous.len() > KEPT_VERSIONS {
            self.previous.remove(0);
        }
        self.canary = None;
        self
    }

    fn digests(&self) -> impl Iterator<Item = &String> {
        self.previous
            .iter()
            .chain([&self.current])
            .chain(self.canary.as_ref().map(|c| &c.digest))
    }
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
    /// The cluster's records, in Redis mode.
    shared: Option<Arc<dyn Changes>>,
    /// Redis mode: each stage's record (by its key in the cluster) as this node last saw or
    /// published it: a change is published only over that one (compare and set), so a change
    /// computed from versions another node has since replaced is refused, not lost.
    seen: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
}

/// The prefix of stage-version records in [`Changes`]: `versions/<pipeline>/<stage>`.
const SHARED_PREFIX: &str = "versions/";

impl StageVersions {
    /// `shared`: the cluster's changes, in Redis mode.
    pub fn open(
        store: &Store,
        data_dir: &std::path::Path,
        shared: Option<Arc<dyn Changes>>,
    ) -> Result<Self> {
        Ok(Self {
            blobs: Blobs::open(data_dir)?,
            legacy_dir: data_dir.join("stages"),
            tree: store.tree("stage_versions")?,
            store: store.clone(),
            shared,
            seen: Arc::default(),
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
        let digest = version.meta.digest.as_str();
        let next = match canary {
            Some(percent) => Record {
                canary: Some(CanaryRecord {
                    digest: digest.to_string(),
                    percent,
                }),
                ..Record::of(pipeline, stage)
            },
            None => Record::of(pipeline, stage).swapped(digest),
        };
        self.commit(
            pipeline,
            stage,
            next,
            &[(digest, &bytes)],
            std::slice::from_ref(&version),
        )
        .await?;
        let change = if canary.is_some() { "canary" } else { "swap" };
        crate::metrics::stage_change(pipeline.name(), name, change);
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
        let next = Record::of(pipeline, stage).swapped(&canary.version.meta.digest);
        self.commit(pipeline, stage, next, &[], &[]).await?;
        crate::metrics::stage_change(pipeline.name(), name, "promote");
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
        let mut next = Record::of(pipeline, stage);
        let canary = stage.canary();
        if canary.is_some() {
            next.canary = None;
        } else if let Some(back) = next.previous.pop() {
            next.current = back;
        } else {
            return Ok(Rollback::Nothing);
        }
        self.commit(pipeline, stage, next, &[], &[]).await?;
        let (outcome, change) = match canary {
            Some(canary) => (
                Rollback::CanaryDropped(canary.version.clone()),
                "canary_dropped",
            ),
            None => (Rollback::Back(stage.current()), "rollback"),
        };
        crate::metrics::stage_change(pipeline.name(), name, change);
        Ok(outcome)
    }

    /// Make `record` the stage's versions: published to the cluster first (with `files`), then
    /// served here and kept, durably: an operator's change survives a crash once acknowledged.
    /// `loaded`: versions compiled for this change.
    async fn commit(
        &self,
        pipeline: &Pipeline,
        stage: &Stage,
        record: Record,
        files: &[(&str, &[u8])],
        loaded: &[Arc<StageComponent>],
    ) -> Result<(), InstallError> {
        if let Some(shared) = &self.shared {
            let key = shared_key(pipeline, stage);
            let raw = serde_json::to_vec(&record).map_err(anyhow::Error::from)?;
            let expected = self.last_seen(&key);
            let published = shared
                .publish(&key, Some(expected.as_deref()), &raw, files)
                .await?;
            if published.is_none() {
                return Err(InstallError::Conflict(format!(
                    "stage `{}` of pipeline `{}` was changed on another node since this one \
                     last applied its versions; nothing changed: try again (this node \
                     follows within a second)",
                    stage.config.name,
                    pipeline.name()
                )));
            }
            self.seen(key, &raw);
        }
        self.apply(pipeline, stage, &record, loaded).await?;
        Ok(self.save(pipeline, stage, &record).await?)
    }

    /// The cluster's record of a stage as this node last saw or published it.
    fn last_seen(&self, key: &str) -> Option<Vec<u8>> {
        self.seen.lock().expect("not poisoned").get(key).cloned()
    }

    fn seen(&self, key: String, raw: &[u8]) {
        self.seen
            .lock()
            .expect("not poisoned")
            .insert(key, raw.to_vec());
    }

    async fn save(&self, pipeline: &Pipeline, stage: &Stage, record: &Record) -> Result<()> {
        self.tree
            .insert(key(pipeline, stage), serde_json::to_vec(record)?)?;
        self.store.flush().await
    }

    /// Serve `record`'s versions in `stage`: those the stage holds (or `loaded`) are reused, the
    /// others loaded from this node's files, or fetched from the cluster first. A version that
    /// cannot be had is skipped with a warning (a canary is dropped; a current one leaves the
    /// stage on the newest version that can); `false` if the current one could not be had.
    async fn apply(
        &self,
        pipeline: &Pipeline,
        stage: &Stage,
        record: &Record,
        loaded: &[Arc<StageComponent>],
    ) -> Result<bool> {
        let mut held: Vec<Arc<StageComponent>> = stage.previous();
        held.push(stage.current());
        held.extend(stage.canary().map(|c| c.version.clone()));
        held.extend(loaded.iter().cloned());
        let mut versions = std::collections::HashMap::new();
        for digest in record.digests() {
            if versions.contains_key(digest) {
                continue;
            }
            let version = match held.iter().find(|v| v.meta.digest == *digest) {
                Some(version) => Some(version.clone()),
                None => self.load(pipeline, stage, digest).await,
            };
            if let Some(version) = version {
                versions.insert(digest.clone(), version);
            }
        }
        let mut chain: Vec<Arc<StageComponent>> = record
            .previous
            .iter()
            .chain([&record.current])
            .filter_map(|digest| versions.get(digest).cloned())
            .collect();
        let whole = versions.contains_key(&record.current);
        let Some(current) = chain.pop() else {
            return Ok(false);
        };
        let keep = chain.len().saturating_sub(KEPT_VERSIONS);
        stage.restore(current, chain.split_off(keep));
        stage.set_canary(record.canary.as_ref().and_then(|canary| {
            Some(Canary {
                version: versions.get(&canary.digest)?.clone(),
                percent: canary.percent,
            })
        }));
        Ok(whole)
    }

    /// Version `digest` of `stage`, from this node's files or else the cluster's.
    async fn load(
        &self,
        pipeline: &Pipeline,
        stage: &Stage,
        digest: &str,
    ) -> Option<Arc<StageComponent>> {
        let name = &stage.config.name;
        let mut path = self.path(digest);
        if !path.is_file()
            && let Some(shared) = &self.shared
        {
            match shared.file(digest).await {
                Ok(Some(bytes)) if crate::runtime::digest(&bytes) == digest => {
                    match self.blobs.put(&bytes) {
                        Ok(_) => path = self.blobs.path(digest),
                        Err(error) => {
                            tracing::warn!(stage = %name, %digest, error = %format!("{error:#}"), "cannot keep a version fetched from the cluster")
                        }
                    }
                }
                Ok(_) => {
                    tracing::warn!(stage = %name, %digest, "the cluster does not hold this version")
                }
                Err(error) => {
                    tracing::warn!(stage = %name, %digest, error = %format!("{error:#}"), "cannot fetch a version from the cluster")
                }
            }
        }
        match StageComponent::load(&pipeline.caps.runtime, name, &path).await {
            Ok(version) => Some(version),
            Err(error) => {
                tracing::warn!(stage = %name, %digest, error = %format!("{error:#}"), "a version cannot be loaded");
                None
            }
        }
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
            if self.apply(pipeline, stage, &record, &[]).await? {
                restored += 1;
            }
        }
        Ok(restored)
    }

    /// Redis mode: serve the versions the cluster records (among `all`, its records) for the
    /// stages of `pipelines`, those recorded on the revision served here; how many stages
    /// changed.
    pub async fn apply_records(
        &self,
        pipelines: &Pipelines,
        all: &[(String, Vec<u8>)],
    ) -> Result<usize> {
        let mut changed = 0;
        for found in pipeline_records::<Record>(all, SHARED_PREFIX, "stage-version", pipelines) {
            let (pipeline, record) = (found.pipeline, found.record);
            let Some(stage) = pipeline.stage(found.name) else {
                continue;
            };
            self.seen(shared_key(&pipeline, stage), found.raw);
            if record.revision != pipeline.revision || record == Record::of(&pipeline, stage) {
                continue;
            }
            self.apply(&pipeline, stage, &record, &[]).await?;
            self.save(&pipeline, stage, &record).await?;
            tracing::info!(pipeline = %pipeline.name(), stage = %stage.config.name, current = %record.current, "stage versions changed by another node");
            crate::metrics::stage_change(pipeline.name(), &stage.config.name, "synced");
            changed += 1;
        }
        Ok(changed)
    }
}

/// Where a stage's versions are recorded in the cluster.
fn shared_key(pipeline: &Pipeline, stage: &Stage) -> String {
    format!("{SHARED_PREFIX}{}/{}", pipeline.name(), stage.config.name)
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
