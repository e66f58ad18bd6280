//! `kv`: read-only lookups in namespaces loaded from JSON files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::HostState;
use crate::runtime::bindings::kv::{Host, KvError};

/// Namespaces by name; each maps a key to a JSON value kept as text, ready to hand to a guest.
#[derive(Default, Clone)]
pub struct KvNamespaces {
    namespaces: HashMap<String, Arc<HashMap<String, String>>>,
}

impl KvNamespaces {
    /// Load each namespace from its file: a JSON object whose members are the entries.
    pub fn load(files: &BTreeMap<String, impl AsRef<Path>>) -> Result<Self> {
        let mut namespaces = HashMap::new();
        for (name, path) in files {
            let path = path.as_ref();
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("kv `{name}`: cannot read {}", path.display()))?;
            let Value::Object(entries) = serde_json::from_str(&text)
                .with_context(|| format!("kv `{name}`: {} is not JSON", path.display()))?
            else {
                bail!(
                    "kv `{name}`: {} must hold a JSON object of key -> value",
                    path.display()
                );
            };
            let entries = entries
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect();
            namespaces.insert(name.clone(), Arc::new(entries));
        }
        Ok(Self { namespaces })
    }

    pub fn get(&self, namespace: &str, key: &str) -> Result<Option<&str>, KvError> {
        let entries = self
            .namespaces
            .get(namespace)
            .ok_or_else(|| KvError::NoSuchNamespace(namespace.to_string()))?;
        Ok(entries.get(key).map(String::as_str))
    }
}

impl Host for HostState {
    async fn get(
        &mut self,
        namespace: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<String>, KvError>> {
        Ok(self
            .caps
            .kv
            .get(&namespace, &key)
            .map(|v| v.map(str::to_string)))
    }
}
