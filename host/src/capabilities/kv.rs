//! `kv`: read-only lookups in namespaces loaded from JSON files, reloadable while serving.
//!
//! Each namespace is swapped whole ([`ArcSwap`]): a guest sees the old entries or the new ones,
//! never a mix, and a file that does not parse leaves the old entries in place. Reloads (on
//! `POST /v1/kv/{namespace}/reload`, or when `serve` sees a file change) go through
//! [`crate::kv_reloads`], which shares them with the cluster in Redis mode.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::HostState;
use crate::limits::MAX_KV_KEY;
use crate::runtime::bindings::kv::{Host, KvError};

/// One loaded version of a namespace: key -> JSON value as text, ready to hand to a guest.
pub(crate) struct Entries {
    entries: HashMap<String, String>,
    info: NamespaceInfo,
}

/// A namespace's content, parsed, ready to swap in ([`KvNamespaces::put`]).
pub struct KvContent {
    /// The bytes it was parsed from.
    pub bytes: Vec<u8>,
    entries: Entries,
}

impl KvContent {
    /// sha256 of the bytes.
    pub fn digest(&self) -> &str {
        &self.entries.info.digest
    }
}

/// What `GET /v1/kv` shows of a namespace.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NamespaceInfo {
    pub name: String,
    #[schema(value_type = String)]
    pub file: PathBuf,
    pub entries: usize,
    /// sha256 of the file's bytes, to tell which content is in use.
    pub digest: String,
    /// When this content was loaded (ms since the Unix epoch).
    pub loaded_at: u64,
    /// Times the namespace was reloaded since start.
    pub reloads: u64,
}

struct Namespace {
    file: PathBuf,
    current: ArcSwap<Entries>,
}

#[derive(Default)]
pub struct KvNamespaces {
    namespaces: BTreeMap<String, Namespace>,
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no kv namespace `{0}`")]
    Unknown(String),
    #[error("{0:#}")]
    Invalid(anyhow::Error),
    /// The reload could not be shared with the cluster (nothing changed).
    #[error(transparent)]
    Host(anyhow::Error),
}

impl KvNamespaces {
    /// Load each namespace from its file: a JSON object whose members are the entries.
    pub fn load(files: &BTreeMap<String, impl AsRef<Path>>) -> Result<Self> {
        let mut namespaces = BTreeMap::new();
        for (name, path) in files {
            let file = path.as_ref().to_path_buf();
            let entries = read(name, &file)?.entries;
            namespaces.insert(
                name.clone(),
                Namespace {
                    file,
                    current: ArcSwap::from_pointee(entries),
                },
            );
        }
        Ok(Self { namespaces })
    }

    /// The version of namespace `name` in use now; a try keeps the one it read first (see
    /// `journal`).
    pub(crate) fn snapshot(&self, name: &str) -> Option<Arc<Entries>> {
        self.namespaces.get(name).map(|n| n.current.load_full())
    }

    /// Read the namespace's file again and swap its entries in; on error the old ones stay.
    pub fn reload(&self, name: &str) -> Result<NamespaceInfo, ReloadError> {
        let content = self.read_file(name)?;
        self.put(name, content)
    }

    /// The namespace's file as it is now, read and parsed but not in use yet.
    pub fn read_file(&self, name: &str) -> Result<KvContent, ReloadError> {
        read(name, &self.namespace(name)?.file).map_err(ReloadError::Invalid)
    }

    /// `bytes` as the namespace's content (read from its file, or sent by another node),
    /// parsed but not in use yet.
    pub fn parse(&self, name: &str, bytes: Vec<u8>) -> Result<KvContent, ReloadError> {
        let entries =
            parse(name, &self.namespace(name)?.file, &bytes).map_err(ReloadError::Invalid)?;
        Ok(KvContent { bytes, entries })
    }

    /// Swap `content` in as the namespace's entries.
    pub fn put(&self, name: &str, mut content: KvContent) -> Result<NamespaceInfo, ReloadError> {
        let namespace = self.namespace(name)?;
        content.entries.info.reloads = namespace.current.load().info.reloads + 1;
        let info = content.entries.info.clone();
        namespace.current.store(Arc::new(content.entries));
        Ok(info)
    }

    /// The digest of the content namespace `name` serves now.
    pub fn digest(&self, name: &str) -> Option<String> {
        let namespace = self.namespaces.get(name)?;
        Some(namespace.current.load().info.digest.clone())
    }

    fn namespace(&self, name: &str) -> Result<&Namespace, ReloadError> {
        self.namespaces
            .get(name)
            .ok_or_else(|| ReloadError::Unknown(name.to_string()))
    }

    pub fn list(&self) -> Vec<NamespaceInfo> {
        self.namespaces
            .values()
            .map(|n| n.current.load().info.clone())
            .collect()
    }
}

/// Namespace `name`'s file, read and parsed.
fn read(name: &str, path: &Path) -> Result<KvContent> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("kv `{name}`: cannot read {}", path.display()))?;
    let entries = parse(name, path, &bytes)?;
    Ok(KvContent { bytes, entries })
}

/// The content of namespace `name` (whose file is `path`, for messages and listings).
fn parse(name: &str, path: &Path, bytes: &[u8]) -> Result<Entries> {
    let Value::Object(entries) = serde_json::from_slice(bytes)
        .with_context(|| format!("kv `{name}`: {} is not JSON", path.display()))?
    else {
        bail!(
            "kv `{name}`: {} must hold a JSON object of key -> value",
            path.display()
        );
    };
    let entries: HashMap<String, String> = entries
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    Ok(Entries {
        info: NamespaceInfo {
            name: name.to_string(),
            file: path.to_path_buf(),
            entries: entries.len(),
            digest: format!("{:x}", Sha256::digest(bytes)),
            loaded_at: crate::model::now_ms(),
            reloads: 0,
        },
        entries,
    })
}

impl Host for HostState {
    async fn get(
        &mut self,
        namespace: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<String>, KvError>> {
        let name = namespace.len().max(key.len());
        self.fits("kv_key", "a kv namespace or key", name, MAX_KV_KEY)?;
        let kv = &self.caps.kv;
        let Some(entries) = self
            .journal
            .kv_pinned(&namespace, || kv.snapshot(&namespace))
        else {
            return Ok(Err(KvError::NoSuchNamespace(namespace)));
        };
        Ok(Ok(entries.entries.get(&key).cloned()))
    }
}
