//! The job vocabulary every layer shares: what a job, its options, items and results are, and
//! what a submission or a cancel came to. It sits below the store, the job runner, both
//! backends and the API, and imports none of them.
//!
//! - [`record`]: jobs and item results as they are kept and shown.
//! - [`options`]: what a client may ask of a job, checked against the pipeline's limits.
//! - [`outcome`]: idempotent submission, cancel and reprocess answers.

mod options;
mod outcome;
mod record;

pub use options::{DEFAULT_PREVIEW_CHARS, Detail, JobOptions};
pub use outcome::{CancelOutcome, Idempotency, Reprocess, Submitted};
pub use record::{
    Attempt, ItemError, ItemResult, ItemStatus, JobRecord, JobState, LlmCall, StageRun, item_id,
    now_ms,
};
