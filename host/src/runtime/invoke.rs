//! One invocation: a fresh store with the item's limits, instantiate, call, classify failures.
//!
//! A stage try may take several *runs*: when a host call keeps it waiting past
//! `evict_after`, the run is stopped and its store (the instance, its pool slot and its
//! `max_stage_calls` slot) dropped; once the answer is in, the stage runs again from its start
//! and its journal answers the calls it made before (`capabilities/journal.rs`). The try's
//! wall-clock limit and cancel token cover every run and the waits between them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::types::{Context, HandlerError, StageError};
use super::limiter::MemoryCapExceeded;
use super::{HandlerComponent, StageComponent};
use crate::capabilities::{Capabilities, HostState, Interrupt, Journal, ProgressSink};
use crate::config::Limits;

/// Why an invocation produced no output.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("the guest returned a retryable error: {0}")]
    Retryable(String),
    #[error("the guest returned a fatal error: {0}")]
    Fatal(String),
    #[error("the guest trapped: {trap}{}", stderr_suffix(.stderr))]
    Trap { trap: String, stderr: String },
    #[error("the guest used more than its CPU budget of {0:?}")]
    CpuBudget(Duration),
    #[error("the guest {0}")]
    MemoryCap(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("cancelled")]
    Cancelled,
    #[error("invalid output: {0}")]
    InvalidOutput(String),
    #[error("host error: {0}")]
    Host(String),
    /// A host call went past one of the try's budgets (or the job's token budget).
    #[error("over budget: {0}")]
    Budget(String),
    /// The guest gave up after an LLM answer cut at `max_tokens`: the same request would be
    /// cut again, so it is not retried.
    #[error("{message} ({cut})")]
    Length { message: String, cut: String },
    /// Run again after a wait, the guest made other host calls than the first time.
    #[error("{0}")]
    Diverged(String),
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(" (guest stderr: {stderr})")
    }
}

/// A short, stable name for each kind of failure, as stored in results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Retryable,
    Fatal,
    Trap,
    CpuBudget,
    MemoryCap,
    Timeout,
    Cancelled,
    InvalidOutput,
    Host,
    Budget,
    Length,
    Diverged,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Fatal => "fatal",
            FailureKind::Trap => "trap",
            FailureKind::CpuBudget => "cpu_budget",
            FailureKind::MemoryCap => "memory_cap",
            FailureKind::Timeout => "timeout",
            FailureKind::Cancelled => "cancelled",
            FailureKind::InvalidOutput => "invalid_output",
            FailureKind::Host => "host",
            FailureKind::Budget => "budget",
            FailureKind::Length => "length",
            FailureKind::Diverged => "diverged",
        }
    }
}

impl Failure {
    pub fn kind(&self) -> FailureKind {
        match self {
            Failure::Retryable(_) => FailureKind::Retryable,
            Failure::Fatal(_) => FailureKind::Fatal,
            Failure::Trap { .. } => FailureKind::Trap,
            Failure::CpuBudget(_) => FailureKind::CpuBudget,
            Failure::MemoryCap(_) => FailureKind::MemoryCap,
            Failure::Timeout(_) => FailureKind::Timeout,
            Failure::Cancelled => FailureKind::Cancelled,
            Failure::InvalidOutput(_) => FailureKind::InvalidOutput,
            Failure::Host(_) => FailureKind::Host,
            Failure::Budget(_) => FailureKind::Budget,
            Failure::Length { .. } => FailureKind::Length,
            Failure::Diverged(_) => FailureKind::Diverged,
        }
    }

    /// Whether another attempt could succeed: upstream trouble and timeouts may pass; a guest's
    /// bug, budget or bad output will not.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Failure::Retryable(_) | Failure::Timeout(_) | Failure::Host(_)
        )
    }
}

/// Resources one invocation used.
#[derive(Default)]
pub struct CallStats {
    pub duration: Duration,
    /// CPU time of the last run's polls (instantiation, guest code, host calls' synchronous
    /// part; see `cpu.rs`): the last run went through the whole try, earlier runs stopped at a
    /// call that had to wait.
    pub cpu: Duration,
    /// The LLM requests it made.
    pub llm: Vec<crate::model::LlmCall>,
    /// Runs of the guest: 1, plus one for each time it waited without its instance.
    pub runs: u32,
    /// The try's journal as it ended: what the stage's next try starts from
    /// ([`Journal::next_try`]), and whether the store holds some of it.
    pub journal: Journal,
}

/// Everything an invocation needs besides the component and its input.
pub struct Call {
    pub caps: Arc<Capabilities>,
    pub context: Context,
    pub limits: Limits,
    pub cancel: CancellationToken,
    pub progress: Option<ProgressSink>,
    /// The job's LLM token budget, if it has one.
    pub job_max_tokens: Option<u64>,
    /// A run holds one of these while its instance is alive (`[run] max_stage_calls`).
    pub slots: Option<Arc<Semaphore>>,
    /// How long a host call may keep an instance waiting before the run gives it up and
    /// resumes by replay once the answer is in (`[run] evict_after_ms`); `None` never does.
    pub evict_after: Option<Duration>,
    /// Answers the try's calls already have: replayed before any call goes out.
    pub journal: Journal,
    /// What its outbound HTTP requests may reach (`allowed_hosts`), and how much.
    pub http: Arc<crate::capabilities::HttpGrant>,
}

impl StageComponent {
    /// Run this stage once for one item: a fresh store per run, runs repeated while host calls
    /// make it wait (see the module's doc). What it used is measured whether it succeeds or
    /// not.
    pub async fn run(&self, mut call: Call, input: &str) -> (Result<String, Failure>, CallStats) {
        let started = Instant::now();
        let mut journal = std::mem::take(&mut call.journal);
        let mut run_store: Option<Store<HostState>> = None;
        let mut last_cpu = Duration::ZERO;
        let stage = call.context.stage.clone();
        let result = bounded(&call.limits, &call.cancel, async {
            // What an earlier try left that this one does not reuse goes first.
            journal.flush().await.map_err(host_failure)?;
            loop {
                let slot = match &call.slots {
                    Some(slots) => Some(slots.acquire().await.expect("never closed")),
                    None => None,
                };
                let running = crate::metrics::stage_instance_running();
                journal.start_run();
                let store = run_store.insert(new_store(&call, std::mem::take(&mut journal)));
                let meter = store.data().meter.clone();
                let request_ready = store.data().outbound.ready.clone();
                let run = super::measured(meter, async {
                    let stage = self.pre.instantiate_async(&mut *store).await?;
                    stage.call_run(&mut *store, &call.context, input).await
                });
                // A run that made an outbound request stops once the request's body is
                // complete (dropping the run drops its instance): the request is sent with
                // no instance waiting (`capabilities/http/`).
                let outcome = tokio::select! {
                    biased;
                    outcome = run => Some(outcome),
                    () = request_ready.notified() => None,
                };
                // The calls the stopped run waits on: its outbound requests, or the one
                // host call that kept it past `evict_after`.
                let waits = match store.data_mut().take_evicted(outcome.is_none()) {
                    Some(waits) if waits.is_empty() => {
                        return Err(Failure::Host(
                            "the stage made a host call while an outbound request's body was \
                             still unwritten; finish a request's body before other host calls"
                                .into(),
                        ));
                    }
                    Some(waits) => waits,
                    None => {
                        let outcome = outcome.expect("only a pending request stops a run early");
                        match store.data_mut().journal.waiting.take() {
                            Some(waiting) => vec![waiting],
                            None => return Ok(outcome),
                        }
                    }
                };
                // Evicted: the instance and its slots go while the calls wait.
                last_cpu = store.data().meter.used();
                journal = std::mem::take(&mut store.data_mut().journal);
                drop((run_store.take(), slot, running));
                crate::metrics::stage_evicted(&call.caps.pipeline, &stage);
                let _waiting = crate::metrics::stage_call_waiting();
                for waiting in waits {
                    let answered = waiting
                        .task
                        .await
                        .map_err(|e| Failure::Host(format!("a host call failed: {e}")))?;
                    journal.answered(waiting.request, answered);
                }
                journal.flush().await.map_err(host_failure)?;
                journal.rewind();
            }
        })
        .await
        .and_then(|outcome| outcome);
        let guest_said = |error| match error {
            StageError::Retryable(m) => Failure::Retryable(m),
            StageError::Fatal(m) => Failure::Fatal(m),
        };
        let output = match (result, &mut run_store) {
            (Ok(outcome), Some(store)) => settle(outcome, guest_said, store, &call.limits),
            (Ok(_), None) => unreachable!("a run ended, so there is its store"),
            (Err(failure), _) => Err(failure),
        };
        if let Some(store) = &mut run_store {
            last_cpu = store.data().meter.used();
            journal = std::mem::take(&mut store.data_mut().journal);
        }
        let stats = CallStats {
            duration: started.elapsed(),
            cpu: last_cpu,
            runs: journal.runs(),
            llm: std::mem::take(&mut journal.llm_calls),
            journal,
        };
        (output, stats)
    }
}

impl HandlerComponent {
    /// Run this handler once, in a fresh store, with its own limits. A handler is never
    /// evicted: it waits on its host calls with its instance.
    pub async fn handle(
        &self,
        caps: Arc<Capabilities>,
        context: Context,
        key: Option<&str>,
        payload: &str,
        cancel: CancellationToken,
    ) -> Result<(String, CallStats), Failure> {
        let started = Instant::now();
        let call = Call {
            caps,
            context,
            limits: self.limits,
            cancel,
            progress: None,
            job_max_tokens: None,
            slots: None,
            evict_after: None,
            journal: Journal::default(),
            http: self.grant.clone(),
        };
        let mut store = new_store(&call, Journal::default());
        let key = key.map(str::to_string);
        let meter = store.data().meter.clone();
        let result = bounded(
            &call.limits,
            &call.cancel,
            super::measured(meter, async {
                let handler = self.pre.instantiate_async(&mut store).await?;
                handler
                    .call_handle(&mut store, &call.context, key.as_deref(), payload)
                    .await
            }),
        )
        .await;
        let guest_said = |error| match error {
            HandlerError::Retryable(m) => Failure::Retryable(m),
            HandlerError::Fatal(m) => Failure::Fatal(m),
        };
        let output =
            result.and_then(|outcome| settle(outcome, guest_said, &mut store, &call.limits));
        let state = store.data_mut();
        let stats = CallStats {
            duration: started.elapsed(),
            cpu: state.meter.used(),
            llm: std::mem::take(&mut state.journal.llm_calls),
            runs: 1,
            journal: Journal::default(),
        };
        output.map(|output| (output, stats))
    }
}

/// The output of a run that ended, or why it failed.
fn settle<E>(
    outcome: wasmtime::Result<Result<String, E>>,
    guest_said: impl FnOnce(E) -> Failure,
    store: &mut Store<HostState>,
    limits: &Limits,
) -> Result<String, Failure> {
    let state = store.data_mut();
    if let Some(diverged) = &state.diverged {
        return Err(Failure::Diverged(diverged.to_string()));
    }
    if let Some(what) = state.outbound.diverged() {
        return Err(Failure::Diverged(what));
    }
    if outcome.is_ok()
        && let Err(diverged) = state.journal.check_complete()
    {
        return Err(Failure::Diverged(diverged.to_string()));
    }
    match outcome {
        Ok(Ok(output)) => check_output(&output, limits).map(|()| output),
        Ok(Err(error)) => Err(match (guest_said(error), &state.cut_answer) {
            (Failure::Retryable(message) | Failure::Fatal(message), Some(cut)) => Failure::Length {
                message,
                cut: cut.clone(),
            },
            (failure, _) => failure,
        }),
        Err(error) => Err(classify(store, error, limits)),
    }
}

fn host_failure(error: anyhow::Error) -> Failure {
    Failure::Host(format!("{error:#}"))
}

fn new_store(call: &Call, journal: Journal) -> Store<HostState> {
    let engine = call.caps.runtime.engine().clone();
    let state = HostState::new(call, journal);
    let mut store = Store::new(&engine, state);
    store.limiter(|state| &mut state.limiter);
    // Called at every tick while guest code runs: stop a cancelled or over-budget guest, else
    // yield to tokio so that one busy guest does not hold a worker thread.
    store.epoch_deadline_callback(|mut cx| {
        let state = cx.data_mut();
        if state.cancel.is_cancelled() {
            state.interrupted = Some(Interrupt::Cancelled);
            return Ok(UpdateDeadline::Interrupt);
        }
        if state.meter.used() >= state.cpu_budget {
            state.interrupted = Some(Interrupt::CpuBudget);
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store.set_epoch_deadline(1);
    store
}

/// `call`, unless the wall-clock limit passes or the token is cancelled first (which drops the
/// call, and with it any host request in flight).
async fn bounded<T>(
    limits: &Limits,
    cancel: &CancellationToken,
    call: impl Future<Output = T>,
) -> Result<T, Failure> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(Failure::Cancelled),
        outcome = tokio::time::timeout(limits.timeout, call) => outcome.map_err(|_| Failure::Timeout(limits.timeout)),
    }
}

fn classify(store: &Store<HostState>, error: wasmtime::Error, limits: &Limits) -> Failure {
    if let Some(budget) = &store.data().exceeded {
        return Failure::Budget(budget.clone());
    }
    match store.data().interrupted {
        Some(Interrupt::Cancelled) => return Failure::Cancelled,
        Some(Interrupt::CpuBudget) => return Failure::CpuBudget(limits.cpu),
        None => {}
    }
    if let Some(cap) = error.downcast_ref::<MemoryCapExceeded>() {
        return Failure::MemoryCap(cap.to_string());
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return Failure::Trap {
            trap: trap.to_string(),
            stderr: store.data().stderr(),
        };
    }
    Failure::Host(format!("{error:#}"))
}

/// An output is JSON within the size limit and [`crate::limits::MAX_JSON_DEPTH`], so that every
/// reader (the next stage, the results API, the CLI) can read it.
fn check_output(output: &str, limits: &Limits) -> Result<(), Failure> {
    crate::limits::check_json(output, "the output", limits.max_output_bytes)
        .map_err(|e| Failure::InvalidOutput(e.0))
}
