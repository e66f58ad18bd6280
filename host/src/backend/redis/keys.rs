//! Every Redis key and channel of Redis mode, named in one place.
//!
//! A job's keys share the hash tag `{<job id>}`, so on Redis Cluster they live in one slot and
//! the scripts, which touch several of them at once, stay single-slot.

use uuid::Uuid;

/// The work stream: one entry per item to run, `j` = job id, `i` = index, and `r` when the
/// item is a dead letter run again.
pub const WORK: &str = "sh:work";
/// String: items of running jobs not yet on [`WORK`] (waiting for their job's window).
pub const UNQUEUED: &str = "sh:unqueued";
/// The keys a script that feeds a job's items takes after the job's own (see `scripts.rs`).
pub const FEED_KEYS: [&str; 2] = [WORK, UNQUEUED];
/// The consumer group every node reads [`WORK`] through.
pub const GROUP: &str = "workers";
/// Job ids, all with score 0, so that `ZRANGE BYLEX` lists them in id (= creation) order.
pub const JOBS: &str = "sh:jobs";
/// Pub/sub: `<job id> <number>` after each event (a wake-up, at most once).
pub const WAKE_CHANNEL: &str = "sh:wake";
/// Pub/sub: live tokens of followed jobs (`tokens.rs`), JSON.
pub const TOKENS_CHANNEL: &str = "sh:tokens";
/// Pub/sub: `<job id>` when a job is cancelled (the flag itself is [`JobKeys::cancel`]).
pub const CANCEL_CHANNEL: &str = "sh:cancel";

/// Sorted set: every dead letter of every job, as [`dead_letter`] members, all with score 0,
/// so that `ZRANGE BYLEX` lists them in (job, index) order. A member whose job expired is
/// dropped by the listing that meets it.
pub const DEAD_LETTERS: &str = "sh:dead";

/// Hash: every operator change every node applies (`crate::backend::Changes`), by key (e.g.
/// `versions/<pipeline>/<stage>`).
pub const CHANGES: &str = "sh:changes";
/// String: a counter that moves with every change in [`CHANGES`].
pub const CHANGES_COUNTER: &str = "sh:changes:n";
/// Hash: node -> the change counter up to which it serves every change.
pub const CHANGES_APPLIED: &str = "sh:changes:applied";
/// Pub/sub: the counter after a change (a wake-up, at most once; nodes also poll the counter).
pub const CHANGES_CHANNEL: &str = "sh:changed";

/// The keys of one job.
#[derive(Debug, Clone)]
pub struct JobKeys {
    /// String: the [`crate::model::JobRecord`] as submitted (JSON).
    pub record: String,
    /// Hash: `seq` (last event number), `total`, `succeeded`, `failed`, `not_run`, `state`,
    /// `finished_at`, `llm_tokens` (used by the job's items so far), `window` (items queued or
    /// running at once) and `queued` (items put on the work stream so far, in index order).
    pub counts: String,
    /// Hash: item index -> the item's JSON.
    pub items: String,
    /// Hash: `<index>:<stage>` -> a checkpointed stage output.
    pub checkpoints: String,
    /// Hash: item index -> [`crate::model::ItemResult`] JSON.
    pub results: String,
    /// Sorted set: indexes of the items with a result, scored by index (keyset paging).
    pub order: String,
    /// Hash: item index -> [`crate::store::DeadLetter`] JSON.
    pub dead_letters: String,
    /// Stream: the event log, entry id `<number>-0`, field `e` = the event's JSON.
    pub events: String,
    /// String, present once the job is cancelled.
    pub cancel: String,
    /// Set: indexes of the items that are settled (a result, or not run after a cancel), so
    /// that an item run twice (reclaimed from a node that was slow, not dead) counts once.
    pub settled: String,
    /// Hash: stage journals (`capabilities/journal.rs`): `<index>:<stage>` -> how many
    /// entries, `<index>:<stage>#<position>` -> an entry.
    pub journals: String,
}

impl JobKeys {
    pub fn new(job: Uuid) -> Self {
        let key = |what: &str| format!("sh:{{{job}}}:{what}");
        Self {
            record: key("job"),
            counts: key("n"),
            items: key("items"),
            checkpoints: key("ckpt"),
            results: key("results"),
            order: key("order"),
            dead_letters: key("dead"),
            events: key("events"),
            cancel: key("cancel"),
            settled: key("settled"),
            journals: key("journal"),
        }
    }

    /// Every key of the job, in the order the scripts expect them.
    pub fn all(&self) -> [&str; 11] {
        [
            &self.record,
            &self.counts,
            &self.items,
            &self.checkpoints,
            &self.results,
            &self.order,
            &self.dead_letters,
            &self.events,
            &self.cancel,
            &self.settled,
            &self.journals,
        ]
    }
}

/// String: the job a client's idempotency key names.
pub fn idempotency(key: &str) -> String {
    format!("sh:idem:{key}")
}

/// Hash: an effect (handler, key), which is also the claim of its key (created once, never
/// removed): `record` = its [`crate::store::EffectRecord`] JSON as emitted, then as finished;
/// `state` (`pending`, `running`, `done`, `failed`, `interrupted`), `runs` and `node` (the node
/// that took it) as they are now, which win over the record's. (Before effects were shared,
/// the key was a string naming the claiming node: still a claim, with no effect to run.)
pub fn effect(handler: &str, key: &str) -> String {
    format!("{EFFECT_PREFIX}{handler}\u{0}{key}")
}

/// What every [`effect`] key starts with.
pub const EFFECT_PREFIX: &str = "sh:effect:";

/// The effect stream: one entry per effect queued or running, `k` = its [`effect`] key.
pub const EFFECTS: &str = "sh:effects";
/// The consumer group every node that runs work reads [`EFFECTS`] through.
pub const EFFECT_GROUP: &str = "runners";

/// Hash: a collection of handlers' records (the `records` import), key -> JSON.
pub fn records(collection: &str) -> String {
    format!("sh:records:{collection}")
}

/// A member of [`DEAD_LETTERS`]: `<job>/<index, 20 digits>`, so that lexical order is
/// (job, index) order.
pub fn dead_letter(job: Uuid, index: u64) -> String {
    format!("{job}/{index:020}")
}

/// The (job, index) of a [`DEAD_LETTERS`] member.
pub fn parse_dead_letter(member: &str) -> Option<(Uuid, u64)> {
    let (job, index) = member.split_once('/')?;
    Some((job.parse().ok()?, index.parse().ok()?))
}

/// String: the node that holds the lease of a task one node at a time runs (`task`, e.g.
/// `reprocess`), with the lease's expiry as the key's.
pub fn lease(task: &str) -> String {
    format!("sh:lease:{task}")
}

/// String: a file a change names (a stage component), by its sha256; written once.
pub fn file(digest: &str) -> String {
    format!("sh:file:{digest}")
}

/// String, present while some node follows the job's live tokens (it expires unless renewed).
pub fn following(job: Uuid) -> String {
    format!("sh:{{{job}}}:following")
}
