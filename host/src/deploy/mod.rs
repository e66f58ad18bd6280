//! Deploying a pipeline while the node runs (`PUT /v1/pipelines/{name}`), and removing one.
//!
//! A deploy checks everything before anything changes: the [`bundle`] (a tar of
//! `pipeline.toml` and the files it names), the pipeline file, each component against its world
//! and each kv file (by loading the pipeline, compiled on blocking threads, off the request's
//! path), and that the node's fixed sizes cover what the file asks for. Only then is the
//! revision recorded (its files in the blobs, by content, so nothing is kept twice), made the
//! one a restart serves, durably, and swapped in atomically: new jobs get it, jobs already
//! running keep the revision they were submitted with (see [`crate::pipeline::Pipelines`]).
//! A refused deploy leaves no trace: the blobs it wrote are removed.
//!
//! In Redis mode a deploy or a removal is the cluster's: once checked, it is published first
//! (a [`Record`] under `pipelines/<name>` in [`crate::backend::Changes`], the revision's
//! manifest and files with it, by content), then applied here. Every other node applies it
//! when it hears of the change ([`Deployer::apply`]: fetch the revision, check it against its
//! own sizes, load, swap); a node that starts later serves the cluster's deploys from the start
//! ([`adopt`]).

pub mod bundle;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use self::bundle::{Bundle, PIPELINE_FILE, normalise};
use crate::config::PipelineConfig;
use crate::pipeline::revisions::short;
use crate::pipeline::{Manifest, NodeResources, Pipeline, Pipelines, Revisions};

/// Pipelines one node serves at most.
pub const MAX_PIPELINES: usize = 64;

/// Why a deploy or a removal was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The bundle or what it holds is wrong (a 422 saying what).
    #[error("{0}")]
    Invalid(String),
    #[error("no pipeline `{0}` on this server")]
    Unknown(String),
    #[error("pipeline `{0}` has running jobs: cancel them or let them finish, then delete it")]
    Running(String),
    #[error(transparent)]
    Host(#[from] anyhow::Error),
}

/// A pipeline's deploy as the cluster records it, under [`SHARED_PREFIX`]`<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    /// Every node serves this revision under the name.
    Deployed { revision: String },
    /// No node serves the name (until it is deployed again), whatever its pipeline files say.
    Removed,
}

/// The prefix of deploy records in [`crate::backend::Changes`].
const SHARED_PREFIX: &str = "pipelines/";

/// The cluster's deploy records, by pipeline name (those that do not parse are skipped).
fn records(all: &[(String, Vec<u8>)]) -> impl Iterator<Item = (&str, Record)> {
    all.iter().filter_map(|(key, raw)| {
        let name = key.strip_prefix(SHARED_PREFIX)?;
        match serde_json::from_slice(raw) {
            Ok(record) => Some((name, record)),
            Err(error) => {
                tracing::warn!(%key, %error, "a corrupt deploy record in the cluster");
                None
            }
        }
    })
}

/// Redis mode, at start-up (before the node loads its pipelines): make the cluster's deploys
/// this node's, so that it serves what every node serves. Each deployed revision is fetched
/// and recorded as deployed here; returns the names the cluster removed, which this node must
/// not serve even where its pipeline files name them.
pub async fn adopt(revisions: &Revisions) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut removed = std::collections::BTreeSet::new();
    let Some(shared) = revisions.shared() else {
        return Ok(removed);
    };
    let (_, all) = shared.records(SHARED_PREFIX).await?;
    for (name, record) in records(&all) {
        match record {
            Record::Deployed { revision } => {
                if revisions.fetch(&revision).await? {
                    revisions.set_deployed(name, &revision).await?;
                } else {
                    tracing::warn!(pipeline = %name, revision = %short(&revision), "the cluster's deployed revision cannot be fetched; not served here");
                }
            }
            Record::Removed => {
                revisions.remove_deployed(name).await?;
                removed.insert(name.to_string());
            }
        }
    }
    Ok(removed)
}

/// What a deploy did.
pub struct Deployed {
    pub pipeline: Arc<Pipeline>,
    /// The revision it replaced (`None`: a new pipeline, or `unchanged`).
    pub replaced: Option<String>,
    /// The pipeline already served this revision: it goes on as it was (its hot-swapped
    /// versions included), now recorded as deployed.
    pub unchanged: bool,
}

/// See the module's doc comment.
pub struct Deployer {
    pipelines: Arc<Pipelines>,
    revisions: Revisions,
    resources: NodeResources,
    /// One deploy or removal at a time: each sees the last one's outcome.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Deployer {
    pub fn new(pipelines: Arc<Pipelines>, revisions: Revisions, resources: NodeResources) -> Self {
        Self {
            pipelines,
            revisions,
            resources,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Deploy the tar archive `bundle` as pipeline `name`; see the module's doc comment.
    pub async fn deploy(&self, name: &str, bundle: &[u8]) -> Result<Deployed, DeployError> {
        let _one = self.one_at_a_time.lock().await;
        let bundle = Bundle::read(bundle).map_err(DeployError::Invalid)?;
        let current = self.pipelines.get(name);
        if current.is_none() && self.pipelines.all().len() >= MAX_PIPELINES {
            return Err(DeployError::Invalid(format!(
                "this server serves {MAX_PIPELINES} pipelines, the most one node serves; \
                 delete one first"
            )));
        }
        let blobs = self.revisions.blobs();
        let mut digests = BTreeMap::new();
        let mut created = Vec::new();
        for (path, bytes) in &bundle.files {
            let put = blobs.put(bytes)?;
            if put.created {
                created.push(put.digest.clone());
            }
            digests.insert(path.clone(), put.digest);
        }
        let text = blobs.put(bundle.pipeline_file.as_bytes())?;
        if text.created {
            created.push(text.digest.clone());
        }
        let checked = self
            .check(name, &bundle, &digests, text.digest)
            .await
            .map_err(|error| match error {
                // Messages name the bundle's paths, not where this node keeps the files.
                DeployError::Invalid(message) => {
                    let message = digests.iter().fold(message, |message, (path, digest)| {
                        message.replace(
                            &blobs.path(digest).display().to_string(),
                            &path.display().to_string(),
                        )
                    });
                    DeployError::Invalid(message)
                }
                other => other,
            });
        let (manifest, pipeline) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                for digest in created {
                    blobs.remove(&digest);
                }
                return Err(error);
            }
        };
        self.revisions.keep(&manifest)?;
        let revision = pipeline.revision.clone();
        self.publish(name, &Record::Deployed { revision }, Some(&manifest))
            .await?;
        self.revisions
            .set_deployed(name, &pipeline.revision)
            .await?;
        let unchanged = current
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, &pipeline));
        if unchanged {
            tracing::info!(pipeline = %name, revision = %short(&pipeline.revision), "pipeline deployed: the revision it serves already");
            return Ok(Deployed {
                pipeline,
                replaced: None,
                unchanged,
            });
        }
        let replaced = self
            .pipelines
            .put(pipeline.clone())
            .map(|old| old.revision.clone());
        tracing::info!(pipeline = %name, revision = %short(&pipeline.revision), replaced = ?replaced.as_deref().map(short), "pipeline deployed");
        crate::metrics::pipeline_change(name, "deploy");
        Ok(Deployed {
            pipeline,
            replaced,
            unchanged,
        })
    }

    /// Check the bundle's pipeline file and files, and load them: the revision's manifest and
    /// the pipeline, ready to swap in.
    async fn check(
        &self,
        name: &str,
        bundle: &Bundle,
        digests: &BTreeMap<PathBuf, String>,
        pipeline_file: String,
    ) -> Result<(Manifest, Arc<Pipeline>), DeployError> {
        let blobs = self.revisions.blobs();
        let config = PipelineConfig::parse_with(
            &bundle.pipeline_file,
            Path::new(PIPELINE_FILE),
            &|written| {
                let digest = normalise(written)
                    .and_then(|path| digests.get(&path))
                    .ok_or_else(|| format!("the bundle has no file {}", written.display()))?;
                Ok(blobs.path(digest))
            },
        )
        .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        if config.name != name {
            return Err(DeployError::Invalid(format!(
                "the pipeline file names pipeline `{}`, the path `{name}`",
                config.name
            )));
        }
        let named: Vec<PathBuf> = config.files.keys().filter_map(|p| normalise(p)).collect();
        let unnamed: Vec<String> = bundle
            .files
            .keys()
            .filter(|path| !named.contains(path))
            .map(|path| format!("`{}`", path.display()))
            .collect();
        if !unnamed.is_empty() {
            return Err(DeployError::Invalid(format!(
                "the bundle holds files `{PIPELINE_FILE}` does not name: {}",
                unnamed.join(", ")
            )));
        }
        if let Some(why) = self.resources.sizing.refuses(&config) {
            return Err(DeployError::Invalid(why));
        }
        let manifest = Manifest {
            name: name.to_string(),
            pipeline_file,
            files: config
                .files
                .keys()
                .map(|written| {
                    let digest = normalise(written)
                        .and_then(|path| digests.get(&path))
                        .expect("every named file was found");
                    (written.clone(), digest.clone())
                })
                .collect(),
        };
        let revision = manifest.revision();
        if let Some(current) = self.pipelines.get(name)
            && current.revision == revision
        {
            // The same files: the pipeline serving keeps its hot-swapped versions.
            return Ok((manifest, current));
        }
        let pipeline = Pipeline::load(config, revision, &self.resources)
            .await
            .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        Ok((manifest, pipeline))
    }

    /// Which revision deploys made current, by pipeline name.
    pub fn deployed(&self) -> anyhow::Result<BTreeMap<String, String>> {
        self.revisions.deployed()
    }

    /// Stop serving `name` and forget its deploy, once `running_jobs` says none of its jobs
    /// run (the caller asks the backend). A pipeline from a file of the command line is served
    /// again at the next start.
    pub async fn remove(
        &self,
        name: &str,
        running_jobs: impl AsyncFnOnce() -> anyhow::Result<bool>,
    ) -> Result<(), DeployError> {
        let _one = self.one_at_a_time.lock().await;
        if self.pipelines.get(name).is_none() {
            return Err(DeployError::Unknown(name.to_string()));
        }
        if running_jobs()
            .await
            .context("cannot tell whether the pipeline has running jobs")?
        {
            return Err(DeployError::Running(name.to_string()));
        }
        self.publish(name, &Record::Removed, None).await?;
        self.revisions.remove_deployed(name).await?;
        self.pipelines.remove(name);
        tracing::info!(pipeline = %name, "pipeline deleted");
        crate::metrics::pipeline_change(name, "delete");
        Ok(())
    }

    /// Redis mode: make `record` the cluster's, with `manifest`'s revision shared (nothing in
    /// embedded mode). First: a refused publish changes nothing.
    async fn publish(
        &self,
        name: &str,
        record: &Record,
        manifest: Option<&Manifest>,
    ) -> anyhow::Result<()> {
        let Some(shared) = self.revisions.shared() else {
            return Ok(());
        };
        let files = match manifest {
            Some(manifest) => self.revisions.share(manifest)?,
            None => Vec::new(),
        };
        // A deploy names its whole state (a revision, or none): the last one wins on every node.
        shared
            .publish(
                &format!("{SHARED_PREFIX}{name}"),
                None,
                &serde_json::to_vec(record)?,
                &crate::backend::file_refs(&files),
            )
            .await?;
        Ok(())
    }

    /// Redis mode: serve what the cluster's deploy records (among `all`, the cluster's
    /// records) say, where this node does not yet; how many pipelines changed. A revision this
    /// node cannot fetch, load or give its sizes is skipped with a warning (and the metric
    /// `stagehand_pipeline_changes_total{change="refused"}`); the node keeps what it served.
    pub async fn apply(&self, all: &[(String, Vec<u8>)]) -> anyhow::Result<usize> {
        let _one = self.one_at_a_time.lock().await;
        let deployed = self.revisions.deployed()?;
        let mut changed = 0;
        for (name, record) in records(all) {
            let current = self.pipelines.get(name);
            match record {
                Record::Deployed { revision } => {
                    if current.as_ref().is_some_and(|c| c.revision == revision) {
                        if deployed.get(name) != Some(&revision) {
                            self.revisions.set_deployed(name, &revision).await?;
                        }
                        continue;
                    }
                    match self.load(&revision, current.is_none()).await {
                        Ok(pipeline) => {
                            self.revisions.set_deployed(name, &revision).await?;
                            self.pipelines.put(pipeline);
                            tracing::info!(pipeline = %name, revision = %short(&revision), "pipeline deployed by another node");
                            crate::metrics::pipeline_change(name, "synced");
                            changed += 1;
                        }
                        Err(error) => {
                            tracing::warn!(pipeline = %name, revision = %short(&revision), error = %format!("{error:#}"), "a pipeline deployed by another node cannot be served here");
                            crate::metrics::pipeline_change(name, "refused");
                        }
                    }
                }
                Record::Removed => {
                    if deployed.contains_key(name) {
                        self.revisions.remove_deployed(name).await?;
                    }
                    if self.pipelines.remove(name).is_some() {
                        tracing::info!(pipeline = %name, "pipeline deleted by another node");
                        crate::metrics::pipeline_change(name, "synced");
                        changed += 1;
                    }
                }
            }
        }
        Ok(changed)
    }

    /// Revision `revision` of a pipeline, fetched from the cluster if need be, checked against
    /// this node's sizes and loaded. `new`: the node does not serve the name yet.
    async fn load(&self, revision: &str, new: bool) -> anyhow::Result<Arc<Pipeline>> {
        if new && self.pipelines.all().len() >= MAX_PIPELINES {
            anyhow::bail!("this node serves {MAX_PIPELINES} pipelines already");
        }
        if !self.revisions.fetch(revision).await? {
            anyhow::bail!("the cluster does not hold the revision");
        }
        let config = self.revisions.config(revision)?;
        if let Some(why) = self.resources.sizing.refuses(&config) {
            anyhow::bail!(why);
        }
        Pipeline::load(config, revision.to_string(), &self.resources).await
    }
}
