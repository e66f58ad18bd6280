//! Stage journals: the answers of an item's stage try, one entry per host call, kept while the
//! stage has no output yet so that a restart or a retry does not pay for them again (see
//! `capabilities/journal.rs`). Entries are opaque bytes here.

use anyhow::Result;
use uuid::Uuid;

use super::{Store, keys};

impl Store {
    /// The journal of `stage` for item `index`, its entries in order.
    pub fn journal(&self, job: Uuid, index: u64, stage: &str) -> Result<Vec<Vec<u8>>> {
        self.journals
            .scan_prefix(keys::journal(job, index, stage))
            .values()
            .map(|value| Ok(value?.to_vec()))
            .collect()
    }

    /// Every journal entry a job's items hold, as (index, stage, position, bytes): for
    /// `stagehand inspect journals`.
    pub fn journal_entries(
        &self,
        job: Uuid,
    ) -> impl Iterator<Item = Result<(u64, String, u64, usize)>> + use<> {
        self.journals.scan_prefix(job.as_bytes()).map(|entry| {
            let (key, value) = entry?;
            let (index, stage, position) = keys::journal_entry_of(&key)?;
            Ok((index, stage, position, value.len()))
        })
    }

    /// Make the journal's entries from position `from` on be `entries`, and drop those past
    /// them up to `held` (what the store holds, as the caller's journal knows: it read them at
    /// stage entry or wrote them, and it alone writes them on this node), so that no range is
    /// scanned. Plain inserts and removes, not a sled batch (each batch syncs the log): a
    /// crash halfway leaves stale entries after new ones, which is harmless since each entry
    /// answers only the very request it names (`capabilities/journal.rs`); the next load reads
    /// them, so they are counted in the next `held`.
    pub fn put_journal(
        &self,
        job: Uuid,
        index: u64,
        stage: &str,
        from: usize,
        entries: &[Vec<u8>],
        held: usize,
    ) -> Result<()> {
        let prefix = keys::journal(job, index, stage);
        for (position, entry) in (from..).zip(entries) {
            self.journals
                .insert(keys::journal_entry(&prefix, position), entry.as_slice())?;
        }
        for position in from + entries.len()..held {
            self.journals
                .remove(keys::journal_entry(&prefix, position))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_replaces_the_journal_from_its_position_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let job = Uuid::now_v7();
        let entries = |names: &[&str]| {
            names
                .iter()
                .map(|n| n.as_bytes().to_vec())
                .collect::<Vec<_>>()
        };
        store
            .put_journal(job, 3, "ab", 0, &entries(&["1", "2", "3"]), 0)
            .unwrap();
        // A stage whose name starts like another's keeps its own journal.
        store
            .put_journal(job, 3, "a", 0, &entries(&["other"]), 0)
            .unwrap();
        assert_eq!(
            store.journal(job, 3, "ab").unwrap(),
            entries(&["1", "2", "3"])
        );
        store
            .put_journal(job, 3, "ab", 1, &entries(&["2b"]), 3)
            .unwrap();
        assert_eq!(store.journal(job, 3, "ab").unwrap(), entries(&["1", "2b"]));
        let listed: Vec<_> = store
            .journal_entries(job)
            .map(|entry| entry.map(|(index, stage, position, _)| (index, stage, position)))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(
            listed,
            [(3, "a".into(), 0), (3, "ab".into(), 0), (3, "ab".into(), 1)]
        );
        store.put_journal(job, 3, "ab", 0, &[], 2).unwrap();
        assert!(store.journal(job, 3, "ab").unwrap().is_empty());
        assert_eq!(store.journal(job, 3, "a").unwrap(), entries(&["other"]));
        store.put_journal(job, 3, "a", 0, &[], 1).unwrap();
        assert!(store.journal(job, 3, "a").unwrap().is_empty());
    }
}
