//! The node's memory budget for items in flight (`[run] memory_budget_mib`).
//!
//! An item waiting on the LLM holds no wasm instance (`capabilities/journal.rs`), so what bounds
//! how many items a node can keep in flight is memory: the item's task, its input and stage
//! outputs, its journal, the LLM request and its connection. Each item is charged an estimate
//! when it starts — [`ITEM_BASE_BYTES`], measured with the in-flight benchmark
//! (docs/BENCHMARKS.md), plus its input's size — and waits in line (FIFO, across every job)
//! while the budget is spent. A job's `concurrency` means what it says until the node's memory
//! says otherwise, and `stagehand_items_waiting_for_memory` tells an operator which one binds.
//!
//! The charge is fixed at the start: taking more as an item grows could leave every item holding
//! part of what it needs and waiting for the rest.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What one item in flight is counted for before its input: measured at 55-64 KiB per item
/// waiting on the LLM with ten thousand in flight.
pub const ITEM_BASE_BYTES: u64 = 64 * 1024;

/// `[run] memory_budget_mib` from 1 MiB (tests, tiny nodes) to 1 TiB.
pub const MIN_MEMORY_BUDGET_MIB: u64 = 1;
pub const MAX_MEMORY_BUDGET_MIB: u64 = 1 << 20;

/// What `[run] memory_budget_mib` is when the pipeline file does not say: 1 GiB (about 16,000
/// items in flight), or half the machine's memory on a smaller one.
pub fn default_budget_mib() -> u64 {
    machine_mib().map_or(1024, |machine| {
        (machine / 2).clamp(MIN_MEMORY_BUDGET_MIB, 1024)
    })
}

/// The machine's physical memory in MiB (`sysinfo(2)`).
pub fn machine_mib() -> Option<u64> {
    let info = rustix::system::sysinfo();
    // `totalram` is a C `unsigned long`: 32 bits on some targets.
    #[allow(clippy::useless_conversion)]
    let bytes = u64::from(info.totalram).checked_mul(u64::from(info.mem_unit.max(1)))?;
    (bytes > 0).then_some(bytes >> 20)
}

/// The budget, shared by every job of the node; permits are KiB.
#[derive(Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_kib: u32,
}

/// What an item holds of the budget while it is in flight; given back when dropped.
pub struct MemoryCharge {
    _permit: OwnedSemaphorePermit,
    bytes: f64,
}

impl MemoryBudget {
    /// A budget of `mib` MiB, which the caller has checked is within
    /// [`MIN_MEMORY_BUDGET_MIB`]..=[`MAX_MEMORY_BUDGET_MIB`].
    pub fn new(mib: u64) -> Self {
        let mib = mib.clamp(MIN_MEMORY_BUDGET_MIB, MAX_MEMORY_BUDGET_MIB);
        let total_kib = u32::try_from(mib * 1024).expect("1 TiB in KiB fits in u32");
        crate::metrics::memory_budget((mib * 1024 * 1024) as f64);
        Self {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// KiB an item with `input_bytes` of input is charged: never more than the whole budget,
    /// so that an item larger than it runs alone instead of never.
    pub fn charge_kib(&self, input_bytes: usize) -> u32 {
        let bytes = ITEM_BASE_BYTES.saturating_add(input_bytes as u64);
        u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.total_kib)
    }

    /// Wait (in line with every other item of the node) until the budget has room for an item
    /// with `input_bytes` of input.
    pub async fn admit(&self, input_bytes: usize) -> MemoryCharge {
        let kib = self.charge_kib(input_bytes);
        let permit = match self.permits.clone().try_acquire_many_owned(kib) {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = crate::metrics::item_waiting_for_memory();
                self.permits
                    .clone()
                    .acquire_many_owned(kib)
                    .await
                    .expect("the budget's semaphore is never closed")
            }
        };
        let bytes = f64::from(kib) * 1024.0;
        crate::metrics::memory_charged(bytes);
        MemoryCharge {
            _permit: permit,
            bytes,
        }
    }

    /// KiB not charged to any item right now.
    #[cfg(test)]
    fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        crate::metrics::memory_charged(-self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_item_is_charged_its_base_and_its_input_and_never_more_than_the_budget() {
        let budget = MemoryBudget::new(1);
        assert_eq!(budget.charge_kib(0), 64);
        assert_eq!(budget.charge_kib(1), 65);
        assert_eq!(budget.charge_kib(10 * 1024), 74);
        assert_eq!(budget.charge_kib(usize::MAX), 1024);
    }

    #[tokio::test]
    async fn items_past_the_budget_wait_until_one_finishes() {
        let budget = MemoryBudget::new(1);
        let held: Vec<MemoryCharge> =
            futures::future::join_all((0..16).map(|_| budget.admit(0))).await;
        assert_eq!(budget.available_kib(), 0);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.admit(0).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the 17th item waits for room");
        drop(held);
        let charge = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("admitted once the others finish")
            .unwrap();
        assert_eq!(budget.available_kib(), 1024 - 64);
        drop(charge);
        assert_eq!(budget.available_kib(), 1024);
    }

    #[tokio::test]
    async fn an_item_larger_than_the_budget_runs_alone() {
        let budget = MemoryBudget::new(1);
        let huge = budget.admit(64 << 20).await;
        assert_eq!(budget.available_kib(), 0);
        drop(huge);
        assert_eq!(budget.available_kib(), 1024);
    }
}
