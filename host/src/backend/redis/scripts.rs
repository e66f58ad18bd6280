//! The Lua scripts of Redis mode. Each runs atomically, so an event's number, the job's counts
//! and the job's end are decided in one step whichever node runs the item.
//!
//! Every script takes the job's keys in the order of [`super::keys::JobKeys::all`] and
//! `ARGV[1]` = job id, `ARGV[2]` = now (ms since the epoch), `ARGV[3]` = retention (s).
//! Events are built in Rust (`crate::events`); a script only numbers them and, for an event
//! that carries the job's counts, writes the counts next to it as stream field `n`
//! (`"<succeeded> <failed> <not_run> <total>"`, read back by `crate::events::Counts::parse`).
//! Scripts that may end the job ([`FINISH`], [`SKIP`]) take `ARGV[4]` and `ARGV[5]`: the
//! `job.completed` and `job.cancelled` events it may end with, and after the job's keys the
//! work stream and `sh:unqueued` ([`super::keys::FEED_KEYS`]), because settling an item feeds
//! the job's next one.
//!
//! **Feeding.** A job's items are not all put on the work stream at submission: at most its
//! *window* are queued or running at once (`sequential`: 1; `concurrency`: that many; else
//! [`super::jobs::MAX_WINDOW`]), and each item settled queues the next, in index order, in the
//! same step (`feed` below). That is how a job's `concurrency` and `sequential` hold across
//! every node with no lock to lose (a reclaimed entry is the same entry), and why a
//! 100,000-item submission adds a bounded number of work entries.

use std::sync::LazyLock;

use redis::Script;

/// Functions the scripts share: `append` numbers an event and wakes the followers; `settle`
/// ends the job once every item is settled (its last event, its state, its keys' expiry).
const COMMON: &str = r#"
local function append(event, counts)
  local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
  if counts then
    redis.call('XADD', KEYS[8], seq .. '-0', 'e', event, 'n', counts)
  else
    redis.call('XADD', KEYS[8], seq .. '-0', 'e', event)
  end
  redis.call('PUBLISH', 'sh:wake', ARGV[1] .. ' ' .. seq)
  return seq
end

local function count(field)
  return tonumber(redis.call('HGET', KEYS[2], field) or '0')
end

local function counts()
  return count('succeeded') .. ' ' .. count('failed') .. ' ' .. count('not_run') .. ' ' ..
    count('total')
end

local function feed()
  local window = redis.call('HGET', KEYS[2], 'window')
  -- A job without a window was submitted with every item queued.
  if not window then return end
  local total, queued = count('total'), count('queued')
  if queued >= total or redis.call('HGET', KEYS[2], 'state') ~= 'running' then return end
  if redis.call('EXISTS', KEYS[9]) == 1 then
    -- Cancelled: the items never queued are not run.
    redis.call('HINCRBY', KEYS[2], 'not_run', total - queued)
    redis.call('DECRBY', KEYS[JOB_KEYS + 2], total - queued)
    redis.call('HSET', KEYS[2], 'queued', total)
    return
  end
  local unsettled = queued - count('succeeded') - count('failed') - count('not_run')
  local from = queued
  while unsettled < tonumber(window) and queued < total do
    redis.call('XADD', KEYS[JOB_KEYS + 1], '*', 'j', ARGV[1], 'i', queued)
    queued = queued + 1
    unsettled = unsettled + 1
  end
  if queued > from then
    redis.call('HSET', KEYS[2], 'queued', queued)
    redis.call('DECRBY', KEYS[JOB_KEYS + 2], queued - from)
  end
end

local function settle()
  local c, f, s, total = count('succeeded'), count('failed'), count('not_run'), count('total')
  if c + f + s < total or redis.call('HGET', KEYS[2], 'state') ~= 'running' then
    return 0
  end
  local state, event = 'completed', ARGV[4]
  if redis.call('EXISTS', KEYS[9]) == 1 then
    state, event = 'cancelled', ARGV[5]
  end
  redis.call('HSET', KEYS[2], 'state', state, 'finished_at', ARGV[2])
  append(event, counts())
  for i = 1, JOB_KEYS do
    redis.call('EXPIRE', KEYS[i], ARGV[3])
  end
  return 1
end
"#;

/// A script's code: [`COMMON`], then `body`.
fn code(body: &str) -> String {
    let job_keys = super::keys::JobKeys::new(uuid::Uuid::nil()).all().len();
    format!("local JOB_KEYS = {job_keys}\n{COMMON}\n{body}")
}

fn script(body: &str) -> Script {
    Script::new(&code(body))
}

/// Queue a job's first items (its window): the code, for `EVAL` in the submission's
/// transaction, where a script not loaded yet cannot be retried. Takes the job's keys and
/// [`super::keys::FEED_KEYS`].
pub static FEED_CODE: LazyLock<String> = LazyLock::new(|| code("feed() return 1"));

/// Append one event: `ARGV[4]` = its JSON. Returns its number.
pub static APPEND: LazyLock<Script> = LazyLock::new(|| script("return append(ARGV[4])"));

/// Record an item's result and its `item.finished` event, once per item.
/// `ARGV[6]` = index, `ARGV[7]` = the result's JSON, `ARGV[8]` = `succeeded` or `failed`,
/// `ARGV[9]` = the event. Returns -1 if the item was settled already, else 1 if the job ended
/// with it, 0 if not.
pub static FINISH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('SADD', KEYS[10], ARGV[6]) == 0 then return -1 end
redis.call('HSET', KEYS[5], ARGV[6], ARGV[7])
redis.call('ZADD', KEYS[6], ARGV[6], ARGV[6])
redis.call('HINCRBY', KEYS[2], ARGV[8], 1)
append(ARGV[9], counts())
feed()
return settle()
"#,
    )
});

/// Count an item of a cancelled job as not run, once per item. `ARGV[6]` = index.
/// Returns like [`FINISH`].
pub static SKIP: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('SADD', KEYS[10], ARGV[6]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[2], 'not_run', 1)
feed()
return settle()
"#,
    )
});

/// A node's heartbeat: reset the idle time of the work entries it still owns, and only those
/// (an entry another node reclaimed stays with that node). `KEYS[1]` = the work stream,
/// `ARGV[1]` = group, `ARGV[2]` = this node, `ARGV[3..]` = entry ids. Returns how many.
pub static REFRESH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local refreshed = 0
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    refreshed = refreshed + 1
  end
end
return refreshed
"#,
    )
});

/// Stage journals live in one hash per job (`JobKeys::journals`, `KEYS[1]`); `ARGV[1]` =
/// `<index>:<stage>`, the field of the journal's length, and entry `n` is field
/// `<index>:<stage>#<n>`.
///
/// Read a journal: its entries in order.
pub static JOURNAL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if n == 0 then return {} end
local fields = {}
for i = 0, n - 1 do fields[#fields + 1] = ARGV[1] .. '#' .. i end
return redis.call('HMGET', KEYS[1], unpack(fields))
"#,
    )
});

/// Make a journal's entries from `ARGV[2]` on be `ARGV[3..]`, dropping those past them.
pub static PUT_JOURNAL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local from = tonumber(ARGV[2])
local n = from + #ARGV - 2
for i = n, old - 1 do redis.call('HDEL', KEYS[1], ARGV[1] .. '#' .. i) end
for i = 3, #ARGV do redis.call('HSET', KEYS[1], ARGV[1] .. '#' .. (from + i - 3), ARGV[i]) end
if n == 0 then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], n) end
return n
"#,
    )
});

/// Run dead letters of a finished job again. `KEYS` = the job's keys, then the work stream;
/// `ARGV[4..]` = the items' indices, or `*` for every dead letter of the job. Each letter whose
/// item's result is failed is unsettled (and no longer counted failed) and queued again with
/// `r` (run from its checkpoints); the job is running again, uncancelled, and its keys stop
/// expiring until it settles again. Returns how many were queued, -1 if the job is running,
/// -2 if it is gone.
pub static REPROCESS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[2], 'state')
if not state then return -2 end
if state == 'running' then return -1 end
local indices = {}
if ARGV[4] == '*' then
  indices = redis.call('HKEYS', KEYS[7])
else
  for i = 4, #ARGV do indices[#indices + 1] = ARGV[i] end
end
local queued = 0
for _, index in ipairs(indices) do
  if redis.call('HEXISTS', KEYS[7], index) == 1 then
    local result = redis.call('HGET', KEYS[5], index)
    local failed = true
    if result then
      local ok, decoded = pcall(cjson.decode, result)
      failed = not ok or decoded.status ~= 'succeeded'
    end
    if failed then
      if redis.call('SREM', KEYS[10], index) == 1 and result then
        redis.call('HINCRBY', KEYS[2], 'failed', -1)
      end
      redis.call('XADD', KEYS[12], '*', 'j', ARGV[1], 'i', index, 'r', '1')
      queued = queued + 1
    end
  end
end
if queued > 0 then
  redis.call('HSET', KEYS[2], 'state', 'running')
  redis.call('HDEL', KEYS[2], 'finished_at')
  redis.call('DEL', KEYS[9])
  for i = 1, 11 do redis.call('PERSIST', KEYS[i]) end
end
return queued
"#,
    )
});

/// Take or keep a lease: `KEYS[1]` = [`super::keys::lease`], `ARGV[1]` = this node,
/// `ARGV[2]` = how long (ms). Returns 1 if this node holds it now, else 0.
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Publish an operator's change: `KEYS[1]` = [`super::keys::CHANGES`], `KEYS[2]` = its counter,
/// `KEYS[3..]` = the files' keys; `ARGV[1]` = the change's key, `ARGV[2]` = its record,
/// `ARGV[3]` = `any`, `absent` (the key has no record yet) or `equals` (its record is
/// `ARGV[4]`), `ARGV[5..]` = the files' bytes, in the order of their keys. Returns the new
/// counter, or -1 (nothing written) when the key's record is not the one expected.
pub static PUBLISH_CHANGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (ARGV[3] == 'absent' and current) or (ARGV[3] == 'equals' and current ~= ARGV[4]) then
  return -1
end
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 2], 'NX') end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local n = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', 'sh:changed', n)
return n
"#,
    )
});

/// The effect scripts take `KEYS[1]` = the effect's hash ([`super::keys::effect`]) and
/// `KEYS[2]` = the effect stream ([`super::keys::EFFECTS`]); see `effects.rs`.
///
/// Claim an effect's key and queue it, together: `ARGV[1]` = its record (JSON). Returns 1, or
/// 0 (nothing written) when the key was claimed before.
pub static EMIT_EFFECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'state', 'pending', 'runs', 0)
redis.call('XADD', KEYS[2], '*', 'k', KEYS[1])
return 1
"#,
    )
});

/// Take the effect of stream entry `ARGV[2]`, read through group `ARGV[1]`, for node
/// `ARGV[3]`; `ARGV[4]` = `1` when the entry was reclaimed from another node. A pending effect
/// is marked running for this node: returns {`run`, record, runs}. Otherwise the entry is
/// acknowledged and deleted, and nothing runs: an effect a reclaimed entry finds running is
/// marked `interrupted` (its node stopped while it ran, so it may have happened): returns
/// {`interrupted`, record}; any other, {}.
pub static TAKE_EFFECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'pending' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'node', ARGV[3])
  local runs = redis.call('HINCRBY', KEYS[1], 'runs', 1)
  return {'run', redis.call('HGET', KEYS[1], 'record'), runs}
end
local answer = {}
if state == 'running' and ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'interrupted')
  answer = {'interrupted', redis.call('HGET', KEYS[1], 'record')}
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return answer
"#,
    )
});

/// Store the outcome of an effect node `ARGV[3]` took: `ARGV[4]` = its record, `ARGV[5]` = its
/// state; then acknowledge and delete its entry `ARGV[2]` of group `ARGV[1]`. A node thought
/// dead whose running effect was marked interrupted, and which finished it after all, records
/// the outcome it saw.
pub static FINISH_EFFECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'node') == ARGV[3] then
  redis.call('HSET', KEYS[1], 'record', ARGV[4], 'state', ARGV[5])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return 1
"#,
    )
});
