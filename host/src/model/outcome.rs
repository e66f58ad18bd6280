//! What a client's request to a job came to, whichever backend holds the job.

use super::{JobRecord, JobState};

/// A client's idempotency key for a submission, and a digest of what it submitted.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: String,
    pub request_digest: String,
}

impl Idempotency {
    /// The answer to a submission whose key `existing` holds already: that job, or a conflict
    /// if it was asked for with another request.
    pub fn repeat_of(&self, existing: JobRecord) -> Submitted {
        if existing.request_digest == self.request_digest {
            Submitted::Existing(existing)
        } else {
            Submitted::Conflict(existing)
        }
    }
}

/// What a submission did.
#[derive(Debug)]
pub enum Submitted {
    New(JobRecord),
    /// The key was used before, for the same request: this is that job.
    Existing(JobRecord),
    /// The key was used before for another request.
    Conflict(JobRecord),
}

/// What became of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was running; it stops now.
    Cancelling,
    /// The job had already ended in this state.
    Finished(JobState),
    Unknown,
}

/// What a reprocess request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reprocess {
    /// This many dead letters are being run again.
    Started(usize),
    /// The job is running (or being reprocessed): wait for it to end.
    Running,
    UnknownJob,
    /// The job cannot run here (its pipeline is not served, or its options are out of
    /// bounds): why.
    Unrunnable(String),
}
