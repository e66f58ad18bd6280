//! Running jobs: each item through every stage ([`item`]), items of a job under a concurrency
//! limit ([`batch`]), emitted effects in the background ([`effects`]), dead letters run again
//! on a timer ([`auto_reprocess`]), old jobs removed ([`retention`]).

pub mod admission;
pub mod auto_reprocess;
pub mod backend;
pub mod batch;
pub mod effects;
pub mod item;
pub mod manager;
pub mod retention;

pub use admission::{item_limits, unrunnable};
pub use backend::{Embedded, JobBackend};
pub use batch::{JobOutcome, RunSettings, run_job};
pub use effects::EffectRunner;
pub use item::{ItemHooks, ItemLimits, ItemRef, StageSink, StageUpdate, run_item, stage_input};
pub use manager::JobManager;
