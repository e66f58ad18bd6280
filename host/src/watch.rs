//! File watching for hot reload (`serve --watch` for stages, kv namespace files).
//!
//! The *directories* of the files are watched: editors and `cp` often replace a file rather than
//! write it in place, which a watch on the file itself would lose. Changes come in bursts (one
//! save is several events), so they are collected until the directory has been quiet for
//! [`SETTLE`] and handed over once.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use notify::Watcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Quiet time that ends a burst of changes.
pub const SETTLE: Duration = Duration::from_millis(300);

/// Named files being watched; [`FileChanges::next`] gives the names of those that changed.
pub struct FileChanges {
    names: HashMap<PathBuf, String>,
    changes: mpsc::UnboundedReceiver<PathBuf>,
    _watcher: notify::RecommendedWatcher,
}

/// The path a file is known by, whichever way it was named.
pub fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

impl FileChanges {
    /// Watch each `(file, name)`.
    pub fn watch<'a>(files: impl IntoIterator<Item = (&'a Path, &'a str)>) -> Result<Self> {
        let names: HashMap<PathBuf, String> = files
            .into_iter()
            .map(|(path, name)| (canonical(path), name.to_string()))
            .collect();
        let (changed, changes) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event
                    && !event.kind.is_access()
                {
                    for path in event.paths {
                        let _ = changed.send(path);
                    }
                }
            })
            .context("cannot start a file watcher")?;
        let dirs: BTreeSet<&Path> = names.keys().filter_map(|p| p.parent()).collect();
        for dir in dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", dir.display()))?;
        }
        Ok(Self {
            names,
            changes,
            _watcher: watcher,
        })
    }

    /// The names of the watched files changed in the next settled burst (bursts that touched
    /// only their neighbours are skipped); `None` once `stop` is cancelled.
    pub async fn next(&mut self, stop: &CancellationToken) -> Option<BTreeSet<String>> {
        loop {
            let first = tokio::select! {
                path = self.changes.recv() => path?,
                () = stop.cancelled() => return None,
            };
            let mut touched = BTreeSet::from([first]);
            while let Ok(Some(path)) = tokio::time::timeout(SETTLE, self.changes.recv()).await {
                touched.insert(path);
            }
            let ours: BTreeSet<String> = touched
                .iter()
                .filter_map(|p| self.names.get(&canonical(p)).cloned())
                .collect();
            if !ours.is_empty() {
                return Some(ours);
            }
        }
    }
}
