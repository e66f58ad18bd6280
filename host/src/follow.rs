//! Redis mode: every node applies the changes an operator made on any node, so that a cluster
//! serves one set of pipelines, stage versions and kv contents.
//!
//! Each change is a record in the cluster's [`Changes`] (written by [`crate::deploy`],
//! [`crate::versions`] and [`crate::kv_reloads`] on the node that was asked). Following reads
//! every record when the change counter moves (pub/sub, backed by a poll every second) and
//! applies them in dependency order: deploys first (a stage version or kv content names the
//! revision it was made on, which must be served first), then stage versions, then kv
//! contents. It then tells the cluster which counter this node serves (`sh:changes:applied`).
//! The first catch-up runs before the node takes work; one that fails is retried a second
//! later.

use std::sync::Arc;

use anyhow::Result;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::Changes;
use crate::deploy::Deployer;
use crate::kv_reloads::KvReloads;
use crate::pipeline::Pipelines;
use crate::versions::StageVersions;

/// What a node applies of the cluster's changes. Cheap to clone.
#[derive(Clone)]
pub struct Follower {
    pub changes: Arc<dyn Changes>,
    pub pipelines: Arc<Pipelines>,
    pub deployer: Arc<Deployer>,
    pub versions: StageVersions,
    pub kv: KvReloads,
}

impl Follower {
    /// Apply every change the cluster records that this node does not serve yet; how many
    /// pipelines, stages and namespaces changed.
    pub async fn catch_up(&self) -> Result<usize> {
        let (counter, all) = self.changes.records("").await?;
        let deploys = self.deployer.apply(&all).await?;
        let stages = self.versions.apply_records(&self.pipelines, &all).await?;
        let namespaces = self.kv.apply_records(&self.pipelines, &all).await?;
        self.changes.applied(counter).await?;
        Ok(deploys + stages + namespaces)
    }

    /// [`Self::catch_up`] now (before the node takes work), then in a task whenever the
    /// cluster's change counter moves, until `stop`.
    pub async fn start(self, stop: CancellationToken) -> Result<JoinHandle<()>> {
        // Watched before the first catch-up: a change during it is caught up after it.
        let mut counter = self.changes.counter();
        let changed = self.catch_up().await?;
        if changed > 0 {
            tracing::info!(changed, "the node serves the cluster's changes");
        }
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = counter.changed() => if changed.is_err() { return },
                    () = stop.cancelled() => return,
                }
                counter.mark_unchanged();
                if let Err(error) = self.catch_up().await {
                    tracing::warn!(error = %format!("{error:#}"), "cannot apply the cluster's changes; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    counter.mark_changed();
                }
            }
        }))
    }
}
