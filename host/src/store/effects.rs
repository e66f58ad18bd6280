//! Durable effects: what `dispatch.emit` records and the effect runner executes.
//!
//! An effect is identified by (handler, idempotency key). Its record in `effects` says its
//! state; `effects_pending` and `effects_running` index the ones queued and in flight, so that
//! the runner and start-up never scan every effect ever recorded. Every step is a single-key
//! compare-and-swap on the record, with the index written around it in an order a crash cannot
//! break (sled transactions and batches write and sync the log twice each, which under load was
//! a large share of the server's CPU, docs/BENCHMARKS.md):
//!
//! - recording marks the key pending first, then creates the record only if there is none: an
//!   effect is either unknown, known and queued, or a duplicate whose marker the runner drops;
//! - claiming lists the key running, then swaps the record from pending to running, then drops
//!   the pending marker; an effect found running after a restart is marked interrupted and not
//!   run again: effects run *at most once* per key.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Store, json, keys, parse};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectState {
    Pending,
    Running,
    Done,
    Failed,
    /// Was running when the process stopped; not run again (at most once).
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitOutcome {
    Accepted,
    Duplicate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EffectRecord {
    /// The pipeline whose stage emitted it, whose handler runs it (empty in records written
    /// before a node served several pipelines: the node's only pipeline runs those).
    #[serde(default)]
    pub pipeline: String,
    /// The pipeline's revision (empty in records written before revisions: the current one
    /// runs those).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    pub handler: String,
    pub key: String,
    pub payload: String,
    pub job_id: Uuid,
    pub item_id: Uuid,
    pub item_index: u64,
    /// The stage that emitted it.
    pub stage: String,
    pub state: EffectState,
    pub created_at: u64,
    #[serde(default)]
    pub finished_at: Option<u64>,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// Times the effect was claimed for running: never more than one.
    #[serde(default)]
    pub runs: u32,
    /// The node that ran it (Redis mode, where any node may).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl EffectState {
    /// The state as it is written in a record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
}

impl EffectRecord {
    fn store_key(&self) -> Vec<u8> {
        keys::named(&self.handler, &self.key)
    }
}

impl Store {
    /// Record an effect unless its (handler, key) is known already.
    pub fn emit_effect(&self, record: &EffectRecord) -> Result<EmitOutcome> {
        let key = record.store_key();
        // The marker first: a record never exists without one while it is pending. A marker
        // without a record (the record is being written, or a crash came between) is left to
        // the writer, or dropped at start-up.
        self.effects_pending.insert(key.as_slice(), &[])?;
        let created = self
            .effects
            .compare_and_swap(&key, None::<&[u8]>, Some(json(record)?))?;
        // Woken either way: a duplicate's marker is for the runner to drop.
        self.effects_added.notify_one();
        Ok(match created {
            Ok(()) => EmitOutcome::Accepted,
            Err(_) => EmitOutcome::Duplicate,
        })
    }

    /// Until an effect is recorded after the last wake-up.
    pub async fn effect_added(&self) {
        self.effects_added.notified().await
    }

    /// Keys of up to `limit` effects waiting to run, oldest key order first.
    pub fn pending_effects(&self, limit: usize) -> Result<Vec<Vec<u8>>> {
        self.effects_pending
            .iter()
            .keys()
            .take(limit)
            .map(|k| Ok(k?.to_vec()))
            .collect()
    }

    pub fn has_pending_effects(&self) -> bool {
        !self.effects_pending.is_empty()
    }

    /// Whether an effect is claimed and not finished.
    pub fn has_running_effects(&self) -> bool {
        !self.effects_running.is_empty()
    }

    /// Take a pending effect for running; `None` if it is no longer pending (or its record is
    /// still being written).
    pub fn claim_effect(&self, key: &[u8]) -> Result<Option<EffectRecord>> {
        let Some(current) = self.effects.get(key)? else {
            return Ok(None);
        };
        let mut record: EffectRecord = parse(&current)?;
        if record.state != EffectState::Pending {
            // A duplicate's marker, or one a crash left behind a claim.
            self.effects_pending.remove(key)?;
            return Ok(None);
        }
        record.state = EffectState::Running;
        record.runs += 1;
        // Listed running before it is: start-up finds every effect that may have started.
        self.effects_running.insert(key, &[])?;
        let swapped = self
            .effects
            .compare_and_swap(key, Some(current), Some(json(&record)?))?;
        if swapped.is_err() {
            // Another claim won.
            return Ok(None);
        }
        self.effects_pending.remove(key)?;
        Ok(Some(record))
    }

    /// Store the outcome of a claimed effect.
    pub fn finish_effect(&self, record: &EffectRecord) -> Result<()> {
        let key = record.store_key();
        self.effects.insert(key.as_slice(), json(record)?)?;
        self.effects_running.remove(key)?;
        Ok(())
    }

    pub fn effect(&self, handler: &str, key: &str) -> Result<Option<EffectRecord>> {
        self.effects
            .get(keys::named(handler, key))?
            .map(|v| parse(&v))
            .transpose()
    }

    /// Every effect ever recorded (for inspection and tests).
    pub fn effects(&self) -> impl Iterator<Item = Result<EffectRecord>> + use<> {
        self.effects.iter().values().map(|v| parse(&v?))
    }

    /// After a restart: effects that were running when the process stopped may or may not have
    /// taken place; to keep "at most once" they are marked interrupted, never rerun.
    pub fn interrupt_running_effects(&self) -> Result<usize> {
        // Markers whose record a crash kept from being written.
        for key in self.effects_pending.iter().keys() {
            let key = key?;
            if !self.effects.contains_key(&key)? {
                self.effects_pending.remove(key)?;
            }
        }
        let mut interrupted = 0;
        for key in self.effects_running.iter().keys() {
            let key = key?;
            match self
                .effects
                .get(&key)?
                .map(|v| parse::<EffectRecord>(&v))
                .transpose()?
            {
                Some(mut record) if record.state == EffectState::Running => {
                    record.state = EffectState::Interrupted;
                    self.finish_effect(&record)?;
                    interrupted += 1;
                }
                _ => {
                    self.effects_running.remove(key)?;
                }
            }
        }
        Ok(interrupted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effect(key: &str) -> EffectRecord {
        EffectRecord {
            pipeline: "test".into(),
            revision: String::new(),
            handler: "save".into(),
            key: key.into(),
            payload: "{}".into(),
            job_id: Uuid::nil(),
            item_id: Uuid::nil(),
            item_index: 0,
            stage: "reward".into(),
            state: EffectState::Pending,
            created_at: 0,
            finished_at: None,
            output: None,
            error: None,
            runs: 0,
            node: None,
        }
    }

    #[test]
    fn a_duplicate_runs_once_and_stray_markers_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.emit_effect(&effect("a")).unwrap(),
            EmitOutcome::Accepted
        );
        let key = effect("a").store_key();
        let claimed = store.claim_effect(&key).unwrap().expect("pending");
        assert_eq!((claimed.state, claimed.runs), (EffectState::Running, 1));
        assert!(store.claim_effect(&key).unwrap().is_none(), "claimed once");

        // A duplicate emit marks the key again; the runner drops the marker, runs nothing.
        assert_eq!(
            store.emit_effect(&effect("a")).unwrap(),
            EmitOutcome::Duplicate
        );
        assert_eq!(store.pending_effects(10).unwrap(), vec![key.clone()]);
        assert!(store.claim_effect(&key).unwrap().is_none());
        assert!(!store.has_pending_effects());

        // A marker whose record a crash kept from being written: left to its writer while
        // running, dropped at start-up.
        let stray = effect("b").store_key();
        store.effects_pending.insert(&stray, &[]).unwrap();
        assert!(store.claim_effect(&stray).unwrap().is_none());
        assert!(store.has_pending_effects());
        assert_eq!(
            store.interrupt_running_effects().unwrap(),
            1,
            "`a` was running"
        );
        assert!(!store.has_pending_effects());
    }
}
