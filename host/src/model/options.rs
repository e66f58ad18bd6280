//! A job's options: what a client may ask for at submission, kept with the job so that a job
//! resumed after a restart runs the same way, and checked against [`JobLimits`] both when it is
//! submitted and when it is resumed.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::limits::{self, JobLimits, OutOfBounds, in_range};

/// Per-job settings a client may give at submission.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobOptions {
    /// Items in flight for this job (default: the pipeline's `[run] concurrency`; at most
    /// `[limits] max_concurrency`, 1,024 unless the operator changed it).
    #[schema(minimum = 1, maximum = 1024)]
    pub concurrency: Option<usize>,
    /// Run the items one at a time (seed 000: a model server that cannot take bursts).
    #[serde(default)]
    pub sequential: bool,
    /// Characters of output or error kept in `item.finished` previews (default 3,000).
    #[schema(minimum = 0, maximum = 65536)]
    pub preview_chars: Option<usize>,
    /// `items` (default): one event per finished item. `stages`: also one as each stage of
    /// each item starts and ends. One-item jobs always get `stages`.
    #[serde(default)]
    pub detail: Detail,
    /// Free-form labels kept with the job: at most 32, keys of 1 to 128 bytes, values of at
    /// most 1,024.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Wall-clock limit of every stage try for this job (default: each stage's `timeout_ms`;
    /// at most `[limits] max_timeout_ms`, 24 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400000)]
    pub stage_timeout_ms: Option<u64>,
    /// Wall-clock limit of one item, retries included (default: `[run] item_timeout_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400000)]
    pub item_timeout_ms: Option<u64>,
    /// LLM tokens (prompt and completion) the whole job may use (default: the pipeline's
    /// `[llm] max_tokens_per_job`, else none). Once reached, no LLM call of the job starts and
    /// the items that would make one fail with kind `budget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000000000)]
    pub max_tokens: Option<u64>,
    /// Set when the stored options could not be read (written by another version): the job
    /// cannot run and fails with this reason instead.
    #[serde(skip)]
    #[schema(ignore)]
    pub unreadable: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Detail {
    #[default]
    Items,
    Stages,
}

pub const DEFAULT_PREVIEW_CHARS: usize = 3000;

impl JobOptions {
    /// Whether these options stay within `limits`; the error names the field and the limit.
    pub fn check(&self, limits: &JobLimits) -> Result<(), OutOfBounds> {
        if let Some(reason) = &self.unreadable {
            return Err(OutOfBounds(format!(
                "the stored options cannot be read: {reason}"
            )));
        }
        if let Some(concurrency) = self.concurrency {
            in_range(
                "options.concurrency",
                concurrency,
                1,
                limits.max_concurrency,
            )?;
        }
        if let Some(chars) = self.preview_chars {
            in_range("options.preview_chars", chars, 0, limits::MAX_PREVIEW_CHARS)?;
        }
        for (field, value) in [
            ("options.stage_timeout_ms", self.stage_timeout_ms),
            ("options.item_timeout_ms", self.item_timeout_ms),
        ] {
            if let Some(ms) = value {
                in_range(field, ms, 1, limits.max_timeout_ms)?;
            }
        }
        if let Some(tokens) = self.max_tokens {
            in_range("options.max_tokens", tokens, 1, limits.max_job_tokens)?;
        }
        if self.labels.len() > limits::MAX_LABELS {
            return Err(OutOfBounds(format!(
                "`options.labels` has {} labels, over the limit of {}",
                self.labels.len(),
                limits::MAX_LABELS
            )));
        }
        for (key, value) in &self.labels {
            if key.is_empty() || key.len() > limits::MAX_LABEL_KEY {
                return Err(OutOfBounds(format!(
                    "a key of `options.labels` is {} bytes; keys are 1 to {} bytes",
                    key.len(),
                    limits::MAX_LABEL_KEY
                )));
            }
            if value.len() > limits::MAX_LABEL_VALUE {
                return Err(OutOfBounds(format!(
                    "`options.labels.{}` is {} bytes, over the limit of {} bytes",
                    crate::text::truncate(key, 40),
                    value.len(),
                    limits::MAX_LABEL_VALUE
                )));
            }
        }
        Ok(())
    }

    /// Read stored options without failing the record they are part of: options written by
    /// another version (an unknown field, a changed type) come back marked
    /// [`unreadable`](Self::unreadable), so the job can fail with a reason instead of making
    /// the whole record, and the server's start, fail.
    pub(crate) fn lenient<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(Self::deserialize(&value).unwrap_or_else(|error| Self {
            unreadable: Some(error.to_string()),
            ..Self::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_is_bounded() {
        let limits = JobLimits::default();
        let refused = |options: serde_json::Value| {
            let options: JobOptions = serde_json::from_value(options).unwrap();
            options.check(&limits).unwrap_err().0
        };
        assert!(refused(serde_json::json!({"concurrency": 4294967296u64})).contains("1 to 1024"));
        assert!(refused(serde_json::json!({"concurrency": 0})).contains("options.concurrency"));
        assert!(refused(serde_json::json!({"preview_chars": 1_000_000})).contains("65536"));
        assert!(refused(serde_json::json!({"stage_timeout_ms": 0})).contains("stage_timeout_ms"));
        assert!(
            refused(serde_json::json!({"item_timeout_ms": u64::MAX})).contains("item_timeout_ms")
        );
        assert!(refused(serde_json::json!({"max_tokens": 0})).contains("max_tokens"));
        let many: BTreeMap<String, String> =
            (0..33).map(|i| (i.to_string(), String::new())).collect();
        assert!(refused(serde_json::json!({ "labels": many })).contains("33 labels"));
        let big = "x".repeat(2000);
        assert!(refused(serde_json::json!({"labels": {"k": big}})).contains("labels.k"));
        JobOptions::default().check(&limits).unwrap();
    }

    #[test]
    fn options_of_another_version_are_marked_not_fatal() {
        #[derive(Deserialize)]
        struct Record {
            #[serde(deserialize_with = "JobOptions::lenient")]
            options: JobOptions,
        }
        let record: Record =
            serde_json::from_str(r#"{"options": {"concurrency": 2, "priority": "high"}}"#).unwrap();
        let reason = record.options.check(&JobLimits::default()).unwrap_err().0;
        assert!(reason.contains("unknown field `priority`"), "{reason}");
    }
}
