//! Guest CPU time: what `cpu_ms` budgets and results report.
//!
//! Measured with the thread's CPU clock around each poll of an invocation (instantiation, guest
//! code, and the synchronous part of its host calls), so that time the invocation spends
//! waiting is never charged to the guest: neither for a host call's answer (the LLM, a
//! handler), nor for a worker thread when ten thousand items share two cores. Wall-clock
//! accounting charged that queueing to whichever guest was unlucky, and failed well-behaved
//! stages with `cpu_budget` under load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};

/// CPU time used by one invocation's polls; shared by the poll wrapper ([`measured`]) and the
/// epoch callback that enforces the budget.
#[derive(Debug, Default)]
pub struct CpuMeter {
    /// Nanoseconds of the polls that ended.
    used: AtomicU64,
    /// The thread's CPU clock when the current poll began; 0 between polls.
    poll_began: AtomicU64,
}

impl CpuMeter {
    /// CPU time used so far, the current poll's included.
    pub fn used(&self) -> Duration {
        let began = self.poll_began.load(Ordering::Relaxed);
        let current = if began == 0 {
            0
        } else {
            thread_cpu_nanos().saturating_sub(began)
        };
        Duration::from_nanos(self.used.load(Ordering::Relaxed) + current)
    }
}

/// `future`, with the CPU time of each of its polls added to `meter`.
pub async fn measured<F: Future>(meter: Arc<CpuMeter>, future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        meter
            .poll_began
            .store(thread_cpu_nanos().max(1), Ordering::Relaxed);
        let poll = future.as_mut().poll(cx);
        let began = meter.poll_began.swap(0, Ordering::Relaxed);
        let spent = thread_cpu_nanos().saturating_sub(began);
        meter.used.fetch_add(spent, Ordering::Relaxed);
        poll
    })
    .await
}

fn thread_cpu_nanos() -> u64 {
    let now = clock_gettime(ClockId::ThreadCPUTime);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_is_not_charged_and_work_is() {
        let meter = Arc::new(CpuMeter::default());
        measured(
            meter.clone(),
            tokio::time::sleep(Duration::from_millis(200)),
        )
        .await;
        assert!(
            meter.used() < Duration::from_millis(50),
            "{:?}",
            meter.used()
        );
        measured(meter.clone(), async {
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_millis(100) {
                std::hint::black_box(0);
            }
        })
        .await;
        assert!(
            meter.used() >= Duration::from_millis(50),
            "{:?}",
            meter.used()
        );
    }
}
