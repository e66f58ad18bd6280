//! Durable effects: what `dispatch.emit` records and the effect runner executes.
//!
//! An effect is identified by (handler, idempotency key). Recording is a transaction over
//! `effects` and `effects_pending`, so an effect is either unknown, or known and queued. Claiming
//! moves it from pending to running in one transaction (and lists it in `effects_running`, so
//! that start-up looks at the effects in flight, not at every effect ever recorded); an effect
//! found running after a restart is marked interrupted and not run again: effects run *at most
//! once* per key.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
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
}

impl EffectRecord {
    fn store_key(&self) -> Vec<u8> {
        keys::named(&self.handler, &self.key)
    }
}

type TxError = ConflictableTransactionError<anyhow::Error>;

fn tx_result<T>(result: Result<T, TransactionError<anyhow::Error>>) -> Result<T> {
    result.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    })
}

impl Store {
    /// Record an effect unless its (handler, key) is known already.
    pub fn emit_effect(&self, record: &EffectRecord) -> Result<EmitOutcome> {
        let key = record.store_key();
        let value = json(record)?;
        tx_result(
            (&self.effects, &self.effects_pending).transaction(|(effects, pending)| {
                if effects.get(&key)?.is_some() {
                    return Ok(EmitOutcome::Duplicate);
                }
                effects.insert(key.as_slice(), value.as_slice())?;
                pending.insert(key.as_slice(), &[])?;
                Ok(EmitOutcome::Accepted)
            }),
        )
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

    /// Take a pending effect for running; `None` if it is no longer pending.
    pub fn claim_effect(&self, key: &[u8]) -> Result<Option<EffectRecord>> {
        tx_result(
            (&self.effects, &self.effects_pending, &self.effects_running).transaction(
                |(effects, pending, running)| {
                    if pending.remove(key)?.is_none() {
                        return Ok(None);
                    }
                    let Some(value) = effects.get(key)? else {
                        return Ok(None);
                    };
                    let mut record: EffectRecord = parse(&value).map_err(TxError::Abort)?;
                    record.state = EffectState::Running;
                    record.runs += 1;
                    effects.insert(key, json(&record).map_err(TxError::Abort)?)?;
                    running.insert(key, &[])?;
                    Ok(Some(record))
                },
            ),
        )
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
