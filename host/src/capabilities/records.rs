//! `records`: durable collections that handlers write (ownership, awards...).

use super::{Counted, HostState};
use crate::limits::MAX_KV_KEY;
use crate::runtime::bindings::records::Host;

impl Host for HostState {
    async fn put(
        &mut self,
        collection: String,
        key: String,
        value: String,
    ) -> wasmtime::Result<Result<(), String>> {
        self.spend(Counted::RecordWrites, value.len())?;
        let name = collection.len().max(key.len());
        self.fits("kv_key", "a record's collection or key", name, MAX_KV_KEY)?;
        if serde_json::from_str::<serde::de::IgnoredAny>(&value).is_err() {
            return Ok(Err(format!("record `{collection}/{key}` is not JSON")));
        }
        Ok(self
            .caps
            .records
            .put(&collection, &key, value.as_bytes())
            .await
            .map_err(|e| format!("{e:#}")))
    }

    async fn get(
        &mut self,
        collection: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<String>, String>> {
        let name = collection.len().max(key.len());
        self.fits("kv_key", "a record's collection or key", name, MAX_KV_KEY)?;
        let found = self
            .caps
            .records
            .get(&collection, &key)
            .await
            .map_err(|e| format!("{e:#}"));
        Ok(found.map(|v| v.map(|bytes| String::from_utf8_lossy(&bytes).into_owned())))
    }
}
