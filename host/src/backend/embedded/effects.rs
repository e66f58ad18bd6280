//! [`EffectQueue`] and [`Records`] on this node's sled [`Store`] (see `store/effects.rs` for
//! how a claim, a run and a crash are ordered there).

use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::backend::{EffectQueue, Records};
use crate::store::{EffectRecord, EffectState, EmitOutcome, Store};

/// How long a runner that found nothing to run waits when no emit wakes it (a marker whose
/// record was still being written is looked at again after this).
const IDLE_POLL: Duration = Duration::from_millis(500);

#[async_trait]
impl EffectQueue for Store {
    async fn emit(&self, effect: &EffectRecord) -> Result<EmitOutcome> {
        self.emit_effect(effect)
    }

    async fn take(&self, limit: usize, shutdown: &CancellationToken) -> Result<Vec<EffectRecord>> {
        let mut taken = Vec::new();
        // Looks past the effects it takes: duplicates' markers are dropped on the way.
        for key in self.pending_effects(limit * 4)? {
            if let Some(effect) = self.claim_effect(&key)? {
                taken.push(effect);
                if taken.len() == limit {
                    break;
                }
            }
        }
        if taken.is_empty() {
            tokio::select! {
                () = self.effect_added() => {}
                () = tokio::time::sleep(IDLE_POLL) => {}
                () = shutdown.cancelled() => {}
            }
            return Ok(taken);
        }
        // The claims must be durable before the effects can happen: after a crash, a claimed
        // effect is found `running` and never run again.
        if let Err(error) = self.flush().await {
            // Not run, and not left `running` for good.
            for mut effect in taken {
                effect.state = EffectState::Interrupted;
                let _ = self.finish_effect(&effect);
            }
            return Err(error.context("cannot make the claims of effects durable; not run"));
        }
        Ok(taken)
    }

    async fn finish(&self, effect: &EffectRecord) -> Result<()> {
        self.finish_effect(effect)
    }

    async fn is_empty(&self) -> Result<bool> {
        Ok(!self.has_pending_effects() && !self.has_running_effects())
    }
}

#[async_trait]
impl Records for Store {
    async fn put(&self, collection: &str, key: &str, value: &[u8]) -> Result<()> {
        self.put_record(collection, key, value)
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.record(collection, key)?.map(|v| v.to_vec()))
    }
}
