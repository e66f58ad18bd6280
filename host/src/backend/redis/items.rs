//! What an item run keeps in Redis: checkpoints in `sh:{job}:ckpt` (field `<index>:<stage>`),
//! stage journals in `sh:{job}:journal` (scripts [`scripts::JOURNAL`], [`scripts::PUT_JOURNAL`]),
//! dead letters in `sh:{job}:dead` and the index `sh:dead` (`dead_letters.rs`), the job's LLM tokens in `sh:{job}:n` (`llm_tokens`). (Effects
//! and their claims are `effects.rs`'.)
//!
//! Results are not written here: the worker records each with its event and the job's counts
//! in one script (`FINISH`), so that a result and its `item.finished` event cannot part.

use anyhow::{Context, Result};
use async_trait::async_trait;
use redis::AsyncCommands;
use uuid::Uuid;

use super::{Cluster, keys, scripts};
use crate::backend::ItemStore;
use crate::model::ItemResult;
use crate::store::DeadLetter;

fn field(index: u64, stage: &str) -> String {
    format!("{index}:{stage}")
}

#[async_trait]
impl ItemStore for Cluster {
    async fn item(&self, job: Uuid, index: u64) -> Result<Option<Vec<u8>>> {
        self.conn()
            .hget(keys::JobKeys::new(job).items, index)
            .await
            .context("cannot read an item from Redis")
    }

    async fn stage_output(&self, job: Uuid, index: u64, stage: &str) -> Result<Option<Vec<u8>>> {
        self.conn()
            .hget(keys::JobKeys::new(job).checkpoints, field(index, stage))
            .await
            .context("cannot read a checkpoint from Redis")
    }

    async fn put_stage_outputs(
        &self,
        job: Uuid,
        index: u64,
        outputs: &[(&str, &[u8])],
    ) -> Result<()> {
        if outputs.is_empty() {
            return Ok(());
        }
        let fields: Vec<(String, &[u8])> = outputs
            .iter()
            .map(|(stage, output)| (field(index, stage), *output))
            .collect();
        self.conn()
            .hset_multiple::<_, _, _, ()>(keys::JobKeys::new(job).checkpoints, &fields)
            .await
            .context("cannot checkpoint in Redis")
    }

    async fn remove_stage_outputs(&self, job: Uuid, index: u64, stages: &[&str]) -> Result<()> {
        if stages.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = stages.iter().map(|stage| field(index, stage)).collect();
        self.conn()
            .hdel::<_, _, ()>(keys::JobKeys::new(job).checkpoints, fields)
            .await
            .context("cannot remove checkpoints from Redis")
    }

    async fn journal(&self, job: Uuid, index: u64, stage: &str) -> Result<Vec<Vec<u8>>> {
        let entries: Vec<Option<Vec<u8>>> = scripts::JOURNAL
            .key(keys::JobKeys::new(job).journals)
            .arg(field(index, stage))
            .invoke_async(&mut self.conn())
            .await
            .context("cannot read a stage's journal from Redis")?;
        // A missing entry (the hash expired with its job under the reader) ends the journal.
        Ok(entries.into_iter().map_while(|entry| entry).collect())
    }

    async fn put_journal(
        &self,
        job: Uuid,
        index: u64,
        stage: &str,
        from: usize,
        entries: &[Vec<u8>],
        _held: usize,
    ) -> Result<()> {
        // The script reads how many entries the hash holds: other nodes may have written it.
        let mut invocation = scripts::PUT_JOURNAL.prepare_invoke();
        invocation
            .key(keys::JobKeys::new(job).journals)
            .arg(field(index, stage))
            .arg(from);
        for entry in entries {
            invocation.arg(entry.as_slice());
        }
        invocation
            .invoke_async::<()>(&mut self.conn())
            .await
            .context("cannot write a stage's journal to Redis")
    }

    async fn remove_journal(&self, job: Uuid, index: u64, stage: &str, held: usize) -> Result<()> {
        self.put_journal(job, index, stage, 0, &[], held).await
    }

    async fn put_result(&self, _job: Uuid, _result: &ItemResult) -> Result<()> {
        Ok(())
    }

    async fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>> {
        let json: Option<Vec<u8>> = self
            .conn()
            .hget(keys::JobKeys::new(job).dead_letters, index)
            .await
            .context("cannot read a dead letter from Redis")?;
        json.map(|j| serde_json::from_slice(&j).context("corrupt dead letter in Redis"))
            .transpose()
    }

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let (job, index) = (letter.job_id, letter.index);
        redis::pipe()
            .atomic()
            .hset(
                keys::JobKeys::new(job).dead_letters,
                index,
                serde_json::to_vec(letter)?,
            )
            .ignore()
            .zadd(keys::DEAD_LETTERS, keys::dead_letter(job, index), 0)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .context("cannot store a dead letter in Redis")
    }

    async fn remove_dead_letter(&self, job: Uuid, index: u64) -> Result<()> {
        self.discard_letter(job, index).await.map(drop)
    }

    async fn llm_tokens(&self, job: Uuid) -> Result<u64> {
        let tokens: Option<u64> = self
            .conn()
            .hget(keys::JobKeys::new(job).counts, "llm_tokens")
            .await
            .context("cannot read a job's token count from Redis")?;
        Ok(tokens.unwrap_or(0))
    }

    async fn add_llm_tokens(&self, job: Uuid, tokens: u64) -> Result<u64> {
        self.conn()
            .hincr(keys::JobKeys::new(job).counts, "llm_tokens", tokens)
            .await
            .context("cannot count a job's tokens in Redis")
    }
}
