//! The pipelines a node serves, by name. A job names its pipeline (`JobRecord::pipeline`), and
//! whatever runs it looks the pipeline up here when it starts.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Pipeline;

/// Why a request's pipeline could not be chosen.
#[derive(Debug, thiserror::Error)]
pub enum PipelineLookup {
    #[error("no pipeline `{name}` on this server (it serves {known})")]
    Unknown { name: String, known: String },
    #[error(
        "this server serves several pipelines ({known}): name one (`/v1/pipelines/{{name}}/...`, \
         `?pipeline=` or `\"pipeline\"` in the body)"
    )]
    Unnamed { known: String },
}

/// See the module's doc comment.
pub struct Pipelines {
    by_name: ArcSwap<BTreeMap<String, Arc<Pipeline>>>,
}

impl Pipelines {
    /// The registry of `pipelines`, whose names the caller made sure are distinct.
    pub fn new(pipelines: impl IntoIterator<Item = Arc<Pipeline>>) -> Self {
        let by_name = pipelines
            .into_iter()
            .map(|p| (p.config.name.clone(), p))
            .collect();
        Self {
            by_name: ArcSwap::from_pointee(by_name),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pipeline>> {
        self.by_name.load().get(name).cloned()
    }

    /// Every pipeline, by name.
    pub fn all(&self) -> Vec<Arc<Pipeline>> {
        self.by_name.load().values().cloned().collect()
    }

    /// The pipeline a stored record (an effect, a dead letter) names; records written before
    /// a node served several pipelines name none, and are the only pipeline's.
    pub fn of_record(&self, name: &str) -> Option<Arc<Pipeline>> {
        match name {
            "" => self.only(),
            name => self.get(name),
        }
    }

    /// The pipeline when there is exactly one.
    pub fn only(&self) -> Option<Arc<Pipeline>> {
        let by_name = self.by_name.load();
        match by_name.len() {
            1 => by_name.values().next().cloned(),
            _ => None,
        }
    }

    /// The pipeline a request names, or the only one when it names none.
    pub fn resolve(&self, name: Option<&str>) -> Result<Arc<Pipeline>, PipelineLookup> {
        match name {
            Some(name) => self.get(name).ok_or_else(|| PipelineLookup::Unknown {
                name: name.to_string(),
                known: self.known(),
            }),
            None => self.only().ok_or_else(|| PipelineLookup::Unnamed {
                known: self.known(),
            }),
        }
    }

    /// The names, quoted, for messages: "`a`, `b`", or "none".
    pub fn known(&self) -> String {
        let by_name = self.by_name.load();
        if by_name.is_empty() {
            return "none".to_string();
        }
        by_name
            .keys()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
