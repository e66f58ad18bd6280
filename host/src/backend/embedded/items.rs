//! [`ItemStore`] on this node's sled [`Store`]: it answers at once.

use anyhow::Result;
use async_trait::async_trait;
use uuid::Uuid;

use crate::backend::ItemStore;
use crate::model::ItemResult;
use crate::store::{DeadLetter, Store};

#[async_trait]
impl ItemStore for Store {
    async fn item(&self, job: Uuid, index: u64) -> Result<Option<Vec<u8>>> {
        Ok(Store::item(self, job, index)?.map(|v| v.to_vec()))
    }

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
