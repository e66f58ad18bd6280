//! How a stored job runs on a pipeline, whichever backend runs it: the limits of its items,
//! or why it cannot run at all.

use std::sync::Arc;
use std::time::Duration;

use super::ItemLimits;
use crate::config::PipelineConfig;
use crate::model::{JobOptions, JobRecord};
use crate::pipeline::{Pipeline, Pipelines};

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

/// The pipeline a stored job runs on, in the revision it was submitted with (its stages,
/// handlers and limits), or why it cannot run: it names a pipeline this node does not serve,
/// its revision cannot be loaded, or its options (from another version, or from before a limit
/// was lowered) are out of bounds. Such a job fails with this reason instead of being run.
pub async fn runnable(pipelines: &Pipelines, job: &JobRecord) -> Result<Arc<Pipeline>, String> {
    let pipeline = pipelines.find(&job.pipeline, &job.revision).await?;
    match job.options.check(&pipeline.config.limits) {
        Ok(()) => Ok(pipeline),
        Err(e) => Err(format!("the job cannot run: {e}")),
    }
}
