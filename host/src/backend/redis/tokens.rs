//! Live tokens across nodes ([`crate::events::TokenRelay`]): a node whose SSE clients follow a
//! job's tokens marks it in `sh:{job}:following` (renewed every second, expiring after
//! [`FOLLOWING_TTL`] when the node stops or dies); a node running items of a marked job (it
//! checks once a second) publishes their tokens on `sh:tokens`, and every node hands the tokens
//! of other nodes to its own followers. Like the tokens themselves this is lossy: the first
//! second of a new follow, and tokens past a full send buffer, are missed.

use std::borrow::Cow;
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Cluster, keys};
use crate::events::{Token, TokenHub, TokenRelay};

/// How long a node's mark that it follows a job outlives the node's last renewal.
const FOLLOWING_TTL: Duration = Duration::from_secs(5);

/// Tokens waiting to be published; past this, tokens are dropped.
const SEND_BUFFER: usize = 4096;

/// A token on `sh:tokens`.
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    /// The job.
    j: Uuid,
    /// The node that ran the item (which delivered it to its own followers already).
    n: Cow<'a, str>,
    i: u64,
    s: Cow<'a, str>,
    t: Cow<'a, str>,
}

impl Cluster {
    /// Carry `hub`'s tokens to and from the other nodes, until `shutdown`.
    pub fn carry_tokens(&self, hub: &TokenHub, shutdown: CancellationToken) {
        let (sender, receiver) = mpsc::channel(SEND_BUFFER);
        if self.inner.tokens.set((hub.clone(), sender)).is_ok() {
            hub.set_relay(std::sync::Arc::new(self.clone()));
            tokio::spawn(self.clone().publish_tokens(receiver, shutdown));
        }
    }

    /// A message of `sh:tokens`: to this node's followers, unless this node sent it.
    pub(super) fn token_arrived(&self, payload: &[u8]) {
        let Some((hub, _)) = self.inner.tokens.get() else {
            return;
        };
        let Ok(wire) = serde_json::from_slice::<Wire>(payload) else {
            return;
        };
        if wire.n != self.node() {
            let token = Token {
                index: wire.i,
                stage: wire.s.as_ref().into(),
                text: wire.t.into_owned(),
            };
            hub.deliver(wire.j, token);
        }
    }

    /// Renew this node's follow marks, and see which of the jobs running here are followed
    /// anywhere (the poll, once a second).
    pub(super) async fn check_following(&self) -> redis::RedisResult<()> {
        let here: Vec<Uuid> = self.lock_following().iter().copied().collect();
        let running = self.running_jobs();
        if here.is_empty() && running.is_empty() {
            return Ok(());
        }
        let mut query = redis::pipe();
        for job in &here {
            query
                .set_ex(keys::following(*job), 1, FOLLOWING_TTL.as_secs())
                .ignore();
        }
        for job in &running {
            query.exists(keys::following(*job));
        }
        let followed: Vec<bool> = query.query_async(&mut self.conn()).await?;
        let mut elsewhere = self.inner.followed.lock().expect("not poisoned");
        elsewhere.clear();
        elsewhere.extend(
            running
                .into_iter()
                .zip(followed)
                .filter_map(|(job, followed)| followed.then_some(job)),
        );
        Ok(())
    }

    fn lock_following(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<Uuid>> {
        self.inner.following.lock().expect("not poisoned")
    }

    async fn publish_tokens(self, mut receiver: mpsc::Receiver<Vec<u8>>, stop: CancellationToken) {
        let mut batch = Vec::new();
        loop {
            let received = tokio::select! {
                received = receiver.recv_many(&mut batch, 256) => received,
                () = stop.cancelled() => return,
            };
            if received == 0 {
                return;
            }
            let mut query = redis::pipe();
            for payload in batch.drain(..) {
                query.publish(keys::TOKENS_CHANNEL, payload).ignore();
            }
            if let Err(error) = query.query_async::<()>(&mut self.conn()).await {
                tracing::debug!(%error, "live tokens lost on their way to Redis");
            }
        }
    }
}

impl TokenRelay for Cluster {
    fn following(&self, job: Uuid, on: bool) {
        if !on {
            self.lock_following().remove(&job);
            return;
        }
        self.lock_following().insert(job);
        // Marked at once, not at the next poll: the running node looks within a second.
        let cluster = self.clone();
        tokio::spawn(async move {
            let _: redis::RedisResult<()> = cluster
                .conn()
                .set_ex(keys::following(job), 1, FOLLOWING_TTL.as_secs())
                .await;
        });
    }

    fn relay(&self, job: Uuid, token: &Token) {
        if !self
            .inner
            .followed
            .lock()
            .expect("not poisoned")
            .contains(&job)
        {
            return;
        }
        let Some((_, sender)) = self.inner.tokens.get() else {
            return;
        };
        let wire = Wire {
            j: job,
            n: self.node().into(),
            i: token.index,
            s: token.stage.as_ref().into(),
            t: token.text.as_str().into(),
        };
        if let Ok(payload) = serde_json::to_vec(&wire) {
            // Full: followers elsewhere miss this token, as a slow follower does.
            let _ = sender.try_send(payload);
        }
    }
}
