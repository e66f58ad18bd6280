//! Running jobs, whichever backend holds them: each item through every stage ([`item`]), items
//! of a job under a concurrency limit ([`batch`]), how a stored job runs on a pipeline
//! ([`admission`]), emitted effects in the background ([`effects`]).

pub mod admission;
pub mod batch;
pub mod effects;
pub mod item;

pub use admission::{item_limits, runnable};
pub use batch::{JobOutcome, RunSettings, run_job};
pub use effects::EffectRunner;
pub use item::{ItemHooks, ItemLimits, ItemRef, StageSink, StageUpdate, run_item, stage_input};
