//! One effect queue for the cluster: every node's stages emit into it, every node that runs
//! work runs effects from it, and each (handler, key) runs at most once, whichever node emits
//! it and whichever nodes die.
//!
//! An effect is a hash ([`keys::effect`]: its record, `state`, `runs`, `node`) and, while it is
//! queued or running, an entry of the [`keys::EFFECTS`] stream naming it. The scripts
//! (`scripts.rs`) make every step one atomic write:
//!
//! - `EMIT_EFFECT` creates the hash and the entry together, or neither when the key was
//!   claimed before: the claim *is* the queued effect, so no node dies between them;
//! - runners read entries through the consumer group [`keys::EFFECT_GROUP`], and
//!   `TAKE_EFFECT` marks an entry's effect running for this node before it runs;
//! - `FINISH_EFFECT` stores the outcome and drops the entry.
//!
//! A node that dies leaves its entries pending in the group. Every node reclaims entries
//! pending longer than `reclaim_idle` (`XAUTOCLAIM`): one whose effect is still pending (its
//! node died before taking it) runs here; one whose effect is running (its node died while it
//! ran, so it may have happened) is marked `interrupted` and never run again, as embedded mode
//! does at start. A live node keeps its entries fresh (the work loop's heartbeat), so a long
//! effect is not taken from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Cluster, keys, scripts};
use crate::backend::EffectQueue;
use crate::store::{EffectRecord, EffectState, EmitOutcome};

/// How long one `XREADGROUP` waits for an effect.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// Redis mode's [`EffectQueue`]; see the module's doc comment.
pub struct SharedEffects {
    cluster: Cluster,
    reclaim_idle: Duration,
    /// Blocking reads get a connection of their own, made at the first `take` (a node that
    /// runs no work never reads).
    reader: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// Effects this node took and has not finished: effect key -> entry id.
    taken: Mutex<HashMap<String, String>>,
    /// When to look for entries of dead nodes next, and where the last look stopped.
    reclaim: tokio::sync::Mutex<(Instant, String)>,
}

/// What `TAKE_EFFECT` answered.
enum Taken {
    Run(EffectRecord),
    Interrupted(EffectRecord),
    Nothing,
}

impl SharedEffects {
    /// The queue, with the heartbeat that keeps this node's effects its own until `shutdown`.
    pub fn start(
        cluster: Cluster,
        reclaim_idle: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let queue = Arc::new(Self {
            cluster,
            reclaim_idle,
            reader: tokio::sync::Mutex::new(None),
            taken: Mutex::default(),
            reclaim: tokio::sync::Mutex::new((Instant::now(), "0-0".into())),
        });
        tokio::spawn(queue.clone().heartbeat(shutdown));
        queue
    }

    async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.reclaim_idle / 4;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let ids: Vec<String> = self.taken().values().cloned().collect();
            if ids.is_empty() {
                continue;
            }
            let refreshed = self
                .cluster
                .refresh(keys::EFFECTS, keys::EFFECT_GROUP, &ids)
                .await;
            if let Err(error) = refreshed {
                tracing::warn!(error = %format!("{error:#}"), "cannot keep this node's effects");
            }
        }
    }

    fn taken(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.taken.lock().expect("not poisoned")
    }

    /// Up to `limit` new entries (waiting up to [`READ_BLOCK`] for one), taken.
    async fn read(&self, limit: usize, shutdown: &CancellationToken) -> Result<Vec<EffectRecord>> {
        let mut reader = self.reader.lock().await;
        if reader.is_none() {
            *reader = Some(self.cluster.blocking_connection(READ_BLOCK).await?);
        }
        let conn = reader.as_mut().expect("connected above");
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(keys::EFFECT_GROUP)
            .arg(self.cluster.node())
            .arg("COUNT")
            .arg(limit)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys::EFFECTS)
            .arg(">");
        let reply = tokio::select! {
            reply = read.query_async::<Option<StreamReadReply>>(conn) => reply,
            () = shutdown.cancelled() => return Ok(Vec::new()),
        };
        drop(reader);
        let entries = match reply {
            Ok(reply) => reply.map(|r| r.keys).unwrap_or_default(),
            Err(error) => {
                if error.code() == Some("NOGROUP") {
                    // Redis restarted without its data: the group went with the stream.
                    let _ = self.cluster.create_groups().await;
                }
                return Err(error).context("cannot read effects from Redis");
            }
        };
        let entries = entries.into_iter().flat_map(|key| key.ids);
        Ok(self.take_entries(entries, false).await)
    }

    /// Entries pending longer than `reclaim_idle` on any node, taken over (at most `limit`),
    /// when it is time to look: the effects among them to run here.
    async fn reclaim(&self, limit: usize) -> Result<Vec<EffectRecord>> {
        let mut reclaim = self.reclaim.lock().await;
        let (next, cursor) = &mut *reclaim;
        if Instant::now() < *next {
            return Ok(Vec::new());
        }
        *next = Instant::now() + self.reclaim_idle / 2;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(keys::EFFECTS)
            .arg(keys::EFFECT_GROUP)
            .arg(self.cluster.node())
            .arg(self.reclaim_idle.as_millis() as u64)
            .arg(&*cursor)
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.cluster.conn())
            .await
            .context("cannot reclaim effects in Redis")?;
        *cursor = reply.next_stream_id;
        if *cursor != "0-0" {
            // More to look at: the next take looks again.
            *next = Instant::now();
        }
        drop(reclaim);
        if !reply.claimed.is_empty() {
            tracing::warn!(
                entries = reply.claimed.len(),
                "reclaimed effects a node left unfinished"
            );
        }
        Ok(self.take_entries(reply.claimed, true).await)
    }

    /// Take the effects of `entries`: those to run. An entry that cannot be taken now stays
    /// pending, and is reclaimed later.
    async fn take_entries(
        &self,
        entries: impl IntoIterator<Item = StreamId>,
        reclaimed: bool,
    ) -> Vec<EffectRecord> {
        let mut run = Vec::new();
        for entry in entries {
            match self.take_entry(&entry, reclaimed).await {
                Ok(Taken::Run(effect)) => run.push(effect),
                Ok(Taken::Interrupted(effect)) => {
                    tracing::warn!(handler = %effect.handler, key = %effect.key, "an effect's node stopped while it ran; marked interrupted, not run again");
                    crate::metrics::effect_finished(
                        &effect.pipeline,
                        &effect.handler,
                        EffectState::Interrupted.as_str(),
                    );
                }
                Ok(Taken::Nothing) => {}
                Err(error) => {
                    tracing::warn!(entry = %entry.id, error = %format!("{error:#}"), "cannot take an effect; left to a reclaim");
                }
            }
        }
        run
    }

    async fn take_entry(&self, entry: &StreamId, reclaimed: bool) -> Result<Taken> {
        let Some(effect_key) = entry.get::<String>("k") else {
            // Not an entry this code wrote: dropped, so that it is not met again.
            let _: () = redis::pipe()
                .xack(keys::EFFECTS, keys::EFFECT_GROUP, &[&entry.id])
                .xdel(keys::EFFECTS, &[&entry.id])
                .query_async(&mut self.cluster.conn())
                .await?;
            bail!("an effect entry without its key");
        };
        let mut take = scripts::TAKE_EFFECT.key(&effect_key);
        take.key(keys::EFFECTS)
            .arg(keys::EFFECT_GROUP)
            .arg(&entry.id)
            .arg(self.cluster.node())
            .arg(if reclaimed { "1" } else { "0" });
        let answer: Vec<redis::Value> = take
            .invoke_async(&mut self.cluster.conn())
            .await
            .context("cannot take an effect in Redis")?;
        let mut answer = answer.into_iter();
        let Some(what) = answer.next() else {
            return Ok(Taken::Nothing);
        };
        let what: String = redis::from_redis_value(what)?;
        let record: Vec<u8> = redis::from_redis_value(answer.next().context("no record")?)?;
        let mut effect: EffectRecord =
            serde_json::from_slice(&record).context("a corrupt effect record in Redis")?;
        if what == "interrupted" {
            effect.state = EffectState::Interrupted;
            return Ok(Taken::Interrupted(effect));
        }
        effect.runs = redis::from_redis_value(answer.next().context("no runs")?)?;
        effect.state = EffectState::Running;
        effect.node = Some(self.cluster.node().to_string());
        self.taken().insert(effect_key, entry.id.clone());
        Ok(Taken::Run(effect))
    }
}

#[async_trait]
impl EffectQueue for SharedEffects {
    async fn emit(&self, effect: &EffectRecord) -> Result<EmitOutcome> {
        let mut emit = scripts::EMIT_EFFECT.key(keys::effect(&effect.handler, &effect.key));
        emit.key(keys::EFFECTS).arg(serde_json::to_vec(effect)?);
        let created: i64 = emit
            .invoke_async(&mut self.cluster.conn())
            .await
            .context("cannot record an effect in Redis")?;
        Ok(if created == 1 {
            EmitOutcome::Accepted
        } else {
            EmitOutcome::Duplicate
        })
    }

    async fn take(&self, limit: usize, shutdown: &CancellationToken) -> Result<Vec<EffectRecord>> {
        let reclaimed = self.reclaim(limit).await?;
        if !reclaimed.is_empty() {
            return Ok(reclaimed);
        }
        self.read(limit, shutdown).await
    }

    async fn finish(&self, effect: &EffectRecord) -> Result<()> {
        let effect_key = keys::effect(&effect.handler, &effect.key);
        let entry = self
            .taken()
            .get(&effect_key)
            .cloned()
            .context("an effect this node did not take")?;
        let mut finish = scripts::FINISH_EFFECT.key(&effect_key);
        finish
            .key(keys::EFFECTS)
            .arg(keys::EFFECT_GROUP)
            .arg(&entry)
            .arg(self.cluster.node())
            .arg(serde_json::to_vec(effect)?)
            .arg(effect.state.as_str());
        // Offered again while Redis is away (the script is idempotent); past that, the entry
        // is no longer kept fresh, and a reclaim marks the effect interrupted.
        let finished = self
            .cluster
            .idempotent(|mut conn| {
                let finish = &finish;
                async move { finish.invoke_async::<i64>(&mut conn).await }
            })
            .await;
        self.taken().remove(&effect_key);
        finished
            .map(drop)
            .context("cannot store an effect's outcome in Redis")
    }

    /// Entries stay on the stream until their effect is finished.
    async fn is_empty(&self) -> Result<bool> {
        let queued: u64 = redis::cmd("XLEN")
            .arg(keys::EFFECTS)
            .query_async(&mut self.cluster.conn())
            .await
            .context("cannot count effects in Redis")?;
        Ok(queued == 0)
    }
}

/// An effect as its hash holds it: the record, with the hash's `state`, `runs` and `node`.
fn effect_of(fields: &HashMap<String, Vec<u8>>) -> Result<EffectRecord> {
    let record = fields
        .get("record")
        .context("an effect without its record")?;
    let mut effect: EffectRecord =
        serde_json::from_slice(record).context("a corrupt effect record")?;
    let text = |name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    if let Some(state) = text("state") {
        effect.state = serde_json::from_value(serde_json::Value::String(state))
            .context("a corrupt effect state")?;
    }
    if let Some(runs) = text("runs") {
        effect.runs = runs.parse().context("a corrupt effect run count")?;
    }
    effect.node = text("node").or(effect.node);
    Ok(effect)
}

/// Call `each` on every effect in Redis at `conn` (`stagehand inspect effects --redis`), a
/// page of keys at a time. Claims made before effects were shared (strings) have no effect.
pub async fn each_effect(
    conn: &mut impl redis::aio::ConnectionLike,
    mut each: impl FnMut(EffectRecord) -> Result<()>,
) -> Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", keys::EFFECT_PREFIX))
            .arg("TYPE")
            .arg("hash")
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("cannot list effects in Redis")?;
        for key in page {
            let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(conn)
                .await
                .context("cannot read an effect in Redis")?;
            each(effect_of(&fields).with_context(|| format!("effect `{key}`"))?)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
