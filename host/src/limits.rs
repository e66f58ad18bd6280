//! Every bound on what a client or a guest controls, in one place.
//!
//! Whatever enters from outside (a job's items and options, a query parameter, a stage's
//! output, a host call of a guest) is checked against these where it enters, and refused with
//! a message that names the field and the limit. Readers can then rely on them: a stored JSON
//! value is never deeper than [`MAX_JSON_DEPTH`], which every JSON reader (serde_json's 128,
//! the guests' SDK, browsers) can take with room for the envelope around it.
//!
//! The job-level limits an operator may need to raise are the pipeline file's `[limits]`
//! ([`JobLimits`]); the per-try budgets of host calls are `[defaults.budgets]` and each stage's
//! `budgets` ([`Budgets`]). The rest are fixed here.

use serde::Deserialize;

/// Deepest nesting of arrays and objects accepted in an item or a stage or handler output.
/// An envelope adds two levels and a results page four, well under serde_json's 128.
pub const MAX_JSON_DEPTH: usize = 64;

/// Longest name of a pipeline, stage, handler or kv namespace (`config.rs` checks files
/// against it; routes check names they are given).
pub const MAX_NAME: usize = 64;

/// Labels on one job, and the length of each key and value in bytes.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY: usize = 128;
pub const MAX_LABEL_VALUE: usize = 1024;

/// The largest `preview_chars` a job may ask for in its `item.finished` events.
pub const MAX_PREVIEW_CHARS: usize = 65_536;

/// Most entries any listing returns per page (`limit`, `page_size`).
pub const MAX_PAGE: usize = 1000;

/// Highest `page` of seed 000's offset paging (offset paging walks the skipped results).
pub const MAX_PAGE_NUMBER: usize = 100_000;

/// An SSE stream's `max_items` per progress frame, and its `interval_ms` range.
pub const MAX_PROGRESS_ITEMS: usize = 1000;
pub const MIN_PROGRESS_INTERVAL_MS: u64 = 100;
pub const MAX_PROGRESS_INTERVAL_MS: u64 = 600_000;

/// The largest event number or item index a client may name (`after`, `last_event_id`,
/// `indices`): the largest signed 64-bit integer, which every client language can hold.
pub const MAX_POSITION: u64 = i64::MAX as u64;

/// Longest kv namespace or key (and records collection or key) a guest may name, in bytes;
/// past it the try fails with budget `kv_key`.
pub const MAX_KV_KEY: usize = 4096;

/// Longest idempotency key of a `dispatch.emit`, in bytes.
pub const MAX_EFFECT_KEY: usize = 1024;

/// A stage's `[stage.config]` settings (the `config` import): how many, a name's and a
/// value's length in bytes, and all names and values together. Settings are text for a guest
/// to read (templates, thresholds, model names), not data: a namespace (`[kv.NAME]`) holds that.
pub const MAX_STAGE_SETTINGS: usize = 256;
pub const MAX_SETTING_NAME: usize = 128;
pub const MAX_SETTING_VALUE: usize = 65_536;
pub const MAX_SETTINGS_BYTES: usize = 262_144;

/// What one job may ask for: `[limits]` of the pipeline file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobLimits {
    /// Items in one job.
    #[serde(default = "defaults::max_items")]
    pub max_items: u64,
    /// One item's JSON, in KiB (an item may carry an image: keep room for `--max-image-mib`).
    #[serde(default = "defaults::max_item_kib")]
    pub max_item_kib: usize,
    /// A job's `concurrency` (items in flight).
    #[serde(default = "defaults::max_concurrency")]
    pub max_concurrency: usize,
    /// A job's `stage_timeout_ms` and `item_timeout_ms`.
    #[serde(default = "defaults::max_timeout_ms")]
    pub max_timeout_ms: u64,
    /// A job's `max_tokens` (its LLM token budget).
    #[serde(default = "defaults::max_job_tokens")]
    pub max_job_tokens: u64,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_items: defaults::max_items(),
            max_item_kib: defaults::max_item_kib(),
            max_concurrency: defaults::max_concurrency(),
            max_timeout_ms: defaults::max_timeout_ms(),
            max_job_tokens: defaults::max_job_tokens(),
        }
    }
}

impl JobLimits {
    pub fn max_item_bytes(&self) -> usize {
        self.max_item_kib.saturating_mul(1024)
    }
}

/// What one try of a stage (or one handler run) may do through its host calls. Past a budget
/// the try fails with kind `budget`, except for logs: lines past them are dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub log_lines: u32,
    pub log_bytes: usize,
    /// `dispatch.emit` calls, and the largest payload of one.
    pub emits: u32,
    pub emit_bytes: usize,
    /// `dispatch.call` calls, and the largest payload of one.
    pub calls: u32,
    pub call_bytes: usize,
    /// `llm.chat` and `llm.chat-stream` calls, and the largest request (text and image URLs).
    pub llm_calls: u32,
    pub llm_request_bytes: usize,
    /// The longest `progress.report` message.
    pub progress_bytes: usize,
    /// A handler's `records.put` calls, and the largest value.
    pub record_writes: u32,
    pub record_bytes: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            log_lines: 1000,
            log_bytes: 256 << 10,
            emits: 64,
            emit_bytes: 64 << 10,
            calls: 64,
            call_bytes: 1 << 20,
            llm_calls: 16,
            llm_request_bytes: 16 << 20,
            progress_bytes: 1024,
            record_writes: 64,
            record_bytes: 256 << 10,
        }
    }
}

/// Optional overrides of [`Budgets`]: the `budgets` table of `[defaults]`, a stage or a handler.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsSpec {
    pub log_lines: Option<u32>,
    pub log_kib: Option<usize>,
    pub emits: Option<u32>,
    pub emit_kib: Option<usize>,
    pub calls: Option<u32>,
    pub call_kib: Option<usize>,
    pub llm_calls: Option<u32>,
    pub llm_request_kib: Option<usize>,
    pub progress_bytes: Option<usize>,
    pub record_writes: Option<u32>,
    pub record_kib: Option<usize>,
}

impl BudgetsSpec {
    pub fn over(self, base: Budgets) -> Budgets {
        let kib = |v: Option<usize>, base: usize| v.map_or(base, |k| k.saturating_mul(1024));
        Budgets {
            log_lines: self.log_lines.unwrap_or(base.log_lines),
            log_bytes: kib(self.log_kib, base.log_bytes),
            emits: self.emits.unwrap_or(base.emits),
            emit_bytes: kib(self.emit_kib, base.emit_bytes),
            calls: self.calls.unwrap_or(base.calls),
            call_bytes: kib(self.call_kib, base.call_bytes),
            llm_calls: self.llm_calls.unwrap_or(base.llm_calls),
            llm_request_bytes: kib(self.llm_request_kib, base.llm_request_bytes),
            progress_bytes: self.progress_bytes.unwrap_or(base.progress_bytes),
            record_writes: self.record_writes.unwrap_or(base.record_writes),
            record_bytes: kib(self.record_kib, base.record_bytes),
        }
    }
}

mod defaults {
    pub fn max_items() -> u64 {
        1_000_000
    }
    pub fn max_item_kib() -> usize {
        16 << 10
    }
    pub fn max_concurrency() -> usize {
        1024
    }
    pub fn max_timeout_ms() -> u64 {
        24 * 3600 * 1000
    }
    pub fn max_job_tokens() -> u64 {
        1_000_000_000
    }
}

/// A value over its limit, or otherwise out of range: the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OutOfBounds(pub String);

/// `value` of `field` within `min..=max`, or an error naming both bounds.
pub fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), OutOfBounds> {
    if value < min || value > max {
        return Err(OutOfBounds(format!(
            "`{field}` is {value}; it must be {min} to {max}"
        )));
    }
    Ok(())
}

/// Check that `text` is JSON no deeper than [`MAX_JSON_DEPTH`] and at most `max_bytes` long;
/// the message starts with `what`.
pub fn check_json(text: &str, what: &str, max_bytes: usize) -> Result<(), OutOfBounds> {
    check_size_and_depth(text, what, max_bytes)?;
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(OutOfBounds(format!(
            "{what} is not JSON ({e}): {}",
            crate::text::truncate(text, 200)
        )));
    }
    Ok(())
}

/// [`check_json`] for text already known to be JSON.
pub fn check_size_and_depth(text: &str, what: &str, max_bytes: usize) -> Result<(), OutOfBounds> {
    if text.len() > max_bytes {
        return Err(OutOfBounds(format!(
            "{what} is {} bytes, over the limit of {max_bytes} bytes",
            text.len()
        )));
    }
    let depth = json_depth(text.as_bytes());
    if depth > MAX_JSON_DEPTH {
        return Err(OutOfBounds(format!(
            "{what} nests {depth} levels deep, over the limit of {MAX_JSON_DEPTH}"
        )));
    }
    Ok(())
}

/// The deepest nesting of arrays and objects in JSON text (brackets inside strings do not
/// count). One pass, no allocation: it runs before anything parses the text, so that a deep
/// value is refused instead of hitting a parser's recursion limit.
pub fn json_depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in text {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(b"[]"), 1);
        assert_eq!(json_depth(br#"{"a":[1,{"b":[]}]}"#), 4);
        assert_eq!(json_depth(br#"["[[[[", "\"[[", {"x": "]]]]"}]"#), 2);
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(json_depth(deep.as_bytes()), 200);
    }

    #[test]
    fn check_json_names_the_limit() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let error = check_json(&deep, "item 3", 1 << 20).unwrap_err().0;
        assert!(error.contains("item 3 nests 65 levels"), "{error}");
        assert!(error.contains("limit of 64"), "{error}");
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        check_json(&ok, "x", 1 << 20).unwrap();
        let error = check_json("[1,2,3]", "output", 4).unwrap_err().0;
        assert!(
            error.contains("7 bytes, over the limit of 4 bytes"),
            "{error}"
        );
        assert!(check_json("{", "x", 10).unwrap_err().0.contains("not JSON"));
    }

    #[test]
    fn range_errors_name_field_and_bounds() {
        let error = in_range("options.concurrency", 4_294_967_296u64, 1, 1024).unwrap_err();
        assert_eq!(
            error.0,
            "`options.concurrency` is 4294967296; it must be 1 to 1024"
        );
        in_range("x", 5, 1, 5).unwrap();
    }
}
