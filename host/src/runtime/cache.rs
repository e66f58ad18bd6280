//! Compiled components on disk, keyed by the sha256 of the `.wasm` and the engine's settings,
//! so a restart (or a second pipeline using the same stage) deserialises in a fraction of a
//! millisecond instead of compiling for a hundred or more.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Whether a load found its compiled form on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    /// Compiled now, in the given time, and stored for next time.
    Compiled(Duration),
}

#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    /// Distinguishes artifacts of different wasmtime versions and engine settings.
    engine_key: String,
}

/// Hex sha256 of a component's bytes: the name of a stage version.
pub use crate::store::blobs::digest;

impl CompileCache {
    pub fn new(engine: &Engine, dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create compile cache {}", dir.display()))?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn artifact(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}-{}.cwasm", self.engine_key))
    }

    /// The compiled component for `bytes` (whose sha256 is `digest`): from disk if it is there
    /// and loads, else compiled (off the async threads) and written for next time.
    pub async fn load(
        &self,
        engine: &Engine,
        digest: &str,
        bytes: Vec<u8>,
    ) -> Result<(Component, CacheOutcome)> {
        let artifact = self.artifact(digest);
        if artifact.is_file() {
            // SAFETY: the file was written by `Component::serialize` of this engine
            // configuration (its name carries the engine's compatibility hash) into a folder
            // that only this process writes; wasmtime still checks its header and version.
            match unsafe { Component::deserialize_file(engine, &artifact) } {
                Ok(component) => return Ok((component, CacheOutcome::Hit)),
                Err(error) => {
                    tracing::warn!(%error, path = %artifact.display(), "compiled artifact unusable; recompiling")
                }
            }
        }
        let engine = engine.clone();
        let started = Instant::now();
        let (component, serialized) = tokio::task::spawn_blocking(move || -> Result<_> {
            let component = Component::from_binary(&engine, &bytes)?;
            let serialized = component.serialize()?;
            Ok((component, serialized))
        })
        .await??;
        let elapsed = started.elapsed();
        let tmp = artifact.with_extension(format!("tmp{}", std::process::id()));
        if let Err(error) =
            std::fs::write(&tmp, serialized).and_then(|()| std::fs::rename(&tmp, &artifact))
        {
            tracing::warn!(%error, path = %artifact.display(), "cannot store compiled artifact");
        }
        Ok((component, CacheOutcome::Compiled(elapsed)))
    }
}
