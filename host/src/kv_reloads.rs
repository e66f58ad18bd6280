//! kv reloads an operator asks for (`POST /v1/kv/{namespace}/reload`, or a file change `serve`
//! sees), shared with the cluster in Redis mode.
//!
//! A reload reads the namespace's file on the node that was asked and parses it; in Redis mode
//! it then publishes a [`Record`] under `kv/<pipeline>/<namespace>` in [`Changes`], the file's
//! bytes with it (by sha256), before it swaps the entries in here, so a refused publish changes
//! nothing. Every other node serving that pipeline revision swaps in the same bytes when it
//! hears of the change ([`KvReloads::apply_records`], run by [`crate::follow`], also before a
//! node takes work): the cluster serves one content whatever each node's file holds. A record
//! names the revision it was made on: a deploy brings its own kv files, which records made on
//! other revisions do not replace.

use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::{Changes, pipeline_records};
use crate::capabilities::{NamespaceInfo, ReloadError};
use crate::pipeline::{Pipeline, Pipelines};
use crate::watch::FileChanges;

/// A namespace's content as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// The pipeline revision it was reloaded on.
    revision: String,
    /// sha256 of the content, which the cluster holds as a file.
    digest: String,
}

/// The prefix of kv records in [`Changes`].
const SHARED_PREFIX: &str = "kv/";

/// See the module's doc comment. Cheap to clone.
#[derive(Clone, Default)]
pub struct KvReloads {
    /// The cluster's changes, in Redis mode.
    shared: Option<Arc<dyn Changes>>,
}

impl KvReloads {
    pub fn new(shared: Option<Arc<dyn Changes>>) -> Self {
        Self { shared }
    }

    /// Read namespace `name`'s file again and serve its entries (on every node, in Redis
    /// mode); a file that does not parse leaves the old entries in use.
    pub async fn reload(
        &self,
        pipeline: &Pipeline,
        name: &str,
    ) -> Result<NamespaceInfo, ReloadError> {
        let kv = pipeline.caps.kv.clone();
        let read = name.to_string();
        // Reading and parsing a large file is blocking work.
        let content = tokio::task::spawn_blocking(move || kv.read_file(&read))
            .await
            .map_err(|e| ReloadError::Host(e.into()))??;
        if let Some(shared) = &self.shared {
            let record = Record {
                revision: pipeline.revision.clone(),
                digest: content.digest().to_string(),
            };
            let record = serde_json::to_vec(&record).map_err(|e| ReloadError::Host(e.into()))?;
            shared
                .publish(
                    &shared_key(pipeline, name),
                    None,
                    &record,
                    &[(content.digest(), &content.bytes)],
                )
                .await
                .map_err(ReloadError::Host)?;
        }
        let info = pipeline.caps.kv.put(name, content)?;
        crate::metrics::kv_reload(pipeline.name(), name, "reload");
        Ok(info)
    }

    /// Redis mode: serve the content the cluster records (among `all`, its records) for the kv
    /// namespaces of `pipelines`, those recorded on the revision served here; how many
    /// namespaces changed. Content that cannot be had is skipped with a warning.
    pub async fn apply_records(
        &self,
        pipelines: &Pipelines,
        all: &[(String, Vec<u8>)],
    ) -> Result<usize> {
        let Some(shared) = &self.shared else {
            return Ok(0);
        };
        let mut changed = 0;
        for found in pipeline_records::<Record>(all, SHARED_PREFIX, "kv", pipelines) {
            let (pipeline, name, record) = (found.pipeline, found.name, found.record);
            let kv = pipeline.caps.kv.clone();
            if record.revision != pipeline.revision
                || kv
                    .digest(name)
                    .is_none_or(|serving| serving == record.digest)
            {
                continue;
            }
            let bytes = shared
                .file(&record.digest)
                .await?
                .filter(|bytes| crate::store::blobs::digest(bytes) == record.digest);
            let Some(bytes) = bytes else {
                tracing::warn!(pipeline = %pipeline.name(), namespace = %name, digest = %record.digest, "the cluster does not hold this kv content");
                continue;
            };
            let parsed = name.to_string();
            let content = tokio::task::spawn_blocking(move || {
                kv.parse(&parsed, bytes)
                    .and_then(|content| kv.put(&parsed, content))
            })
            .await
            .context("a kv parse panicked")?;
            match content {
                Ok(info) => {
                    tracing::info!(pipeline = %pipeline.name(), namespace = %name, entries = info.entries, digest = %info.digest, "kv namespace reloaded by another node");
                    crate::metrics::kv_reload(pipeline.name(), name, "synced");
                    changed += 1;
                }
                Err(error) => {
                    tracing::warn!(pipeline = %pipeline.name(), namespace = %name, %error, "the cluster's kv content is refused here; the old entries stay")
                }
            }
        }
        Ok(changed)
    }

    /// `serve --watch`: reload a namespace of `pipeline` whenever its file changes, until
    /// `stop`; a file that does not parse is logged and the old entries stay.
    pub fn watch(
        &self,
        pipeline: Arc<Pipeline>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let namespaces = pipeline.caps.kv.list();
        let files = namespaces
            .iter()
            .map(|n| (n.file.as_path(), n.name.as_str()));
        let mut changes = FileChanges::watch(files).context("cannot watch the kv files")?;
        let reloads = self.clone();
        Ok(tokio::spawn(async move {
            while let Some(changed) = changes.next(&stop).await {
                for name in changed {
                    match reloads.reload(&pipeline, &name).await {
                        Ok(info) => {
                            tracing::info!(namespace = %name, entries = info.entries, digest = %info.digest, "kv namespace reloaded (file changed)")
                        }
                        Err(error) => {
                            tracing::warn!(namespace = %name, %error, "the changed kv file is refused; the old entries stay");
                            crate::metrics::watched_change_refused("kv", &name);
                        }
                    }
                }
            }
        }))
    }
}

/// Where a namespace's content is recorded in the cluster.
fn shared_key(pipeline: &Pipeline, namespace: &str) -> String {
    format!("{SHARED_PREFIX}{}/{namespace}", pipeline.name())
}
