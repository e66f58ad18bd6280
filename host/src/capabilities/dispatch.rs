//! `dispatch`: a synchronous `call` to a handler, or a durable, idempotent `emit`; both counted
//! and sized against the try's budgets (`calls`, `call_kib`, `emits`, `emit_kib`). Both are
//! journaled: a replayed `emit` answers what it answered the first time (`accepted`, not the
//! `duplicate` its own record would now give).

use std::sync::Arc;

use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::journal::Answered;
use super::{Answer, CallKind, Counted, HostState, Request};
use crate::limits::MAX_EFFECT_KEY;
use crate::model::now_ms;
use crate::runtime::Failure;
use crate::runtime::HandlerComponent;
use crate::runtime::bindings::dispatch::{DispatchError, EmitOutcome, Host};
use crate::runtime::bindings::types::HandlerError;
use crate::store::{EffectRecord, EffectState, EmitOutcome as Stored};

impl Host for HostState {
    async fn call(
        &mut self,
        handler: String,
        payload: String,
    ) -> wasmtime::Result<Result<String, DispatchError>> {
        let journaled = Request::new(CallKind::Call, &(&handler, &payload));
        let answer = match self.replayed(&journaled)? {
            Some(answer) => answer,
            None => {
                self.spend(Counted::Calls, payload.len())?;
                match self.caps.handlers.get(&handler).cloned() {
                    Some(component) => {
                        let task = self.start_handler(handler, component, payload);
                        self.answer_of(journaled, task).await?
                    }
                    None => {
                        let answer = Answer::Call(Err(DispatchError::NoSuchHandler(handler)));
                        self.journal.record(journaled, answer.clone());
                        answer
                    }
                }
            }
        };
        match answer {
            Answer::Call(result) => Ok(result),
            _ => Err(wasmtime::Error::msg(
                "the journal holds another kind of answer",
            )),
        }
    }

    async fn emit(
        &mut self,
        handler: String,
        payload: String,
        key: String,
    ) -> wasmtime::Result<Result<EmitOutcome, DispatchError>> {
        let journaled = Request::new(CallKind::Emit, &(&handler, &payload, &key));
        if let Some(answer) = self.replayed(&journaled)? {
            return match answer {
                Answer::Emit(result) => Ok(result),
                _ => Err(wasmtime::Error::msg(
                    "the journal holds another kind of answer",
                )),
            };
        }
        self.spend(Counted::Emits, payload.len())?;
        let result = self.emit_effect(handler, payload, key).await;
        self.journal.record(journaled, Answer::Emit(result.clone()));
        Ok(result)
    }
}

impl HostState {
    /// The handler, on a task of its own with an instance of its own (one of
    /// `Capabilities::handler_calls`), so that the stage may wait for it without its instance.
    fn start_handler(
        &self,
        name: String,
        component: Arc<HandlerComponent>,
        payload: String,
    ) -> AbortOnDropHandle<Answered> {
        let (caps, context, cancel) =
            (self.caps.clone(), self.context.clone(), self.cancel.clone());
        let call = async move {
            let _slot = caps.handler_calls.acquire().await;
            let result = match component
                .handle(caps.clone(), context, None, &payload, cancel)
                .await
            {
                Ok((output, _)) => Ok(output),
                Err(Failure::Retryable(m)) => {
                    Err(DispatchError::HandlerFailed(HandlerError::Retryable(m)))
                }
                Err(Failure::Fatal(m)) => Err(DispatchError::HandlerFailed(HandlerError::Fatal(m))),
                Err(other) => Err(DispatchError::Host(format!("handler `{name}`: {other}"))),
            };
            Answered {
                answer: Answer::Call(result),
                llm_calls: Vec::new(),
            }
        };
        AbortOnDropHandle::new(tokio::spawn(call.in_current_span()))
    }

    /// Record an effect to run once for (`handler`, `key`), unless one was.
    async fn emit_effect(
        &mut self,
        handler: String,
        payload: String,
        key: String,
    ) -> Result<EmitOutcome, DispatchError> {
        if !self.caps.handlers.contains_key(&handler) {
            return Err(DispatchError::NoSuchHandler(handler));
        }
        if key.is_empty() || key.len() > MAX_EFFECT_KEY {
            return Err(DispatchError::Host(format!(
                "an idempotency key is 1 to {MAX_EFFECT_KEY} bytes, not {}",
                key.len()
            )));
        }
        let c = &self.context;
        let record = EffectRecord {
            pipeline: self.caps.pipeline.clone(),
            revision: self.caps.revision.clone(),
            handler,
            key,
            payload,
            job_id: c.job_id.parse().unwrap_or_default(),
            item_id: c.item_id.parse().unwrap_or_default(),
            item_index: c.item_index,
            stage: c.stage.clone(),
            state: EffectState::Pending,
            created_at: now_ms(),
            finished_at: None,
            output: None,
            error: None,
            runs: 0,
            node: None,
        };
        // Claims the key and queues the effect together: no crash leaves a claimed key without
        // its effect (see the backends).
        match self.caps.effects.emit(&record).await {
            Ok(Stored::Accepted) => Ok(EmitOutcome::Accepted),
            Ok(Stored::Duplicate) => Ok(EmitOutcome::Duplicate),
            Err(e) => Err(DispatchError::Host(format!(
                "cannot record the effect: {e:#}"
            ))),
        }
    }
}
