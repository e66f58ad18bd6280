//! Files kept by content: `<data-dir>/blobs/<sha256>`. What deployed pipelines are made of
//! (pipeline files, components, kv files) is stored here once, however many revisions, stages
//! or pipelines name the same bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// See the module's doc comment. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Blobs {
    dir: PathBuf,
}

/// What [`Blobs::put`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// sha256 of the bytes, lowercase hex.
    pub digest: String,
    /// The bytes were not kept before.
    pub created: bool,
}

impl Blobs {
    pub fn open(data_dir: &Path) -> Result<Self> {
        let dir = data_dir.join("blobs");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Keep `bytes`, durably (written to a temporary file, synced, renamed, the folder synced):
    /// once `put` returns, a crash does not lose them.
    pub fn put(&self, bytes: &[u8]) -> Result<Put> {
        let digest = digest(bytes);
        let path = self.path(&digest);
        if path.is_file() {
            return Ok(Put {
                digest,
                created: false,
            });
        }
        let temporary = self
            .dir
            .join(format!(".{digest}.{}", uuid::Uuid::new_v4().simple()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        if let Err(error) = write() {
            let _ = std::fs::remove_file(&temporary);
            return Err(error).with_context(|| format!("cannot write {}", path.display()));
        }
        Ok(Put {
            digest,
            created: true,
        })
    }

    /// Where the blob `digest` is (whether or not it is kept).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest)
    }

    /// Forget a blob nothing names (a refused deploy's new files).
    pub fn remove(&self, digest: &str) {
        let _ = std::fs::remove_file(self.path(digest));
    }
}

/// sha256 of `bytes`, lowercase hex: how blobs, components and revisions are named.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_are_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let first = blobs.put(b"stage").unwrap();
        assert!(first.created);
        let again = blobs.put(b"stage").unwrap();
        assert_eq!(again.digest, first.digest);
        assert!(!again.created);
        assert_eq!(std::fs::read(blobs.path(&first.digest)).unwrap(), b"stage");
        let files = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert_eq!(files, 1, "one file, no temporary left behind");
    }
}
