//! The pipelines a node serves, by name. A job names its pipeline and revision
//! (`JobRecord::pipeline`, `JobRecord::revision`), and whatever runs it looks them up here when
//! it starts ([`Pipelines::find`]): the current revision, an older one a running job still holds,
//! or one loaded again from the [`Revisions`] kept on disk (a job resumed after a restart) or
//! in the cluster (Redis mode: a job submitted on a node that deployed a revision this one has
//! not applied yet).
//! A deploy swaps a name's current revision atomically ([`Pipelines::put`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;

use super::revisions::short;
use super::{NodeResources, Pipeline, Revisions};

/// Why a request's pipeline could not be chosen.
#[derive(Debug, thiserror::Error)]
pub enum PipelineLookup {
    #[error("no pipeline `{name}` on this server (it serves {known})")]
    Unknown { name: String, known: String },
    #[error(
        "this server serves several pipelines ({known}): name one (`/v1/pipelines/{{name}}/...`, \
         `?pipeline=` or `\"pipeline\"` in the body)"
    )]
    Unnamed { known: String },
}

/// See the module's doc comment.
pub struct Pipelines {
    by_name: ArcSwap<BTreeMap<String, Arc<Pipeline>>>,
    /// Revisions no longer current, by revision, alive while a job holds them.
    older: Mutex<HashMap<String, Weak<Pipeline>>>,
    /// Where older revisions are loaded from, on what.
    revisions: Revisions,
    resources: NodeResources,
    /// One load of an older revision at a time: two jobs resuming on it share one load.
    loading: tokio::sync::Mutex<()>,
}

impl Pipelines {
    /// The registry of `pipelines`, whose names the caller made sure are distinct; older
    /// revisions are loaded from `revisions` on `resources`.
    pub fn new(
        pipelines: impl IntoIterator<Item = Arc<Pipeline>>,
        revisions: Revisions,
        resources: NodeResources,
    ) -> Self {
        let by_name = pipelines
            .into_iter()
            .map(|p| (p.config.name.clone(), p))
            .collect();
        Self {
            by_name: ArcSwap::from_pointee(by_name),
            older: Mutex::default(),
            revisions,
            resources,
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// Make `pipeline` its name's current revision (new jobs get it); returns the one it
    /// replaced, which jobs running on it keep.
    pub fn put(&self, pipeline: Arc<Pipeline>) -> Option<Arc<Pipeline>> {
        let name = pipeline.name().to_string();
        let mut replaced = None;
        self.by_name.rcu(|by_name| {
            let mut by_name = BTreeMap::clone(by_name);
            replaced = by_name.insert(name.clone(), pipeline.clone());
            by_name
        });
        if let Some(old) = &replaced {
            self.keep_older(old);
        }
        replaced
    }

    /// Stop serving `name`; returns the pipeline removed.
    pub fn remove(&self, name: &str) -> Option<Arc<Pipeline>> {
        let mut removed = None;
        self.by_name.rcu(|by_name| {
            let mut by_name = BTreeMap::clone(by_name);
            removed = by_name.remove(name);
            by_name
        });
        removed
    }

    /// Remember `pipeline` while jobs hold it, dropping the entries no job holds any more.
    fn keep_older(&self, pipeline: &Arc<Pipeline>) {
        let mut older = self.older.lock().expect("not poisoned");
        older.retain(|_, p| p.strong_count() > 0);
        older.insert(pipeline.revision.clone(), Arc::downgrade(pipeline));
    }

    /// The pipeline a job's record names, as close to its revision as is loaded without
    /// loading anything: its revision if current or held by a running job, else the current
    /// one (for what a reader shows of a job, not to run it: see [`Pipelines::find`]).
    pub fn of_job(&self, name: &str, revision: &str) -> Option<Arc<Pipeline>> {
        let older = self.older.lock().expect("not poisoned");
        match older.get(revision).and_then(Weak::upgrade) {
            Some(pipeline) => Some(pipeline),
            None => self.of_record(name),
        }
    }

    /// The pipeline `name` in `revision` (empty: a record written before revisions, which the
    /// current one runs), or why there is none: the name is not served, or the revision cannot
    /// be loaded.
    pub async fn find(&self, name: &str, revision: &str) -> Result<Arc<Pipeline>, String> {
        let current = self.of_record(name).ok_or_else(|| {
            format!(
                "the job belongs to pipeline `{name}`, which this server does not serve (it \
                 serves {})",
                self.known()
            )
        })?;
        if revision.is_empty() || current.revision == revision {
            return Ok(current);
        }
        let alive = || {
            let older = self.older.lock().expect("not poisoned");
            older.get(revision).and_then(Weak::upgrade)
        };
        if let Some(pipeline) = alive() {
            return Ok(pipeline);
        }
        let _loading = self.loading.lock().await;
        if let Some(pipeline) = alive() {
            return Ok(pipeline);
        }
        let cannot = |error: anyhow::Error| {
            format!(
                "revision {} of pipeline `{name}`, which the job was submitted to, cannot be \
                 loaded: {error:#}",
                short(revision)
            )
        };
        // Redis mode: a revision deployed on another node, which this one has not seen yet.
        self.revisions.fetch(revision).await.map_err(cannot)?;
        let config = self.revisions.config(revision).map_err(cannot)?;
        let pipeline = Pipeline::load(config, revision.to_string(), &self.resources)
            .await
            .map_err(cannot)?;
        tracing::info!(pipeline = %name, revision = %short(revision), "an older revision is loaded for a job submitted to it");
        self.keep_older(&pipeline);
        Ok(pipeline)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pipeline>> {
        self.by_name.load().get(name).cloned()
    }

    /// Every pipeline, by name.
    pub fn all(&self) -> Vec<Arc<Pipeline>> {
        self.by_name.load().values().cloned().collect()
    }

    /// The pipeline a stored record (an effect, a dead letter) names; records written before
    /// a node served several pipelines name none, and are the only pipeline's.
    pub fn of_record(&self, name: &str) -> Option<Arc<Pipeline>> {
        match name {
            "" => self.only(),
            name => self.get(name),
        }
    }

    /// The pipeline when there is exactly one.
    pub fn only(&self) -> Option<Arc<Pipeline>> {
        let by_name = self.by_name.load();
        match by_name.len() {
            1 => by_name.values().next().cloned(),
            _ => None,
        }
    }

    /// The pipeline a request names, or the only one when it names none.
    pub fn resolve(&self, name: Option<&str>) -> Result<Arc<Pipeline>, PipelineLookup> {
        match name {
            Some(name) => self.get(name).ok_or_else(|| PipelineLookup::Unknown {
                name: name.to_string(),
                known: self.known(),
            }),
            None => self.only().ok_or_else(|| PipelineLookup::Unnamed {
                known: self.known(),
            }),
        }
    }

    /// The names, quoted, for messages: "`a`, `b`", or "none".
    pub fn known(&self) -> String {
        let by_name = self.by_name.load();
        if by_name.is_empty() {
            return "none".to_string();
        }
        by_name
            .keys()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
