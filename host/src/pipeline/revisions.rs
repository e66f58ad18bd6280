//! Revisions: a pipeline as it was served, by content. A revision is the pipeline file's bytes
//! and the bytes of every file it names (components, kv files); its id is a digest of those
//! digests, so the same files give the same revision on any node, from a file on the command
//! line or a deployed bundle.
//!
//! Every revision a node serves is kept (its files in [`Blobs`], its manifest in the sled tree
//! `pipeline_revisions`), so a job resumed after a restart runs on the revision it was submitted
//! with even when another is current. The sled tree `deployed_pipelines` says which revision a
//! deploy made current, by pipeline name: deployed pipelines survive restarts.
//!
//! In Redis mode every revision a node deploys or serves from its files is shared
//! ([`Revisions::share`], [`Revisions::share_kept`]): its manifest and files are kept in the
//! cluster by content (the manifest under its revision id, which is a digest of it), so a node
//! that never served a revision fetches it ([`Revisions::fetch`]) before it loads it: a job
//! runs on the revision it was submitted to, whichever node takes its items.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::backend::{Changes, file_refs};
use crate::config::PipelineConfig;
use crate::store::{Blobs, Store};

/// What a revision is made of: the pipeline file and the files it names, by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// Digest of the pipeline file.
    pub pipeline_file: String,
    /// Each file the pipeline file names, as written there -> its digest.
    pub files: BTreeMap<PathBuf, String>,
}

impl Manifest {
    /// The revision's id: sha256 over the pipeline file's digest and each named file's path
    /// and digest, in path order.
    /// The digest of each file the revision is made of: the pipeline file, then the files it
    /// names.
    pub fn digests(&self) -> impl Iterator<Item = &String> {
        [&self.pipeline_file].into_iter().chain(self.files.values())
    }

    pub fn revision(&self) -> String {
        let mut canonical = format!("stagehand-revision-1\n{}\n", self.pipeline_file);
        for (path, digest) in &self.files {
            canonical.push_str(&format!("{}\0{digest}\n", path.display()));
        }
        crate::store::blobs::digest(canonical.as_bytes())
    }
}

/// See the module's doc comment. Cheap to clone.
#[derive(Clone)]
pub struct Revisions {
    blobs: Blobs,
    manifests: sled::Tree,
    deployed: sled::Tree,
    store: Store,
    /// The cluster's files, in Redis mode.
    shared: Option<Arc<dyn Changes>>,
}

impl Revisions {
    /// `shared`: the cluster's changes and files, in Redis mode.
    pub fn open(store: &Store, data_dir: &Path, shared: Option<Arc<dyn Changes>>) -> Result<Self> {
        Ok(Self {
            blobs: Blobs::open(data_dir)?,
            manifests: store.tree("pipeline_revisions")?,
            deployed: store.tree("deployed_pipelines")?,
            store: store.clone(),
            shared,
        })
    }

    /// The cluster's changes, in Redis mode.
    pub fn shared(&self) -> Option<&Arc<dyn Changes>> {
        self.shared.as_ref()
    }

    /// What the cluster needs to hold for another node to fetch `manifest`'s revision: each
    /// file it names, then the manifest (under the revision id), as (digest, bytes). The
    /// manifest comes last: where it is in the cluster, its files are too.
    pub fn share(&self, manifest: &Manifest) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for digest in manifest.digests() {
            let bytes = std::fs::read(self.blobs.path(digest))
                .with_context(|| format!("cannot read kept file {digest}"))?;
            files.push((digest.clone(), bytes));
        }
        files.push((manifest.revision(), serde_json::to_vec(manifest)?));
        Ok(files)
    }

    /// Redis mode: make `revision` (kept here) one every node can fetch, for a job submitted
    /// to it here and run on another node. Nothing in embedded mode.
    pub async fn share_kept(&self, revision: &str) -> Result<()> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        // Another node (or this one, before a restart) shared it already: the manifest is
        // small, its files are not.
        if shared.file(revision).await?.is_some() {
            return Ok(());
        }
        let manifest = self
            .manifest(revision)?
            .with_context(|| format!("no revision {revision} is kept on this node"))?;
        let files = self.share(&manifest)?;
        shared.keep_files(&file_refs(&files)).await
    }

    /// Make sure `revision` is kept here, fetching its manifest and files from the cluster
    /// (Redis mode) when this node never kept it; each is checked against its digest. `false`
    /// when it is not kept and cannot be had.
    pub async fn fetch(&self, revision: &str) -> Result<bool> {
        if self.manifests.contains_key(revision)? {
            return Ok(true);
        }
        let Some(shared) = &self.shared else {
            return Ok(false);
        };
        let Some(raw) = shared.file(revision).await? else {
            return Ok(false);
        };
        let manifest: Manifest = serde_json::from_slice(&raw).with_context(|| {
            format!(
                "the cluster's manifest of revision {} is corrupt",
                short(revision)
            )
        })?;
        if manifest.revision() != revision {
            bail!(
                "the cluster's manifest of revision {} does not match its id",
                short(revision)
            );
        }
        for digest in manifest.digests() {
            if self.blobs.path(digest).is_file() {
                continue;
            }
            let bytes = shared.file(digest).await?.with_context(|| {
                format!(
                    "the cluster does not hold file {digest} of revision {}",
                    short(revision)
                )
            })?;
            if crate::store::blobs::digest(&bytes) != *digest {
                bail!(
                    "the cluster's file {digest} of revision {} does not match its digest",
                    short(revision)
                );
            }
            self.blobs.put(&bytes)?;
        }
        self.keep(&manifest)?;
        Ok(true)
    }

    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Keep the files of `config` (read from where the pipeline file found them) and its
    /// pipeline file `text`; returns the revision.
    pub fn keep_files(&self, config: &PipelineConfig, text: &[u8]) -> Result<String> {
        let mut files = BTreeMap::new();
        for (written, found) in &config.files {
            let bytes =
                std::fs::read(found).with_context(|| format!("cannot read {}", found.display()))?;
            files.insert(written.clone(), self.blobs.put(&bytes)?.digest);
        }
        let manifest = Manifest {
            name: config.name.clone(),
            pipeline_file: self.blobs.put(text)?.digest,
            files,
        };
        self.keep(&manifest)
    }

    /// Record `manifest`, whose blobs are kept; returns its revision. Durable once the store
    /// is flushed.
    pub fn keep(&self, manifest: &Manifest) -> Result<String> {
        let revision = manifest.revision();
        if !self.manifests.contains_key(&revision)? {
            self.manifests
                .insert(&revision, serde_json::to_vec(manifest)?)?;
        }
        Ok(revision)
    }

    pub fn manifest(&self, revision: &str) -> Result<Option<Manifest>> {
        self.manifests
            .get(revision)?
            .map(|raw| serde_json::from_slice(&raw).context("corrupt pipeline_revisions"))
            .transpose()
    }

    /// The configuration of a kept revision, its files read from the blobs.
    pub fn config(&self, revision: &str) -> Result<PipelineConfig> {
        let manifest = self
            .manifest(revision)?
            .with_context(|| format!("no revision {revision} is kept on this node"))?;
        self.config_of(&manifest, revision)
    }

    /// The configuration `manifest` describes (its blobs kept), named `revision` in messages.
    pub fn config_of(&self, manifest: &Manifest, revision: &str) -> Result<PipelineConfig> {
        let text = std::fs::read_to_string(self.blobs.path(&manifest.pipeline_file))
            .with_context(|| format!("cannot read the pipeline file of revision {revision}"))?;
        let named = PathBuf::from(format!("{} (revision {})", manifest.name, short(revision)));
        PipelineConfig::parse_with(&text, &named, &|written| {
            let digest = manifest
                .files
                .get(written)
                .ok_or_else(|| format!("the revision has no file {}", written.display()))?;
            Ok(self.blobs.path(digest))
        })
    }

    /// The revision a deploy made current, by pipeline name.
    pub fn deployed(&self) -> Result<BTreeMap<String, String>> {
        self.deployed
            .iter()
            .map(|entry| {
                let (name, revision) = entry?;
                Ok((
                    String::from_utf8(name.to_vec()).context("corrupt deployed_pipelines")?,
                    String::from_utf8(revision.to_vec()).context("corrupt deployed_pipelines")?,
                ))
            })
            .collect()
    }

    /// Make `revision` the one `name` serves after a restart, durably.
    pub async fn set_deployed(&self, name: &str, revision: &str) -> Result<()> {
        self.deployed.insert(name, revision.as_bytes())?;
        self.store.flush().await
    }

    /// Forget that `name` was deployed, durably.
    pub async fn remove_deployed(&self, name: &str) -> Result<()> {
        self.deployed.remove(name)?;
        self.store.flush().await
    }
}

/// The first 12 hex digits of a revision: enough to tell revisions apart in messages.
pub fn short(revision: &str) -> &str {
    &revision[..revision.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(files: &[(&str, &str)]) -> Manifest {
        Manifest {
            name: "p".into(),
            pipeline_file: "toml".into(),
            files: files
                .iter()
                .map(|(path, digest)| (PathBuf::from(path), digest.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_revision_is_its_contents() {
        let one = manifest(&[("a.wasm", "1"), ("b.json", "2")]);
        assert_eq!(
            one.revision(),
            manifest(&[("b.json", "2"), ("a.wasm", "1")]).revision()
        );
        assert_ne!(
            one.revision(),
            manifest(&[("a.wasm", "1"), ("b.json", "3")]).revision()
        );
        assert_ne!(
            one.revision(),
            manifest(&[("a.wasm", "2"), ("b.json", "1")]).revision()
        );
        assert_eq!(one.revision().len(), 64);
    }
}
