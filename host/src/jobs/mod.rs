//! Running jobs: each item through every stage ([`item`]), items of a job under a concurrency
//! limit ([`batch`]), and emitted effects in the background ([`effects`]).

pub mod batch;
pub mod effects;
pub mod item;
pub mod manager;
pub mod retention;

pub use batch::{JobOutcome, RunSettings, run_job};
pub use effects::EffectRunner;
pub use item::{ItemHooks, ItemLimits, ItemRef, StageSink, StageUpdate, run_item};
pub use manager::{CancelOutcome, Idempotency, JobManager, JobOptions, Submitted};
