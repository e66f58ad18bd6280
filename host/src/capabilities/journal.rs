//! The journal of one stage try: the answer to every host call it made, in order, so that a
//! try waiting on a slow call need not keep its wasm instance alive.
//!
//! Outbound HTTP requests are journaled too, and always wait without an instance
//! (`http/mod.rs`). A host call that must wait (an LLM request, a `dispatch.call`) starts in a task of its own
//! and is given a few milliseconds (`[run] evict_after_ms`). If it has not answered by then,
//! the call leaves its task in [`Journal::waiting`] and traps the guest: the instance is
//! dropped and its pool slot freed, and what the try keeps while it waits is this journal.
//! When the answer arrives it is recorded, and the stage runs again from its start: each host
//! call it makes gets the journaled answer instead of going out again, until it reaches the
//! answered call and goes past it. This works because a guest is deterministic given its
//! input and its host calls' answers: its clocks are frozen, its random bytes are seeded per
//! try (see `HostState::new`), and it has no other way out.
//!
//! What a replay sees: `llm.chat`, `llm.chat-stream`, `dispatch.call` and `dispatch.emit`
//! answer from the journal; `kv.get` reads the namespace version the try first read (pinned
//! here, so a reload while the try waits changes nothing for it); `log.write` and
//! `progress.report` are not said twice. Budgets are spent once per try: [`Journal::spent`]
//! goes from run to run. A guest that asks for another call than the one its journal holds
//! at that position, or that ends before reaching the calls it made before, has *diverged*:
//! its try fails with kind `diverged`.
//!
//! Durable answers: an answer that costs something (an LLM request, a `dispatch.call`) is
//! written to the item store as it is recorded, with the calls before it ([`Journal::flush`];
//! sled, or Redis in cluster mode), under the item's job, index and stage. What a try leaves
//! there is given to the stage's next try, or to the first try after a restart or a reprocess,
//! as *cached* answers ([`Journal::load`], [`Journal::next_try`]): the first run takes them
//! while its calls match, position by position, and at the first call that does not (another
//! stage version, a prompt built from the new try's random seed), drops the rest and goes on
//! live. So a crash or a retry does not pay twice for an answered call, and a guest that
//! changed is not held to its old calls. A retry does not reuse the answer that made the try
//! fail: an error answer and what follows are dropped, and so is the last answer when the guest
//! itself asked to be retried (it did not like the answer). The stored journal goes once the
//! stage's output is kept (a checkpoint or the result), or with the job.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

use super::budget::Spent;
use super::kv::Entries;
use crate::backend::ItemStore;
use crate::model::LlmCall;
use crate::runtime::bindings::dispatch::{DispatchError, EmitOutcome};
use crate::runtime::bindings::llm::{ChatResponse, LlmError};

/// The host calls a journal answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallKind {
    #[serde(rename = "llm.chat")]
    Chat,
    #[serde(rename = "llm.chat-stream")]
    ChatStream,
    #[serde(rename = "dispatch.call")]
    Call,
    #[serde(rename = "dispatch.emit")]
    Emit,
    #[serde(rename = "wasi:http.handle")]
    Http,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Chat => "llm.chat",
            CallKind::ChatStream => "llm.chat-stream",
            CallKind::Call => "dispatch.call",
            CallKind::Emit => "dispatch.emit",
            CallKind::Http => "wasi:http.handle",
        }
    }
}

/// A host call as the journal knows it: its kind and a digest of its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub kind: CallKind,
    #[serde(with = "hex::serde")]
    digest: [u8; 32],
}

impl Request {
    /// `arguments` are hashed through their JSON form (every WIT type derives `Serialize`),
    /// written straight into the hash: nothing is allocated for it, and JSON's escaping is
    /// several times cheaper than `Debug`'s, which hashing used before (a journal from then
    /// simply matches nothing, and its calls go live).
    pub fn new(kind: CallKind, arguments: &impl Serialize) -> Self {
        struct Hashing(Sha256);
        impl std::io::Write for Hashing {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.update(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut hashing = Hashing(Sha256::new());
        hashing.0.update(kind.as_str().as_bytes());
        // WIT values always serialise (no maps, NaN becomes null); were one not to, its
        // calls would share a digest and be told apart by position alone.
        if serde_json::to_writer(&mut hashing, arguments).is_err() {
            hashing.0.update(b"unserialisable");
        }
        Self {
            kind,
            digest: hashing.0.finalize().into(),
        }
    }
}

/// What a host call answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Llm(Result<ChatResponse, LlmError>),
    Call(Result<String, DispatchError>),
    Emit(Result<EmitOutcome, DispatchError>),
    Http(Result<super::http::Reply, super::http::HttpFailure>),
}

impl Answer {
    fn is_error(&self) -> bool {
        match self {
            Answer::Llm(result) => result.is_err(),
            Answer::Call(result) => result.is_err(),
            Answer::Emit(result) => result.is_err(),
            Answer::Http(result) => result.is_err(),
        }
    }
}

/// One journal entry as stored: JSON of this.
#[derive(Serialize, Deserialize)]
struct Entry {
    request: Request,
    answer: Answer,
}

/// Where a try's journal is kept: the item store, under the item's job, index and stage.
#[derive(Clone)]
pub struct Durable {
    pub items: Arc<dyn ItemStore>,
    pub job: Uuid,
    pub index: u64,
    pub stage: String,
}

/// A call that did not answer within `evict_after_ms`: the try waits on it without an instance.
pub struct Waiting {
    pub request: Request,
    /// The call, running on its own; dropping it (a cancel, a timeout) stops the call.
    pub task: AbortOnDropHandle<Answered>,
}

/// A finished call's answer, and the LLM requests it took (each provider tried).
pub struct Answered {
    pub answer: Answer,
    pub llm_calls: Vec<LlmCall>,
}

/// A guest that did not make, on replay, the host calls it made before.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the guest diverged on replay: {what}; a stage must make the same host calls when given \
     the same input and answers (see docs/SANDBOX.md)"
)]
pub struct Diverged {
    what: String,
}

#[derive(Default)]
pub struct Journal {
    entries: Vec<(Request, Answer)>,
    /// Where the current run is: the position of its next journaled call.
    next: usize,
    /// Runs of the stage so far for this try: 1 + the times it was evicted.
    runs: u32,
    /// `entries[..cached]` came from an earlier try or process: the first run takes them while
    /// its calls match (see the module's doc).
    cached: usize,
    /// Cached answers the try took instead of making the call.
    reused: u32,
    durable: Option<Durable>,
    /// `entries[..stored]` are in the store as they are here.
    stored: usize,
    /// Entries the store holds (past `stored` they are stale, to be overwritten or dropped).
    store_len: usize,
    kv: BTreeMap<String, Arc<Entries>>,
    pub(crate) spent: Spent,
    /// Every LLM request the try made, for its result.
    pub(crate) llm_calls: Vec<LlmCall>,
    /// Set by the host call that evicted the run.
    pub(crate) waiting: Option<Waiting>,
}

impl Journal {
    /// A journal holding `answers`, in order, as if a run had already made these calls: the
    /// next run replays them. How answers kept elsewhere are given back to a try.
    pub fn with_answers(answers: impl IntoIterator<Item = (Request, Answer)>) -> Self {
        Self {
            entries: answers.into_iter().collect(),
            runs: 1,
            ..Self::default()
        }
    }

    /// A journal that keeps its answers in the store of `durable`, and starts from what an
    /// earlier try of the stage left there (cached: see the module's doc). Stored entries this
    /// version cannot read are dropped with what follows them.
    pub async fn load(durable: Durable) -> Result<Self> {
        let stored = durable
            .items
            .journal(durable.job, durable.index, &durable.stage)
            .await
            .context("cannot read a stage's journal")?;
        let mut entries = Vec::with_capacity(stored.len());
        for bytes in &stored {
            match serde_json::from_slice::<Entry>(bytes) {
                // An outbound request is answered by replay within its try only (its body is
                // checked once the guest has written it, too late to go live instead).
                Ok(entry) if entry.request.kind == CallKind::Http => break,
                Ok(entry) => entries.push((entry.request, entry.answer)),
                Err(error) => {
                    tracing::warn!(stage = %durable.stage, error = %error, "an unreadable journal entry: the answers from it on are asked again");
                    break;
                }
            }
        }
        Ok(Self {
            cached: entries.len(),
            stored: entries.len(),
            store_len: stored.len(),
            entries,
            durable: Some(durable),
            ..Self::default()
        })
    }

    /// An empty journal that keeps its answers in the store of `durable`.
    pub fn durable(durable: Durable) -> Self {
        Self {
            durable: Some(durable),
            ..Self::default()
        }
    }

    /// The journal the stage's next try starts from, after this try failed: its answers
    /// cached, up to the first error answer, and without the last one if `drop_last` (the
    /// guest asked for a retry after seeing it).
    pub fn next_try(self, drop_last: bool) -> Self {
        let mut keep = self
            .entries
            .iter()
            .position(|(request, answer)| answer.is_error() || request.kind == CallKind::Http)
            .unwrap_or(self.entries.len());
        if drop_last {
            // The last answer that came from outside: an emit is the host's own.
            keep = self.entries[..keep]
                .iter()
                .rposition(|(request, _)| request.kind != CallKind::Emit)
                .unwrap_or(0);
        }
        let mut entries = self.entries;
        entries.truncate(keep);
        Self {
            cached: entries.len(),
            stored: self.stored.min(keep),
            store_len: self.store_len,
            entries,
            durable: self.durable,
            ..Self::default()
        }
    }

    /// Write what the store does not have yet (or drop what it holds past this journal).
    pub async fn flush(&mut self) -> Result<()> {
        let Some(durable) = &self.durable else {
            return Ok(());
        };
        if self.stored == self.entries.len() && self.store_len == self.stored {
            return Ok(());
        }
        let fresh = self.entries[self.stored..]
            .iter()
            .map(|(request, answer)| {
                serde_json::to_vec(&Entry {
                    request: *request,
                    answer: answer.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .context("cannot encode a journal entry")?;
        durable
            .items
            .put_journal(
                durable.job,
                durable.index,
                &durable.stage,
                self.stored,
                &fresh,
                self.store_len,
            )
            .await
            .context("cannot write a stage's journal")?;
        self.stored = self.entries.len();
        self.store_len = self.stored;
        Ok(())
    }

    /// Entries the store holds of this journal (to be removed when the stage's output is
    /// kept).
    pub fn store_len(&self) -> usize {
        self.store_len
    }

    /// Cached answers the try took instead of making the call.
    pub fn reused(&self) -> u32 {
        self.reused
    }

    /// Whether the current run is still before the last call of an earlier run: what it does
    /// now was done (logged, reported) before.
    pub fn replaying(&self) -> bool {
        self.runs > 1 && self.next < self.entries.len()
    }

    /// Whether the current position holds a cached answer, which a mismatch drops instead of
    /// failing the try.
    fn at_cached(&self) -> bool {
        self.runs <= 1 && self.next < self.cached
    }

    /// Forget the entries from the current position on: cached answers the guest no longer
    /// asks for.
    fn drop_cached_rest(&mut self) {
        self.entries.truncate(self.next);
        self.cached = self.next;
        self.stored = self.stored.min(self.next);
    }

    /// The answer to `request` if an earlier run made it at this position; `None` if the run
    /// has gone past what is journaled and must make the call.
    pub fn replay(&mut self, request: &Request) -> Result<Option<Answer>, Diverged> {
        let Some((journaled, answer)) = self.entries.get(self.next) else {
            return Ok(None);
        };
        if journaled != request && self.at_cached() {
            self.drop_cached_rest();
            return Ok(None);
        }
        if journaled != request {
            let what = if journaled.kind == request.kind {
                format!(
                    "host call {} is `{}` with other arguments than before",
                    self.next + 1,
                    request.kind.as_str()
                )
            } else {
                format!(
                    "host call {} is `{}` where it was `{}` before",
                    self.next + 1,
                    request.kind.as_str(),
                    journaled.kind.as_str()
                )
            };
            return Err(Diverged { what });
        }
        let answer = answer.clone();
        if self.at_cached() {
            self.reused += 1;
        }
        self.next += 1;
        Ok(Some(answer))
    }

    /// A call the current run made and got an answer to.
    pub fn record(&mut self, request: Request, answer: Answer) {
        debug_assert!(
            self.next == self.entries.len(),
            "a call is recorded only past the journal"
        );
        self.entries.push((request, answer));
        self.next += 1;
    }

    /// An answer that arrived after its run was evicted; the next run replays up to it.
    pub fn answered(&mut self, request: Request, answered: Answered) {
        self.entries.push((request, answered.answer));
        self.llm_calls.extend(answered.llm_calls);
    }

    /// Start the next run from the first call.
    pub fn rewind(&mut self) {
        self.next = 0;
    }

    /// A run is starting.
    pub fn start_run(&mut self) {
        self.runs += 1;
    }

    pub fn runs(&self) -> u32 {
        self.runs
    }

    /// The run ended: it must have replayed every journaled call (cached ones excepted).
    pub fn check_complete(&mut self) -> Result<(), Diverged> {
        if self.at_cached() {
            self.drop_cached_rest();
        }
        match self.entries.get(self.next) {
            None => Ok(()),
            Some((request, _)) => Err(Diverged {
                what: format!(
                    "it ended before host call {} (`{}`), which it made before",
                    self.next + 1,
                    request.kind.as_str()
                ),
            }),
        }
    }

    /// The version of kv namespace `name` this try reads: the one it read first.
    pub(crate) fn kv_pinned(
        &mut self,
        name: &str,
        current: impl FnOnce() -> Option<Arc<Entries>>,
    ) -> Option<Arc<Entries>> {
        if let Some(pinned) = self.kv.get(name) {
            return Some(pinned.clone());
        }
        let entries = current()?;
        self.kv.insert(name.to_string(), entries.clone());
        Some(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(n: u32) -> (Request, Answer) {
        (
            Request::new(CallKind::Emit, &("h", n)),
            Answer::Emit(Ok(EmitOutcome::Accepted)),
        )
    }

    #[test]
    fn a_replay_answers_in_order_then_hands_over() {
        let (first, second) = (emit(1), emit(2));
        let mut journal = Journal::with_answers([first.clone(), second.clone()]);
        journal.start_run();
        assert!(journal.replaying());
        assert!(journal.replay(&first.0).unwrap().is_some());
        assert!(journal.replay(&second.0).unwrap().is_some());
        assert!(!journal.replaying());
        assert!(journal.replay(&emit(3).0).unwrap().is_none());
        journal.check_complete().unwrap();
    }

    fn failed(n: u32) -> (Request, Answer) {
        (
            Request::new(CallKind::Call, &("h", n)),
            Answer::Call(Err(DispatchError::Host("down".into()))),
        )
    }

    fn called(n: u32) -> (Request, Answer) {
        (
            Request::new(CallKind::Call, &("h", n)),
            Answer::Call(Ok(format!("answer {n}"))),
        )
    }

    /// The journal a next try starts from, with one run started.
    fn next_try(entries: Vec<(Request, Answer)>, drop_last: bool) -> Journal {
        let mut journal = Journal::with_answers(entries).next_try(drop_last);
        journal.start_run();
        journal
    }

    #[test]
    fn a_next_try_takes_cached_answers_while_its_calls_match_then_goes_live() {
        let mut journal = next_try(vec![called(1), called(2), called(3)], false);
        assert!(!journal.replaying(), "a new try says its logs again");
        assert!(journal.replay(&called(1).0).unwrap().is_some());
        // Another call where the cache has `2`: no divergence, the rest is dropped.
        assert!(journal.replay(&called(9).0).unwrap().is_none());
        journal.record(called(9).0, called(9).1);
        assert!(journal.replay(&called(3).0).unwrap().is_none());
        assert_eq!(journal.reused(), 1);
        journal.check_complete().unwrap();

        // A try that ends before the cached calls it no longer makes is complete.
        let mut journal = next_try(vec![called(1), called(2)], false);
        journal.replay(&called(1).0).unwrap();
        journal.check_complete().unwrap();

        // A second run of the same try is strict again.
        journal.start_run();
        journal.rewind();
        assert!(journal.replay(&called(7).0).is_err());
    }

    #[test]
    fn a_next_try_does_not_reuse_what_made_the_try_fail() {
        let cached = |journal: &Journal| journal.entries.len();
        // An error answer and what follows go.
        let journal = next_try(vec![called(1), failed(2), called(3)], false);
        assert_eq!(cached(&journal), 1);
        // So does the last answer a guest asked to be retried after (emits are not answers
        // from outside).
        let journal = next_try(vec![called(1), called(2), emit(3)], true);
        assert_eq!(cached(&journal), 1);
        let journal = next_try(vec![emit(1)], true);
        assert_eq!(cached(&journal), 0);
        let journal = next_try(vec![called(1), called(2)], false);
        assert_eq!(cached(&journal), 2);
    }

    #[test]
    fn entries_are_stored_as_json_and_read_back() {
        let (request, answer) = called(4);
        let bytes = serde_json::to_vec(&Entry {
            request,
            answer: answer.clone(),
        })
        .unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains(r#""kind":"dispatch.call""#), "{text}");
        let read: Entry = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(read.request, request);
        assert_eq!(format!("{:?}", read.answer), format!("{answer:?}"));
    }

    #[test]
    fn another_call_or_an_early_end_is_a_divergence() {
        let mut journal = Journal::with_answers([emit(1), emit(2)]);
        let other = journal.replay(&emit(9).0).unwrap_err().to_string();
        assert!(other.contains("host call 1 is `dispatch.emit` with other arguments"));
        let call = Request::new(CallKind::Call, &("h", 1));
        let kind = journal.replay(&call).unwrap_err().to_string();
        assert!(
            kind.contains("`dispatch.call` where it was `dispatch.emit`"),
            "{kind}"
        );
        journal.replay(&emit(1).0).unwrap();
        let early = journal.check_complete().unwrap_err().to_string();
        assert!(early.contains("ended before host call 2"), "{early}");
    }
}
