//! Live text of streamed LLM answers: `item.token` events.
//!
//! Unlike the log, tokens are neither stored nor replayed: there are many of them, they matter
//! only while they arrive, and the whole answer is in the item's result anyway. A job has a
//! channel only while someone follows its tokens; without one, publishing is a map lookup.
//! A slow follower misses tokens (it is told how many) rather than growing a buffer.
//!
//! In Redis mode a [`TokenRelay`] carries tokens between nodes: the hub tells it when this
//! node starts and stops following a job, and hands it the tokens of items running here; it
//! brings other nodes' tokens back through [`TokenHub::deliver`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use tokio::sync::broadcast;
use uuid::Uuid;

/// Tokens buffered per job for its slowest follower.
const BUFFERED: usize = 1024;

/// A piece of a streamed answer.
#[derive(Debug, Clone, Serialize)]
pub struct Token {
    pub index: u64,
    pub stage: Arc<str>,
    pub text: String,
}

type Channels = Arc<Mutex<HashMap<Uuid, broadcast::Sender<Token>>>>;

/// Carries tokens to and from the other nodes of a cluster.
pub trait TokenRelay: Send + Sync {
    /// This node follows `job`'s tokens now (`true`), or no longer (`false`).
    fn following(&self, job: Uuid, on: bool);

    /// A token of an item running on this node, for followers elsewhere.
    fn relay(&self, job: Uuid, token: &Token);
}

#[derive(Clone, Default)]
pub struct TokenHub {
    channels: Channels,
    relay: Arc<OnceLock<Arc<dyn TokenRelay>>>,
}

impl TokenHub {
    /// Follow `job`'s tokens from now on.
    pub fn subscribe(&self, job: Uuid) -> TokenSubscription {
        let mut channels = self.channels.lock().expect("not poisoned");
        let first = !channels.contains_key(&job);
        let receiver = channels
            .entry(job)
            .or_insert_with(|| broadcast::channel(BUFFERED).0)
            .subscribe();
        if first && let Some(relay) = self.relay.get() {
            relay.following(job, true);
        }
        TokenSubscription {
            receiver,
            channels: self.channels.clone(),
            relay: self.relay.clone(),
            job,
        }
    }

    /// Carry tokens to and from other nodes through `relay` from now on (set once).
    pub fn set_relay(&self, relay: Arc<dyn TokenRelay>) {
        let _ = self.relay.set(relay);
    }

    /// Hand `token`, of an item running on this node, to `job`'s followers here and elsewhere.
    pub fn publish(&self, job: Uuid, token: Token) {
        if let Some(relay) = self.relay.get() {
            relay.relay(job, &token);
        }
        self.deliver(job, token);
    }

    /// Hand `token` to `job`'s followers on this node, if it has any.
    pub fn deliver(&self, job: Uuid, token: Token) {
        if let Some(sender) = self.channels.lock().expect("not poisoned").get(&job) {
            // An error means every follower left just now; the last one removes the channel.
            let _ = sender.send(token);
        }
    }

    /// Jobs whose tokens someone follows (to check that followers are cleaned up).
    pub fn followed_jobs(&self) -> usize {
        self.channels.lock().expect("not poisoned").len()
    }
}

pub struct TokenSubscription {
    receiver: broadcast::Receiver<Token>,
    channels: Channels,
    relay: Arc<OnceLock<Arc<dyn TokenRelay>>>,
    job: Uuid,
}

impl TokenSubscription {
    /// The next token; `Err(n)` when this follower fell behind and `n` tokens were dropped.
    pub async fn next(&mut self) -> Result<Token, u64> {
        loop {
            match self.receiver.recv().await {
                Ok(token) => return Ok(token),
                Err(broadcast::error::RecvError::Lagged(missed)) => return Err(missed),
                // The hub holds the sender while this subscription lives: never closed.
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }
}

impl Drop for TokenSubscription {
    fn drop(&mut self) {
        let mut channels = self.channels.lock().expect("not poisoned");
        // This subscription's receiver still counts until the fields are dropped.
        if channels
            .get(&self.job)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            channels.remove(&self.job);
            if let Some(relay) = self.relay.get() {
                relay.following(self.job, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> Token {
        Token {
            index: 0,
            stage: "answer".into(),
            text: text.into(),
        }
    }

    #[tokio::test]
    async fn followers_get_tokens_and_leave_nothing_behind() {
        let hub = TokenHub::default();
        let job = Uuid::now_v7();
        hub.publish(job, token("lost: nobody follows"));
        let mut first = hub.subscribe(job);
        let second = hub.subscribe(job);
        hub.publish(job, token("a"));
        assert_eq!(first.next().await.unwrap().text, "a");
        drop(second);
        assert_eq!(hub.followed_jobs(), 1);
        drop(first);
        assert_eq!(hub.followed_jobs(), 0);
    }

    #[tokio::test]
    async fn a_slow_follower_is_told_what_it_missed() {
        let hub = TokenHub::default();
        let job = Uuid::now_v7();
        let mut follower = hub.subscribe(job);
        for i in 0..BUFFERED + 5 {
            hub.publish(job, token(&i.to_string()));
        }
        assert_eq!(follower.next().await.unwrap_err(), 5);
        assert_eq!(follower.next().await.unwrap().text, "5");
    }
}
