//! Redis mode: several nodes share one work queue, one set of jobs, results and event logs,
//! and one cancel registry, all in Redis (docs/REDIS.md).
//!
//! - [`keys`]: every key and channel, with a job's keys in one Cluster hash slot.
//! - [`scripts`]: the Lua that numbers events and settles items and jobs atomically.
//! - [`jobs`]: the jobs as the HTTP API sees them ([`crate::backend::JobBackend`]).
//! - [`events`]: each job's log as a Redis stream ([`crate::backend::EventSource`]).
//! - [`items`]: checkpoints and dead letters ([`crate::backend::ItemStore`]).
//! - [`effects`]: one effect queue for the cluster ([`crate::backend::EffectQueue`]): each
//!   (handler, key) runs once whichever node emits it, taken over when its node dies.
//! - [`records`]: handlers' records ([`crate::backend::Records`]).
//! - [`dead_letters`]: dead letters listed, read, discarded and reprocessed from any node, and
//!   the lease that lets one node at a time reprocess them on a timer.
//! - [`changes`]: operators' changes (stage versions) every node applies
//!   ([`crate::backend::Changes`]).
//! - [`tokens`]: live tokens of streamed answers, from the node that runs the item to the
//!   nodes whose clients follow them.
//! - [`signals`]: pub/sub wake-ups and cancels, and the poll that backs them up.
//! - [`worker`]: the loop that takes items from the `sh:work` stream through the consumer group,
//!   runs them, acknowledges them, and reclaims the items of nodes that died.
//!
//! Redis is the shared truth; pub/sub only speeds things up. A lost wake-up delays a follower
//! until the next poll, a lost cancel message until the next check of the cancel key.

mod changes;
mod dead_letters;
pub mod effects;
mod events;
mod items;
mod jobs;
pub mod keys;
pub mod records;
mod scripts;
mod signals;
mod tokens;
mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use worker::{WorkerSettings, run_worker};

use crate::pipeline::{Pipelines, Shared};

/// How long an idempotent command is tried again while Redis cannot be reached.
const RIDE_OUT: Duration = Duration::from_secs(10);

/// A node's handle on the shared state. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    /// This node's consumer name in the work group.
    node: String,
    /// How long a finished job's keys are kept.
    retention: Duration,
    /// Wake-up channels of the jobs followed on this node.
    followers: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    /// Jobs with items running on this node: their cancel token, and how many items.
    running: Mutex<HashMap<Uuid, (CancellationToken, usize)>>,
    /// The pipelines this node serves, set once they are loaded (after [`Cluster::shared`]):
    /// what a reprocess checks a job can run on.
    pipelines: OnceLock<Arc<Pipelines>>,
    /// The change counter as this node last heard of it (`changes.rs`).
    changes: watch::Sender<u64>,
    /// Live tokens (`tokens.rs`): the node's hub and the queue of tokens to publish.
    tokens: OnceLock<(crate::events::TokenHub, tokio::sync::mpsc::Sender<Vec<u8>>)>,
    /// Jobs whose live tokens this node's clients follow.
    following: Mutex<HashSet<Uuid>>,
    /// Jobs running here whose live tokens some node follows (checked once a second).
    followed: Mutex<HashSet<Uuid>>,
}

impl Cluster {
    /// Connect to Redis at `url` (`redis://host:port/db`), make sure the work group exists,
    /// and start listening for wake-ups and cancels (until `shutdown`).
    pub async fn connect(
        url: &str,
        retention: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("bad Redis URL `{url}`"))?;
        // A submission is one transaction; a large one takes Redis a while.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .with_context(|| format!("cannot connect to Redis at {url}"))?;
        let node = format!(
            "{}-{}",
            std::process::id(),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let cluster = Self {
            inner: Arc::new(Inner {
                client,
                conn,
                node,
                retention,
                followers: Mutex::default(),
                running: Mutex::default(),
                pipelines: OnceLock::new(),
                changes: watch::Sender::new(0),
                tokens: OnceLock::new(),
                following: Mutex::default(),
                followed: Mutex::default(),
            }),
        };
        cluster.create_groups().await?;
        cluster.check_changes().await?;
        tokio::spawn(signals::listen(cluster.clone(), shutdown.clone()));
        tokio::spawn(signals::poll(cluster.clone(), shutdown));
        tracing::info!(node = %cluster.inner.node, "joined the Redis cluster");
        Ok(cluster)
    }

    /// The shared backends a pipeline runs its items on. Effects taken by this node are kept
    /// from looking abandoned (see `effects.rs`) until `shutdown`; after `reclaim_idle` without
    /// that, another node takes them over.
    pub fn shared(&self, reclaim_idle: Duration, shutdown: CancellationToken) -> Shared {
        Shared {
            items: Some(Arc::new(self.clone())),
            effects: Some(effects::SharedEffects::start(
                self.clone(),
                reclaim_idle,
                shutdown,
            )),
            records: Some(Arc::new(self.clone())),
        }
    }

    /// The pipelines this node serves, once they are loaded.
    pub fn serve(&self, pipelines: Arc<Pipelines>) {
        let _ = self.inner.pipelines.set(pipelines);
    }

    /// This node's name in the work group.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// Make sure the consumer groups of the work and effect streams exist (with their
    /// streams): at start, and after Redis lost them (restarted without its data).
    async fn create_groups(&self) -> Result<()> {
        for (stream, group) in [
            (keys::WORK, keys::GROUP),
            (keys::EFFECTS, keys::EFFECT_GROUP),
        ] {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn())
                .await;
            match created {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e).with_context(|| format!("cannot create group `{group}`")),
            }
        }
        Ok(())
    }

    /// A connection of its own for blocking reads (`XREADGROUP ... BLOCK`), which on the shared
    /// one would hold up every other command behind them; it waits for an answer up to five
    /// times `block`, and reconnects after Redis comes back.
    async fn blocking_connection(&self, block: Duration) -> Result<ConnectionManager> {
        let config = ConnectionManagerConfig::new().set_response_timeout(Some(block * 5));
        ConnectionManager::new_with_config(self.inner.client.clone(), config)
            .await
            .context("cannot connect to Redis")
    }

    /// Run `command`, an idempotent one, again while Redis cannot be reached (restarting, or a
    /// connection it dropped, which the manager replaces), for up to [`RIDE_OUT`]: what a
    /// handler writes must not fail for good on a moment of Redis being away.
    async fn idempotent<T, F, Fut>(&self, mut command: F) -> redis::RedisResult<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + RIDE_OUT;
        loop {
            match command(self.conn()).await {
                Err(error)
                    if (error.is_io_error()
                        || error.is_connection_dropped()
                        || error.is_connection_refusal())
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                answer => return answer,
            }
        }
    }

    /// Reset the idle time of the entries `ids` of `stream` that this node still owns in
    /// `group` (a heartbeat: see [`scripts::REFRESH`]); how many it owned.
    async fn refresh(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64> {
        let mut refresh = scripts::REFRESH.key(stream);
        refresh.arg(group).arg(self.node()).arg(ids);
        refresh
            .invoke_async(&mut self.conn())
            .await
            .with_context(|| format!("cannot refresh this node's entries of `{stream}`"))
    }

    /// Run `script` over `job`'s keys with the common arguments and `extra` ones.
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        job: Uuid,
        extra: &[&[u8]],
    ) -> Result<T> {
        self.run_script_with(script, job, &[], extra).await
    }

    /// [`Self::run_script`] with `more_keys` after the job's.
    async fn run_script_with<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        job: Uuid,
        more_keys: &[&str],
        extra: &[&[u8]],
    ) -> Result<T> {
        let keys = keys::JobKeys::new(job);
        let mut invocation = script.prepare_invoke();
        for key in keys.all().into_iter().chain(more_keys.iter().copied()) {
            invocation.key(key);
        }
        invocation
            .arg(job.to_string())
            .arg(crate::model::now_ms())
            .arg(self.inner.retention.as_secs().max(1));
        for arg in extra {
            invocation.arg(*arg);
        }
        invocation
            .invoke_async(&mut self.conn())
            .await
            .context("a Redis script failed")
    }

    /// [`Self::run_script`] for the scripts that may end the job: the two events it may end
    /// with go first (`ARGV[4]`, `ARGV[5]`; see [`scripts`]).
    async fn run_settling_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        job: Uuid,
        extra: &[&[u8]],
    ) -> Result<T> {
        let at = crate::model::now_ms();
        let ended = |cancelled| {
            serde_json::to_vec(&crate::events::Entry {
                at,
                event: crate::events::Event::job_ended(cancelled),
            })
        };
        let (completed, cancelled) = (ended(false)?, ended(true)?);
        let mut args: Vec<&[u8]> = vec![&completed, &cancelled];
        args.extend_from_slice(extra);
        self.run_script_with(script, job, &keys::FEED_KEYS, &args)
            .await
    }

    /// Count an item running on this node under `job`'s cancel token.
    fn enter(&self, job: Uuid) -> CancellationToken {
        let mut running = self.inner.running.lock().expect("not poisoned");
        let entry = running
            .entry(job)
            .or_insert_with(|| (CancellationToken::new(), 0));
        entry.1 += 1;
        entry.0.clone()
    }

    fn leave(&self, job: Uuid) {
        let mut running = self.inner.running.lock().expect("not poisoned");
        if let Some(entry) = running.get_mut(&job) {
            entry.1 -= 1;
            if entry.1 == 0 {
                running.remove(&job);
            }
        }
    }

    /// Interrupt `job`'s items running on this node.
    fn cancel_here(&self, job: Uuid) {
        if let Some((token, _)) = self.inner.running.lock().expect("not poisoned").get(&job) {
            token.cancel();
        }
    }

    /// Jobs with items running on this node.
    fn running_jobs(&self) -> Vec<Uuid> {
        let running = self.inner.running.lock().expect("not poisoned");
        running.keys().copied().collect()
    }
}
