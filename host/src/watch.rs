//! File watching for hot reload (`serve --watch` for stages, kv namespace files).
//!
//! The *directories* of the files are watched: editors and `cp` often replace a file rather than
//! write it in place, which a watch on the file itself would lose. Changes come in bursts (one
//! save is several events), so they are collected until the directory has been quiet for
//! [`SETTLE`] and handed over once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use notify::Watcher;
use tokio::sync::mpsc;

/// Quiet time that ends a burst of changes.
pub const SETTLE: Duration = Duration::from_millis(300);

pub struct FileChanges {
    files: BTreeSet<PathBuf>,
    changes: mpsc::UnboundedReceiver<PathBuf>,
    _watcher: notify::RecommendedWatcher,
}

/// The path a file is known by, whichever way it was named.
pub fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

impl FileChanges {
    pub fn watch<'a>(files: impl IntoIterator<Item = &'a Path>) -> Result<Self> {
        let files: BTreeSet<PathBuf> = files.into_iter().map(canonical).collect();
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
        let dirs: BTreeSet<&Path> = files.iter().filter_map(|p| p.parent()).collect();
        for dir in dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", dir.display()))?;
        }
        Ok(Self {
            files,
            changes,
            _watcher: watcher,
        })
    }

    /// The next settled burst of changes to the watched files (canonical paths), skipping
    /// bursts that touched only their neighbours.
    pub async fn next(&mut self) -> Option<BTreeSet<PathBuf>> {
        loop {
            let mut touched = BTreeSet::from([self.changes.recv().await?]);
            while let Ok(Some(path)) = tokio::time::timeout(SETTLE, self.changes.recv()).await {
                touched.insert(path);
            }
            let ours: BTreeSet<PathBuf> = touched
                .iter()
                .map(|p| canonical(p))
                .filter(|p| self.files.contains(p))
                .collect();
            if !ours.is_empty() {
                return Some(ours);
            }
        }
    }
}
