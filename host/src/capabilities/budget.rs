//! What one try may do through its host calls ([`Budgets`]), counted as it goes.
//!
//! A host call past a budget records why in the store's data and returns an error, which traps
//! the guest; the invocation then fails with kind `budget` and that message (see
//! `runtime::invoke`), so one misbehaving try costs at most its budgets, never the host's disk,
//! memory or log. Log lines are the exception: past their budget they are dropped (counted in
//! metrics, and said once in the host's log), since a chatty stage is not a broken one.

use super::HostState;
use crate::limits::Budgets;

/// Counted host calls of a try, each with a budget on its count and one on its size.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counted {
    Emits,
    Calls,
    LlmCalls,
    RecordWrites,
    HttpRequests,
}

impl Counted {
    /// The budgets' keys in the pipeline file, what they count and what they size.
    fn describe(self) -> [&'static str; 4] {
        match self {
            Counted::Emits => [
                "emits",
                "`dispatch.emit` calls",
                "emit_kib",
                "a `dispatch.emit` payload",
            ],
            Counted::Calls => [
                "calls",
                "`dispatch.call` calls",
                "call_kib",
                "a `dispatch.call` payload",
            ],
            Counted::LlmCalls => [
                "llm_calls",
                "LLM calls",
                "llm_request_kib",
                "an LLM request",
            ],
            Counted::RecordWrites => [
                "record_writes",
                "`records.put` calls",
                "record_kib",
                "a record",
            ],
            Counted::HttpRequests => [
                "http_requests",
                "outbound HTTP requests (`http.requests`)",
                "http.request_kib",
                "a request body",
            ],
        }
    }
}

/// What a try has used so far.
#[derive(Debug, Default)]
pub(crate) struct Spent {
    emits: u32,
    calls: u32,
    llm_calls: u32,
    record_writes: u32,
    pub(crate) http_requests: u32,
    log_lines: u32,
    log_bytes: usize,
    log_dropped: u64,
}

impl HostState {
    /// Count one more `call` of `size` bytes, or fail the try if that is one past its count
    /// budget or larger than its size budget.
    pub(crate) fn spend(&mut self, call: Counted, size: usize) -> wasmtime::Result<()> {
        let budgets = self.budgets;
        let (used, limit, max_size) = match call {
            Counted::Emits => (
                &mut self.journal.spent.emits,
                budgets.emits,
                budgets.emit_bytes,
            ),
            Counted::Calls => (
                &mut self.journal.spent.calls,
                budgets.calls,
                budgets.call_bytes,
            ),
            Counted::LlmCalls => (
                &mut self.journal.spent.llm_calls,
                budgets.llm_calls,
                budgets.llm_request_bytes,
            ),
            Counted::RecordWrites => (
                &mut self.journal.spent.record_writes,
                budgets.record_writes,
                budgets.record_bytes,
            ),
            Counted::HttpRequests => (
                &mut self.journal.spent.http_requests,
                self.outbound.grant.limits.requests,
                usize::MAX,
            ),
        };
        *used = used.saturating_add(1);
        let [count_key, counts, size_key, sized] = call.describe();
        if *used > limit {
            return Err(
                self.over_budget(count_key, format!("more than {limit} {counts} in one try"))
            );
        }
        self.fits(size_key, sized, size, max_size)
    }

    /// `size` bytes of `what` fit `limit` (budget `key`), or the try fails.
    pub(crate) fn fits(
        &mut self,
        key: &'static str,
        what: &str,
        size: usize,
        limit: usize,
    ) -> wasmtime::Result<()> {
        if size > limit {
            return Err(self.over_budget(
                key,
                format!("{what} of {size} bytes, over the limit of {limit} bytes"),
            ));
        }
        Ok(())
    }

    /// Fail the try: `key` ran out. The message is what the item's error says.
    pub(crate) fn over_budget(&mut self, key: &'static str, message: String) -> wasmtime::Error {
        crate::metrics::budget_exceeded(&self.caps.pipeline, &self.context.stage, key);
        let message = format!("budget `{key}`: {message}");
        self.exceeded = Some(message.clone());
        wasmtime::Error::msg(message)
    }

    /// Whether a log line of `bytes` may still be written; a line past the budget is dropped
    /// and counted, and the first one dropped is said in the host's log.
    pub(crate) fn log_allowed(&mut self, bytes: usize) -> bool {
        let Budgets {
            log_lines,
            log_bytes,
            ..
        } = self.budgets;
        let spent = &mut self.journal.spent;
        if spent.log_lines < log_lines && spent.log_bytes.saturating_add(bytes) <= log_bytes {
            spent.log_lines += 1;
            spent.log_bytes += bytes;
            return true;
        }
        spent.log_dropped += 1;
        crate::metrics::guest_log_dropped(&self.caps.pipeline, &self.context.stage);
        if spent.log_dropped == 1 {
            let c = &self.context;
            tracing::warn!(
                job = %c.job_id, item = c.item_index, stage = %c.stage,
                "the guest used its log budget ({log_lines} lines, {log_bytes} bytes per try): \
                 further lines of this try are dropped"
            );
        }
        false
    }
}
