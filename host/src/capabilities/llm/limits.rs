//! Admission to a provider or one of its models: at most `max_concurrent_requests` in flight,
//! requests and tokens per minute as token buckets, a pause and a slower rate after a 429, and
//! waiting requests served round-robin across jobs.
//!
//! Round-robin is why this is not a plain semaphore or `governor`: a 10,000-item job keeps
//! `concurrency` requests queued at all times, and a FIFO would put a one-item scan submitted
//! after it behind all of them. Here the scan waits for at most one grant per other waiting job.
//! Tokens are also settled after the answer (the estimate made before sending is replaced by the
//! usage the provider reports), which a fixed-cost limiter cannot do.
//!
//! One dispatcher task per gate grants requests in order; waiters only enqueue and await.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Limits of one gate; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub max_concurrent: Option<usize>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

/// How long until the first of `pauses` ends, when every one of them is paused; `None` as
/// soon as one is free (a key or provider that can take a request now).
pub fn all_paused(pauses: impl IntoIterator<Item = Option<Duration>>) -> Option<Duration> {
    pauses
        .into_iter()
        .try_fold(None, |shortest: Option<Duration>, pause| {
            pause.map(|p| Some(shortest.map_or(p, |s| s.min(p))))
        })
        .flatten()
}

/// A bucket holds this much of a minute's budget, so a quiet provider can take a short burst.
const BURST: Duration = Duration::from_secs(10);
/// A 429 without `Retry-After` pauses the gate this long.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// Each 429 halves the rate, down to this share of the configured rate...
const SLOWEST: f64 = 0.1;
/// ... and each success gives back this share, up to the configured rate.
const RECOVERY_STEP: f64 = 0.05;

/// Requests or tokens refilled continuously at `per_minute × speed`.
#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    capacity: f64,
    level: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        let per_second = f64::from(per_minute) / 60.0;
        let capacity = (per_second * BURST.as_secs_f64()).max(1.0);
        Self {
            per_second,
            capacity,
            level: capacity,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant, speed: f64) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second * speed).min(self.capacity);
        self.refilled = now;
    }

    /// How long until `cost` can be taken. A cost above the capacity is let through when the
    /// bucket is full (and leaves it in debt), or it could never pass.
    fn wait_for(&self, cost: f64, speed: f64) -> Duration {
        let needed = cost.min(self.capacity) - self.level;
        if needed <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(needed / (self.per_second * speed))
        }
    }

    fn take(&mut self, cost: f64) {
        self.level -= cost;
    }
}

/// What a request waits for in the queue of its job.
struct Waiter {
    tokens: u32,
    grant: oneshot::Sender<Grant>,
}

struct State {
    /// Waiting requests per job, and the jobs that have some, in serving order.
    queues: HashMap<String, VecDeque<Waiter>>,
    turn: VecDeque<String>,
    requests: Option<TokenBucket>,
    tokens: Option<TokenBucket>,
    paused_until: Option<Instant>,
    /// 1.0 at the configured rate; lowered by 429s.
    speed: f64,
}

struct Shared {
    state: Mutex<State>,
    /// A request arrived, or a waiter left.
    arrived: Notify,
    in_flight: Arc<Semaphore>,
}

/// The right to send one request. Dropping it frees the concurrency slot.
pub struct Grant {
    _permit: OwnedSemaphorePermit,
}

pub struct Gate {
    shared: Arc<Shared>,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    started: std::sync::Once,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        let now = Instant::now();
        let stop = CancellationToken::new();
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queues: HashMap::new(),
                    turn: VecDeque::new(),
                    requests: limits.requests_per_minute.map(|n| TokenBucket::new(n, now)),
                    tokens: limits.tokens_per_minute.map(|n| TokenBucket::new(n, now)),
                    paused_until: None,
                    speed: 1.0,
                }),
                arrived: Notify::new(),
                in_flight: Arc::new(Semaphore::new(
                    limits.max_concurrent.unwrap_or(Semaphore::MAX_PERMITS),
                )),
            }),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            started: std::sync::Once::new(),
        }
    }

    /// Wait for this job's turn. `tokens` is the request's estimated cost (see [`Gate::settle`]).
    pub async fn admit(&self, job: &str, tokens: u32) -> Grant {
        // The dispatcher starts with the first request, inside the runtime that serves it.
        self.started.call_once(|| {
            tokio::spawn(dispatch(self.shared.clone(), self.stop.clone()));
        });
        let (grant, granted) = oneshot::channel();
        {
            let mut state = self.shared.state.lock().expect("not poisoned");
            let queue = state.queues.entry(job.to_string()).or_default();
            if queue.is_empty() {
                state.turn.push_back(job.to_string());
            }
            state
                .queues
                .get_mut(job)
                .expect("just inserted")
                .push_back(Waiter { tokens, grant });
        }
        self.shared.arrived.notify_one();
        granted
            .await
            .expect("the dispatcher lives as long as the gate")
    }

    /// Replace a request's estimated token cost by what the provider reports it used.
    pub fn settle(&self, estimated: u32, used: u32) {
        let mut state = self.shared.state.lock().expect("not poisoned");
        if let Some(bucket) = &mut state.tokens {
            bucket.take(f64::from(used) - f64::from(estimated));
        }
        state.speed = (state.speed + RECOVERY_STEP).min(1.0);
    }

    /// The provider said 429: pause every request until `retry_after` has passed, and halve
    /// the rate until successes bring it back.
    pub fn rate_limited(&self, retry_after: Option<Duration>) {
        let until = Instant::now() + retry_after.unwrap_or(DEFAULT_PAUSE);
        let mut state = self.shared.state.lock().expect("not poisoned");
        state.paused_until = Some(state.paused_until.map_or(until, |p| p.max(until)));
        state.speed = (state.speed / 2.0).max(SLOWEST);
    }

    /// How long the provider asked us to wait, if that is not over.
    pub fn paused_for(&self) -> Option<Duration> {
        let until = self
            .shared
            .state
            .lock()
            .expect("not poisoned")
            .paused_until?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Share of the configured rate in use (1.0 unless 429s slowed it down).
    #[cfg(test)]
    pub fn speed(&self) -> f64 {
        self.shared.state.lock().expect("not poisoned").speed
    }
}

/// Grant waiting requests one at a time: a concurrency slot first, then the pause and the
/// buckets, then the next job in turn.
async fn dispatch(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = shared.in_flight.clone().acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
        };
        let mut grant = Grant { _permit: permit };
        loop {
            let wait = match next_ready(&shared) {
                Ready::Granted(sender) => match sender.send(grant) {
                    Ok(()) => break,
                    // The request was dropped while it waited (cancelled): next one.
                    Err(returned) => {
                        grant = returned;
                        continue;
                    }
                },
                Ready::After(wait) => Some(wait),
                Ready::Empty => None,
            };
            let arrived = shared.arrived.notified();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = arrived => {}
                _ = sleep_for(wait) => {}
            }
        }
    }
}

enum Ready {
    Granted(oneshot::Sender<Grant>),
    After(Duration),
    Empty,
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Take the next job's first live request if the pause and the buckets allow it now.
fn next_ready(shared: &Shared) -> Ready {
    let mut guard = shared.state.lock().expect("not poisoned");
    let state = &mut *guard;
    let now = Instant::now();
    // Requests dropped while waiting leave without a turn.
    while let Some(job) = state.turn.front() {
        let queue = state
            .queues
            .get_mut(job)
            .expect("a job in turn has a queue");
        while queue.front().is_some_and(|w| w.grant.is_closed()) {
            queue.pop_front();
        }
        if !queue.is_empty() {
            break;
        }
        let job = state.turn.pop_front().expect("front exists");
        state.queues.remove(&job);
    }
    let Some(job) = state.turn.front().cloned() else {
        return Ready::Empty;
    };
    if let Some(until) = state.paused_until {
        if until > now {
            return Ready::After(until - now);
        }
        state.paused_until = None;
    }
    let tokens = f64::from(state.queues[&job].front().expect("not empty").tokens);
    let speed = state.speed;
    let mut wait = Duration::ZERO;
    for (bucket, cost) in [(&mut state.requests, 1.0), (&mut state.tokens, tokens)] {
        if let Some(bucket) = bucket {
            bucket.refill(now, speed);
            wait = wait.max(bucket.wait_for(cost, speed));
        }
    }
    if !wait.is_zero() {
        return Ready::After(wait);
    }
    if let Some(bucket) = &mut state.requests {
        bucket.take(1.0);
    }
    if let Some(bucket) = &mut state.tokens {
        bucket.take(tokens);
    }
    let queue = state.queues.get_mut(&job).expect("in turn");
    let waiter = queue.pop_front().expect("not empty");
    // This job goes to the back of the line, if it has more to send.
    state.turn.pop_front();
    if queue.is_empty() {
        state.queues.remove(&job);
    } else {
        state.turn.push_back(job);
    }
    Ready::Granted(waiter.grant)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Order in which `(job, n)` requests are granted, given a concurrency of one and requests
    /// that finish as soon as they are granted.
    async fn grant_order(gate: Arc<Gate>, requests: Vec<(&'static str, u32)>) -> Vec<String> {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (job, n) in requests {
            for i in 0..n {
                let (gate, order) = (gate.clone(), order.clone());
                tasks.push(tokio::spawn(async move {
                    let _grant = gate.admit(job, 1).await;
                    order.lock().unwrap().push(format!("{job}{i}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }));
                // Enqueue in a known order.
                tokio::task::yield_now().await;
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(order).unwrap().into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_small_job_is_served_next_not_last() {
        let gate = Arc::new(Gate::new(Limits {
            max_concurrent: Some(1),
            ..Limits::default()
        }));
        let order = grant_order(gate, vec![("big", 50), ("scan", 1)]).await;
        let position = order.iter().position(|r| r == "scan0").unwrap();
        assert!(
            position <= 2,
            "the scan was granted at {position}: {order:?}"
        );
        // The big job's own requests keep their order.
        let big: Vec<_> = order.iter().filter(|r| r.starts_with("big")).collect();
        assert_eq!(big.first().unwrap().as_str(), "big0");
        assert_eq!(big.last().unwrap().as_str(), "big49");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_are_a_token_bucket() {
        // 60 a minute: a burst of 10, then one a second.
        let gate = Gate::new(Limits {
            requests_per_minute: Some(60),
            ..Limits::default()
        });
        let start = Instant::now();
        for _ in 0..10 {
            drop(gate.admit("j", 0).await);
        }
        assert!(
            start.elapsed() < Duration::from_millis(10),
            "the burst waited"
        );
        for _ in 0..5 {
            drop(gate.admit("j", 0).await);
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!((4.9..5.2).contains(&elapsed), "5 more took {elapsed} s");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_settled_after_the_answer() {
        // 600 tokens a minute = 10 a second, bucket of 100.
        let gate = Gate::new(Limits {
            tokens_per_minute: Some(600),
            ..Limits::default()
        });
        let start = Instant::now();
        drop(gate.admit("j", 50).await);
        // It used 150, not the 50 estimated: the bucket is 50 in debt.
        gate.settle(50, 150);
        drop(gate.admit("j", 50).await);
        let elapsed = start.elapsed().as_secs_f64();
        assert!((9.9..10.2).contains(&elapsed), "waited {elapsed} s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_and_slows_the_gate() {
        let gate = Gate::new(Limits {
            requests_per_minute: Some(600),
            ..Limits::default()
        });
        let start = Instant::now();
        drop(gate.admit("j", 0).await);
        gate.rate_limited(Some(Duration::from_secs(2)));
        assert_eq!(gate.speed(), 0.5);
        assert!(gate.paused_for().is_some());
        drop(gate.admit("j", 0).await);
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "the pause was not honoured"
        );
        gate.settle(0, 0);
        assert!((gate.speed() - 0.55).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_does_not_take_a_slot() {
        let gate = Arc::new(Gate::new(Limits {
            max_concurrent: Some(1),
            ..Limits::default()
        }));
        let first = gate.admit("a", 0).await;
        let waiting = {
            let gate = gate.clone();
            tokio::spawn(async move { drop(gate.admit("b", 0).await) })
        };
        tokio::task::yield_now().await;
        waiting.abort();
        drop(first);
        // If the aborted waiter had been granted the slot, this would hang.
        tokio::time::timeout(Duration::from_secs(1), gate.admit("c", 0))
            .await
            .expect("the slot went to a dropped request");
    }
}

#[cfg(test)]
mod all_paused_tests {
    use super::*;

    #[test]
    fn paused_only_when_every_one_is() {
        let s = Duration::from_secs;
        assert_eq!(all_paused([Some(s(3)), Some(s(1))]), Some(s(1)));
        assert_eq!(all_paused([Some(s(3)), None]), None);
        assert_eq!(all_paused(std::iter::empty()), None);
    }
}
