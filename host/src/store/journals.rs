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

    /// Make the journal's entries from position `from` on be `entries`: those the store holds
    /// past them are dropped. Plain inserts and removes, not a sled batch (each batch syncs the
    /// log): a crash halfway leaves stale entries after new ones, which is harmless since each
    /// entry answers only the very request it names (`capabilities/journal.rs`).
    pub fn put_journal(
        &self,
        job: Uuid,
        index: u64,
        stage: &str,
        from: usize,
        entries: &[Vec<u8>],
    ) -> Result<()> {
        let prefix = keys::journal(job, index, stage);
        for (position, entry) in (from..).zip(entries) {
            self.journals
                .insert(keys::journal_entry(&prefix, position), entry.as_slice())?;
        }
        let stale = self
            .journals
            .range(keys::journal_entry(&prefix, from + entries.len())..keys::journal_end(&prefix));
        for key in stale.keys() {
            self.journals.remove(key?)?;
        }
        Ok(())
    }

    pub fn remove_journal(&self, job: Uuid, index: u64, stage: &str) -> Result<()> {
        self.put_journal(job, index, stage, 0, &[])
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
            .put_journal(job, 3, "ab", 0, &entries(&["1", "2", "3"]))
            .unwrap();
        // A stage whose name starts like another's keeps its own journal.
        store
            .put_journal(job, 3, "a", 0, &entries(&["other"]))
            .unwrap();
        assert_eq!(
            store.journal(job, 3, "ab").unwrap(),
            entries(&["1", "2", "3"])
        );
        store
            .put_journal(job, 3, "ab", 1, &entries(&["2b"]))
            .unwrap();
        assert_eq!(store.journal(job, 3, "ab").unwrap(), entries(&["1", "2b"]));
        store.put_journal(job, 3, "ab", 0, &[]).unwrap();
        assert!(store.journal(job, 3, "ab").unwrap().is_empty());
        assert_eq!(store.journal(job, 3, "a").unwrap(), entries(&["other"]));
        store.remove_journal(job, 3, "a").unwrap();
        assert!(store.journal(job, 3, "a").unwrap().is_empty());
    }
}
