//! `config`: a stage reads the string settings of its `[stage.config]` table. They belong to
//! the pipeline revision the try runs on, so a replay reads what its first run read and
//! nothing is journaled.

use super::HostState;
use crate::runtime::bindings::config::{ConfigError, Host};

impl Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<String, ConfigError>> {
        let value = self
            .caps
            .settings
            .get(&self.context.stage)
            .and_then(|settings| settings.values.get(&key));
        Ok(value.cloned().ok_or(ConfigError::Missing(key)))
    }

    async fn get_all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        let settings = self.caps.settings.get(&self.context.stage);
        Ok(settings
            .map(|s| {
                s.values
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }
}
