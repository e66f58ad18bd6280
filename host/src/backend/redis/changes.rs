//! Operators' changes every node applies ([`crate::backend::Changes`]): records in the hash
//! `sh:changes`, the files they name in `sh:file:<sha256>`, and the counter `sh:changes:n`,
//! all written by one script; the counter is published on `sh:changed` and polled every second,
//! so a node that misses the message is at most a second behind.

use anyhow::{Context, Result};
use async_trait::async_trait;
use redis::AsyncCommands;
use tokio::sync::watch;

use super::{Cluster, keys, scripts};
use crate::backend::Changes;

impl Cluster {
    /// The counter is at least `n` (the counter only moves up).
    pub(super) fn heard_of_change(&self, n: u64) {
        self.inner.changes.send_if_modified(|seen| {
            let newer = n > *seen;
            if newer {
                *seen = n;
            }
            newer
        });
    }

    /// Read the counter (the poll behind pub/sub).
    pub(super) async fn check_changes(&self) -> Result<()> {
        let n: Option<u64> = self.conn().get(keys::CHANGES_COUNTER).await?;
        self.heard_of_change(n.unwrap_or(0));
        Ok(())
    }
}

#[async_trait]
impl Changes for Cluster {
    async fn publish(
        &self,
        key: &str,
        expected: Option<Option<&[u8]>>,
        record: &[u8],
        files: &[(&str, &[u8])],
    ) -> Result<Option<u64>> {
        let (check, value): (&str, &[u8]) = match expected {
            None => ("any", b""),
            Some(None) => ("absent", b""),
            Some(Some(value)) => ("equals", value),
        };
        let mut invocation = scripts::PUBLISH_CHANGE.prepare_invoke();
        invocation
            .key(keys::CHANGES)
            .key(keys::CHANGES_COUNTER)
            .arg(key)
            .arg(record)
            .arg(check)
            .arg(value);
        for (digest, bytes) in files {
            invocation.key(keys::file(digest)).arg(*bytes);
        }
        let n: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .with_context(|| format!("cannot publish the change of `{key}` in Redis"))?;
        if n < 0 {
            return Ok(None);
        }
        self.heard_of_change(n as u64);
        Ok(Some(n as u64))
    }

    async fn records(&self, prefix: &str) -> Result<(u64, Vec<(String, Vec<u8>)>)> {
        let (n, all): (Option<u64>, Vec<(String, Vec<u8>)>) = redis::pipe()
            .atomic()
            .get(keys::CHANGES_COUNTER)
            .hgetall(keys::CHANGES)
            .query_async(&mut self.conn())
            .await
            .context("cannot read the cluster's changes from Redis")?;
        let records = all
            .into_iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .collect();
        Ok((n.unwrap_or(0), records))
    }

    async fn applied(&self, n: u64) -> Result<()> {
        self.conn()
            .hset::<_, _, _, ()>(keys::CHANGES_APPLIED, self.node(), n)
            .await
            .context("cannot tell Redis which changes this node serves")
    }

    async fn file(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        self.conn()
            .get(keys::file(digest))
            .await
            .with_context(|| format!("cannot read file {digest} from Redis"))
    }

    async fn keep_files(&self, files: &[(&str, &[u8])]) -> Result<()> {
        let mut pipe = redis::pipe();
        for (digest, bytes) in files {
            pipe.set_options(
                keys::file(digest),
                *bytes,
                redis::SetOptions::default().conditional_set(redis::ExistenceCheck::NX),
            )
            .ignore();
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .context("cannot keep files in Redis")
    }

    fn counter(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}
