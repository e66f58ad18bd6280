//! One stage of a loaded pipeline: the version new items get, the ones kept for rollback, a
//! canary on trial, and the stage's own concurrency limit.

use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::StageConfig;
use crate::runtime::StageComponent;

/// One stage of the pipeline: its configuration and the version new items get.
pub struct Stage {
    pub config: StageConfig,
    /// Read once at stage entry: a later swap affects the next entry, never a running item.
    current: ArcSwap<StageComponent>,
    /// Versions swapped out, oldest first, for rollback; at most [`KEPT_VERSIONS`].
    previous: Mutex<Vec<Arc<StageComponent>>>,
    /// A version on trial: a share of the items get it instead of `current`.
    canary: ArcSwapOption<Canary>,
    permits: Option<Semaphore>,
}

/// A version that `percent` % of the items entering the stage get, chosen by item id so that an
/// item keeps its version across retries, restarts and reprocessing.
pub struct Canary {
    pub version: Arc<StageComponent>,
    pub percent: u8,
}

impl Canary {
    /// Whether `item` is in the canary's share. Item ids are UUID v5 (a hash), so their low bits
    /// spread items evenly.
    pub fn takes(&self, item: uuid::Uuid) -> bool {
        (item.as_u128() % 100) < u128::from(self.percent)
    }
}

/// Previous versions kept per stage for rollback.
pub const KEPT_VERSIONS: usize = 5;

impl Stage {
    /// The stage as its file describes it: `component` current, nothing kept, no canary.
    pub fn new(config: StageConfig, component: Arc<StageComponent>) -> Self {
        Self {
            permits: config.concurrency.map(Semaphore::new),
            config,
            current: ArcSwap::new(component),
            previous: Mutex::default(),
            canary: ArcSwapOption::empty(),
        }
    }

    /// The version most items entering the stage now get.
    pub fn current(&self) -> Arc<StageComponent> {
        self.current.load_full()
    }

    /// The version `item` gets entering the stage now: the canary's if it is in its share.
    pub fn version_for(&self, item: uuid::Uuid) -> Arc<StageComponent> {
        match &*self.canary.load() {
            Some(canary) if canary.takes(item) => canary.version.clone(),
            _ => self.current(),
        }
    }

    pub fn canary(&self) -> Option<Arc<Canary>> {
        self.canary.load_full()
    }

    /// Put `canary` on trial (replacing any other), or end the trial with `None`.
    pub fn set_canary(&self, canary: Option<Canary>) {
        self.canary.store(canary.map(Arc::new));
    }

    /// Versions that can be rolled back to, newest last.
    pub fn previous(&self) -> Vec<Arc<StageComponent>> {
        self.previous.lock().expect("not poisoned").clone()
    }

    /// Set the current version and the ones before it (restoring installed versions).
    pub fn restore(&self, current: Arc<StageComponent>, previous: Vec<Arc<StageComponent>>) {
        let mut kept = self.previous.lock().expect("not poisoned");
        *kept = previous;
        self.current.store(current);
    }

    /// Wait for room under the stage's own concurrency limit, if it has one.
    pub async fn enter(&self) -> Option<SemaphorePermit<'_>> {
        match &self.permits {
            Some(permits) => Some(
                permits
                    .acquire()
                    .await
                    .expect("stage semaphores are never closed"),
            ),
            None => None,
        }
    }
}
