//! `dispatch`: a synchronous `call` to a handler, or a durable, idempotent `emit`; both counted
//! and sized against the try's budgets (`calls`, `call_kib`, `emits`, `emit_kib`).

use super::{Counted, HostState};
use crate::limits::MAX_EFFECT_KEY;
use crate::runtime::Failure;
use crate::runtime::bindings::dispatch::{DispatchError, EmitOutcome, Host};
use crate::runtime::bindings::types::HandlerError;
use crate::store::{EffectRecord, EffectState, EmitOutcome as Stored, now_ms};

impl Host for HostState {
    async fn call(
        &mut self,
        handler: String,
        payload: String,
    ) -> wasmtime::Result<Result<String, DispatchError>> {
        self.spend(Counted::Calls, payload.len())?;
        let Some(component) = self.caps.handlers.get(&handler).cloned() else {
            return Ok(Err(DispatchError::NoSuchHandler(handler)));
        };
        let call = component.handle(
            self.caps.clone(),
            self.context.clone(),
            None,
            &payload,
            self.cancel.clone(),
        );
        Ok(match self.meter.host_call(call).await {
            Ok((output, _)) => Ok(output),
            Err(Failure::Retryable(m)) => {
                Err(DispatchError::HandlerFailed(HandlerError::Retryable(m)))
            }
            Err(Failure::Fatal(m)) => Err(DispatchError::HandlerFailed(HandlerError::Fatal(m))),
            Err(other) => Err(DispatchError::Host(format!("handler `{handler}`: {other}"))),
        })
    }

    async fn emit(
        &mut self,
        handler: String,
        payload: String,
        key: String,
    ) -> wasmtime::Result<Result<EmitOutcome, DispatchError>> {
        self.spend(Counted::Emits, payload.len())?;
        if !self.caps.handlers.contains_key(&handler) {
            return Ok(Err(DispatchError::NoSuchHandler(handler)));
        }
        if key.is_empty() || key.len() > MAX_EFFECT_KEY {
            return Ok(Err(DispatchError::Host(format!(
                "an idempotency key is 1 to {MAX_EFFECT_KEY} bytes, not {}",
                key.len()
            ))));
        }
        if let Some(keys) = &self.caps.effect_keys {
            match keys.claim(&handler, &key).await {
                Ok(true) => {}
                Ok(false) => return Ok(Ok(EmitOutcome::Duplicate)),
                Err(e) => {
                    return Ok(Err(DispatchError::Host(format!(
                        "cannot claim the effect key: {e:#}"
                    ))));
                }
            }
        }
        let c = &self.context;
        let record = EffectRecord {
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
        };
        Ok(match self.caps.store.emit_effect(&record) {
            Ok(Stored::Accepted) => {
                self.caps.effects_waiting.notify_one();
                Ok(EmitOutcome::Accepted)
            }
            Ok(Stored::Duplicate) => Ok(EmitOutcome::Duplicate),
            Err(e) => Err(DispatchError::Host(format!(
                "cannot record the effect: {e:#}"
            ))),
        })
    }
}
