//! How a stored job runs on a pipeline, whichever backend runs it: the limits of its items,
//! or why it cannot run at all.

use std::time::Duration;

use super::ItemLimits;
use crate::config::PipelineConfig;
use crate::model::{JobOptions, JobRecord};

/// Limits of a job's items: the job's `options` over the pipeline's settings.
pub fn item_limits(config: &PipelineConfig, options: &JobOptions) -> ItemLimits {
    ItemLimits {
        stage_timeout: options.stage_timeout_ms.map(Duration::from_millis),
        item_timeout: options
            .item_timeout_ms
            .or(config.run.item_timeout_ms)
            .map(Duration::from_millis),
        max_tokens: options.max_tokens.or(config.llm.max_tokens_per_job),
    }
}

/// Why a stored job cannot run on this pipeline, if it cannot: it names another pipeline, or
/// its options (from another version, or from before a limit was lowered) are out of bounds.
/// Such a job fails with this reason instead of being run.
pub fn unrunnable(config: &PipelineConfig, job: &JobRecord) -> Option<String> {
    if job.pipeline != config.name {
        return Some(format!(
            "the job belongs to pipeline `{}`, which this server does not run (it runs `{}`)",
            job.pipeline, config.name
        ));
    }
    job.options
        .check(&config.limits)
        .err()
        .map(|e| format!("the job cannot run: {e}"))
}
