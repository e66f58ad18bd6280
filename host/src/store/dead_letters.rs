//! Dead letters: items whose failed stage ran out of tries (or failed in a way no retry
//! helps), kept per (job, item) until they are reprocessed successfully or discarded.
//! The failed stage's input is not copied: the item and the outputs of the stages before it
//! are in the store already (a failed item checkpoints them), and are put back together on
//! inspection and on reprocessing.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Store, json, keys, parse};
use crate::model::ItemError;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The job's pipeline (empty in letters written before a node served several).
    #[serde(default)]
    pub pipeline: String,
    pub job_id: Uuid,
    pub index: u64,
    pub item_id: Uuid,
    /// The stage that failed, and every try of it.
    pub stage: String,
    pub error: ItemError,
    pub created_at: u64,
    /// Times this item was reprocessed and failed again.
    #[serde(default)]
    pub reprocessed: u32,
}

impl Store {
    pub fn put_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        self.dead_letters
            .insert(keys::item(letter.job_id, letter.index), json(letter)?)?;
        Ok(())
    }

    pub fn dead_letter(&self, job: Uuid, index: u64) -> Result<Option<DeadLetter>> {
        self.dead_letters
            .get(keys::item(job, index))?
            .map(|v| parse(&v))
            .transpose()
    }

    /// Remove a dead letter; whether there was one.
    pub fn remove_dead_letter(&self, job: Uuid, index: u64) -> Result<bool> {
        Ok(self.dead_letters.remove(keys::item(job, index))?.is_some())
    }

    /// Dead letters in (job, index) order: of one job, or of all; after a (job, index) cursor.
    pub fn dead_letters(
        &self,
        job: Option<Uuid>,
        after: Option<(Uuid, u64)>,
    ) -> impl Iterator<Item = Result<DeadLetter>> + Send + use<> {
        let start = match after {
            Some((job, index)) => keys::item(job, index.saturating_add(1)).to_vec(),
            None => job.map(|j| keys::item(j, 0).to_vec()).unwrap_or_default(),
        };
        let range = match job {
            Some(job) => self.dead_letters.range(start..keys::job_end(job)),
            None => self.dead_letters.range(start..),
        };
        range.map(|entry| parse(&entry?.1))
    }
}
