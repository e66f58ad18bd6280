//! One invocation: a fresh store with the item's limits, instantiate, call, classify failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::types::{Context, HandlerError, StageError};
use super::limiter::MemoryCapExceeded;
use super::{HandlerComponent, StageComponent};
use crate::capabilities::{Capabilities, HostState, Interrupt, ProgressSink};
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
#[derive(Debug, Clone, Default)]
pub struct CallStats {
    pub duration: Duration,
    /// Time the guest ran (or was instantiating): the duration less time in async host calls.
    pub cpu: Duration,
    /// The LLM requests it made.
    pub llm: Vec<crate::store::LlmCall>,
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
}

impl StageComponent {
    /// Run this stage once for one item, in a fresh store. What it used is measured whether it
    /// succeeds or not.
    pub async fn run(&self, call: Call, input: &str) -> (Result<String, Failure>, CallStats) {
        let (limits, cancel, context) = (call.limits, call.cancel.clone(), call.context.clone());
        let mut store = new_store(call);
        let started = Instant::now();
        let result = bounded(&limits, &cancel, async {
            let stage = self.pre.instantiate_async(&mut store).await?;
            stage.call_run(&mut store, &context, input).await
        })
        .await;
        let guest_said = |error| match error {
            StageError::Retryable(m) => Failure::Retryable(m),
            StageError::Fatal(m) => Failure::Fatal(m),
        };
        settle(result, guest_said, &mut store, &limits, started)
    }
}

impl HandlerComponent {
    /// Run this handler once, in a fresh store, with its own limits.
    pub async fn handle(
        &self,
        caps: Arc<Capabilities>,
        context: Context,
        key: Option<&str>,
        payload: &str,
        cancel: CancellationToken,
    ) -> Result<(String, CallStats), Failure> {
        let limits = self.limits;
        let mut store = new_store(Call {
            caps,
            context: context.clone(),
            limits,
            cancel: cancel.clone(),
            progress: None,
            job_max_tokens: None,
        });
        let started = Instant::now();
        let key = key.map(str::to_string);
        let result = bounded(&limits, &cancel, async {
            let handler = self.pre.instantiate_async(&mut store).await?;
            handler
                .call_handle(&mut store, &context, key.as_deref(), payload)
                .await
        })
        .await;
        let guest_said = |error| match error {
            HandlerError::Retryable(m) => Failure::Retryable(m),
            HandlerError::Fatal(m) => Failure::Fatal(m),
        };
        let (output, stats) = settle(result, guest_said, &mut store, &limits, started);
        output.map(|output| (output, stats))
    }
}

/// Turn a bounded call's outcome into the output or the failure, and what the call used.
fn settle<E>(
    result: Result<wasmtime::Result<Result<String, E>>, Failure>,
    guest_said: impl FnOnce(E) -> Failure,
    store: &mut Store<HostState>,
    limits: &Limits,
    started: Instant,
) -> (Result<String, Failure>, CallStats) {
    let output = match result {
        Ok(Ok(Ok(output))) => check_output(&output, limits).map(|()| output),
        Ok(Ok(Err(error))) => Err(match (guest_said(error), &store.data().cut_answer) {
            (Failure::Retryable(message) | Failure::Fatal(message), Some(cut)) => Failure::Length {
                message,
                cut: cut.clone(),
            },
            (failure, _) => failure,
        }),
        Ok(Err(error)) => Err(classify(store, error, limits)),
        Err(failure) => Err(failure),
    };
    (output, stats(store, started))
}

fn new_store(call: Call) -> Store<HostState> {
    let engine = call.caps.runtime.engine().clone();
    let state = HostState::new(
        call.caps,
        call.context,
        &call.limits,
        call.cancel,
        call.progress,
        call.job_max_tokens,
    );
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
        if state.meter.guest_ticks() >= state.meter.budget_ticks {
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

fn stats(store: &mut Store<HostState>, started: Instant) -> CallStats {
    CallStats {
        duration: started.elapsed(),
        cpu: store.data().meter.guest_time(),
        llm: std::mem::take(&mut store.data_mut().llm_calls),
    }
}
