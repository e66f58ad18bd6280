//! The journal of one stage try: the answer to every host call it made, in order, so that a
//! try waiting on a slow call need not keep its wasm instance alive.
//!
//! A host call that must wait (an LLM request, a `dispatch.call`) starts in a task of its own
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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_util::task::AbortOnDropHandle;

use super::budget::Spent;
use super::kv::Entries;
use crate::runtime::bindings::dispatch::{DispatchError, EmitOutcome};
use crate::runtime::bindings::llm::{ChatResponse, LlmError};
use crate::store::LlmCall;

/// The host calls a journal answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Chat,
    ChatStream,
    Call,
    Emit,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Chat => "llm.chat",
            CallKind::ChatStream => "llm.chat-stream",
            CallKind::Call => "dispatch.call",
            CallKind::Emit => "dispatch.emit",
        }
    }
}

/// A host call as the journal knows it: its kind and a digest of its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub kind: CallKind,
    digest: [u8; 32],
}

impl Request {
    /// `arguments` are hashed through their `Debug` form, which every WIT type has and which
    /// shows every field; nothing is allocated for it.
    pub fn new(kind: CallKind, arguments: &dyn std::fmt::Debug) -> Self {
        struct Hashing(Sha256);
        impl std::fmt::Write for Hashing {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                self.0.update(s.as_bytes());
                Ok(())
            }
        }
        let mut hashing = Hashing(Sha256::new());
        hashing.0.update(kind.as_str().as_bytes());
        let _ = write!(hashing, "{arguments:?}");
        Self {
            kind,
            digest: hashing.0.finalize().into(),
        }
    }
}

/// What a host call answered.
#[derive(Debug, Clone)]
pub enum Answer {
    Llm(Result<ChatResponse, LlmError>),
    Call(Result<String, DispatchError>),
    Emit(Result<EmitOutcome, DispatchError>),
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
            ..Self::default()
        }
    }

    /// Whether the current run is still before the last call of an earlier run: what it does
    /// now was done (logged, reported) before.
    pub fn replaying(&self) -> bool {
        self.next < self.entries.len()
    }

    /// The answer to `request` if an earlier run made it at this position; `None` if the run
    /// has gone past what is journaled and must make the call.
    pub fn replay(&mut self, request: &Request) -> Result<Option<Answer>, Diverged> {
        let Some((journaled, answer)) = self.entries.get(self.next) else {
            return Ok(None);
        };
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
        self.next += 1;
        Ok(Some(answer.clone()))
    }

    /// A call the current run made and got an answer to.
    pub fn record(&mut self, request: Request, answer: Answer) {
        debug_assert!(
            !self.replaying(),
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

    /// The run ended: it must have replayed every journaled call.
    pub fn check_complete(&self) -> Result<(), Diverged> {
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
        assert!(journal.replaying());
        assert!(journal.replay(&first.0).unwrap().is_some());
        assert!(journal.replay(&second.0).unwrap().is_some());
        assert!(!journal.replaying());
        assert!(journal.replay(&emit(3).0).unwrap().is_none());
        journal.check_complete().unwrap();
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
