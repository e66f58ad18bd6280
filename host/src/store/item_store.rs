//! What running one item reads and writes, apart from its backend: the embedded [`Store`] in
//! sled, or Redis when several nodes share the work (`crate::cluster`).
//!
//! The trait is async because a shared backend answers over the network; the sled
//! implementation answers at once.

use anyhow::Result;
use async_trait::async_trait;
use uuid::Uuid;

use super::{DeadLetter, Store};
use crate::model::ItemResult;

#[async_trait]
pub trait ItemStore: Send + Sync {
    /// A checkpointed output of `stage` for item `index`.
    async fn stage_output(&self, job: Uuid, index: u64, stage: &str) -> Result<Option<Vec<u8>>>;

    /// Checkpoint several stage outputs of one item at once.
    async fn put_stage_outputs(
        &self,
        job: Uuid,
        index: u64,
        outputs: &[(&str, &[u8])],
    ) -> Result<()>;

    /// Drop an item's checkpoints once its result holds them.
    async fn remove_stage_outputs(&self, job: Uuid, index: u64, stages: &[&str]) -> Result<()>;

    /// The journal of `stage` for item `index` (`capabilities/journal.rs`): its entries in order.
    async fn journal(&self, job: Uuid, index: u64, stage: &str) -> Result<Vec<Vec<u8>>>;

    /// Make the journal's entries from position `from` on be `entries`; those the store holds
    /// past them are dropped. `held` is how many entries the store holds, as the caller's
    /// journal knows from reading or writing them (so that a backend need not look).
    async fn put_journal(
        &self,
        job: Uuid,
        index: u64,
        stage: &str,
        from: usize,
        entries: &[Vec<u8>],
        held: usize,
    ) -> Result<()>;

    /// Drop a journal of `held` entries once the stage's output is kept.
    async fn remove_journal(&self, job: Uuid, index: u64, stage: &str, held: usize) -> Result<()>;

    /// Store an item's result. A backend may leave this to whoever runs the item (Redis
    /// writes the result together with its event and the job's counts, in one step).
    async fn put_result(&self, job: Uuid, result: &ItemResult) -> Result<()>;

    async fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>>;

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<()>;

    async fn remove_dead_letter(&self, job: Uuid, index: u64) -> Result<()>;

    /// LLM tokens (prompt and completion) the job's items have used so far.
    async fn llm_tokens(&self, job: Uuid) -> Result<u64>;

    /// Count `tokens` more for the job; the new total.
    async fn add_llm_tokens(&self, job: Uuid, tokens: u64) -> Result<u64>;
}

#[async_trait]
impl ItemStore for Store {
    async fn stage_output(&self, job: Uuid, index: u64, stage: &str) -> Result<Option<Vec<u8>>> {
        Ok(Store::stage_output(self, job, index, stage)?.map(|v| v.to_vec()))
    }

    async fn put_stage_outputs(
        &self,
        job: Uuid,
        index: u64,
        outputs: &[(&str, &[u8])],
    ) -> Result<()> {
        Store::put_stage_outputs(self, job, index, outputs.iter().copied())
    }

    async fn remove_stage_outputs(&self, job: Uuid, index: u64, stages: &[&str]) -> Result<()> {
        Store::remove_stage_outputs(self, job, index, stages.iter().copied())
    }

    async fn journal(&self, job: Uuid, index: u64, stage: &str) -> Result<Vec<Vec<u8>>> {
        Store::journal(self, job, index, stage)
    }

    async fn put_journal(
        &self,
        job: Uuid,
        index: u64,
        stage: &str,
        from: usize,
        entries: &[Vec<u8>],
        held: usize,
    ) -> Result<()> {
        Store::put_journal(self, job, index, stage, from, entries, held)
    }

    async fn remove_journal(&self, job: Uuid, index: u64, stage: &str, held: usize) -> Result<()> {
        Store::put_journal(self, job, index, stage, 0, &[], held)
    }

    async fn put_result(&self, job: Uuid, result: &ItemResult) -> Result<()> {
        Store::put_result(self, job, result)
    }

    async fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>> {
        Store::dead_letter(self, job, index)
    }

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        Store::put_dead_letter(self, letter)
    }

    async fn remove_dead_letter(&self, job: Uuid, index: u64) -> Result<()> {
        Store::remove_dead_letter(self, job, index).map(drop)
    }

    async fn llm_tokens(&self, job: Uuid) -> Result<u64> {
        Store::llm_tokens(self, job)
    }

    async fn add_llm_tokens(&self, job: Uuid, tokens: u64) -> Result<u64> {
        Store::add_llm_tokens(self, job, tokens)
    }
}
