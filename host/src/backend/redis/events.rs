//! Each job's log as the Redis stream `sh:{job}:events`, entry ids `<number>-0`, so that
//! `Last-Event-ID: N` reads the same events on every node (`XRANGE (N-0 +`).
//!
//! An entry is the event as Rust built it (field `e`) and, for an event that carries the job's
//! counts, the counts the script that numbered it wrote (field `n`), filled in when read.
//!
//! Events in Redis are readable as soon as they are written, so a follower's watch value
//! is always `u64::MAX` ("read all there is"); a change only says "read again".

use anyhow::{Context, Result};
use async_trait::async_trait;
use redis::streams::StreamRangeReply;
use tokio::sync::watch;
use uuid::Uuid;

use super::{Cluster, keys::JobKeys};
use crate::backend::EventSource;
use crate::events::{Counts, Entry};

impl Cluster {
    /// Tell this node's followers of `job` to read again.
    pub(super) fn wake(&self, job: Uuid) {
        if let Some(sender) = self.inner.followers.lock().expect("not poisoned").get(&job) {
            sender.send_modify(|_| {});
        }
    }

    /// Wake every follower, and forget the channels nobody follows any more.
    pub(super) fn wake_all(&self) {
        let mut followers = self.inner.followers.lock().expect("not poisoned");
        followers.retain(|_, sender| sender.receiver_count() > 0);
        for sender in followers.values() {
            sender.send_modify(|_| {});
        }
    }

    /// Events of `job` from the stream entries `range` returned.
    fn entries(reply: StreamRangeReply) -> Result<Vec<(u64, Entry)>> {
        reply
            .ids
            .into_iter()
            .map(|entry| {
                let seq = entry
                    .id
                    .split('-')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("bad event id `{}`", entry.id))?;
                let json: Vec<u8> = entry.get("e").context("an event without `e`")?;
                let mut event: Entry =
                    serde_json::from_slice(&json).context("corrupt event in Redis")?;
                if let Some(counts) = entry.get::<String>("n") {
                    let counts = Counts::parse(&counts)
                        .with_context(|| format!("bad counts `{counts}` in event {seq}"))?;
                    event.event = event.event.with_counts(counts);
                }
                Ok((seq, event))
            })
            .collect()
    }
}

#[async_trait]
impl EventSource for Cluster {
    fn watch(&self, job: Uuid) -> Result<watch::Receiver<u64>> {
        let mut followers = self.inner.followers.lock().expect("not poisoned");
        Ok(followers
            .entry(job)
            .or_insert_with(|| watch::Sender::new(u64::MAX))
            .subscribe())
    }

    async fn read(
        &self,
        job: Uuid,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Entry)>> {
        let end = if upto == u64::MAX {
            "+".to_string()
        } else {
            format!("{upto}-0")
        };
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(JobKeys::new(job).events)
            .arg(format!("({after}-0"))
            .arg(end)
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.conn())
            .await
            .context("cannot read events from Redis")?;
        Self::entries(reply)
    }

    async fn ended_at(&self, job: Uuid) -> Result<Option<u64>> {
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(JobKeys::new(job).events)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn())
            .await
            .context("cannot read events from Redis")?;
        Ok(Self::entries(reply)?
            .pop()
            .filter(|(_, entry)| entry.event.is_terminal())
            .map(|(seq, _)| seq))
    }

    fn release(&self, job: Uuid) {
        let mut followers = self.inner.followers.lock().expect("not poisoned");
        if followers
            .get(&job)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            followers.remove(&job);
        }
    }
}
