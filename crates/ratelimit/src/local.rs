//! In-process limits on governor's GCRA: keyed, one keyed limiter per
//! limit ([`LocalLimiter`]), or for a single owner such as one connection
//! ([`Bucket`]).

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use governor::{
    InsufficientCapacity, NotUntil, Quota, clock,
    middleware::{StateInformationMiddleware, StateSnapshot},
    state::{InMemoryState, NotKeyed, keyed::DashMapStateStore},
};
use unhidra_core::clock::SharedClock;

use crate::{Backend, Decision, Limit, RateLimiter};

/// Checks between two sweeps of keys whose allowance is whole again.
const SWEEP_EVERY: u64 = 4096;

/// governor's view of the injected clock.
#[derive(Debug, Clone)]
struct Clock(SharedClock);

impl clock::Clock for Clock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.now()
    }
}

type Keyed =
    governor::RateLimiter<String, DashMapStateStore<String>, Clock, StateInformationMiddleware>;
type Direct = governor::RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

fn quota(limit: &Limit) -> Quota {
    let interval = limit.interval().max(Duration::from_nanos(1));
    Quota::with_period(interval)
        .unwrap_or_else(|| Quota::per_second(limit.count))
        .allow_burst(limit.count)
}

type Outcome = Result<Result<StateSnapshot, NotUntil<Duration>>, InsufficientCapacity>;

/// governor's answer as a [`Decision`].
fn decision(limit: &Limit, cost: NonZeroU32, outcome: Outcome, now: Duration) -> Decision {
    let interval = limit.interval();
    match outcome {
        Ok(Ok(state)) => {
            let remaining = state.remaining_burst_capacity().min(limit.count());
            Decision {
                allowed: true,
                limit: limit.count(),
                remaining,
                reset_after: interval * (limit.count() - remaining),
                retry_after: Duration::ZERO,
            }
        }
        Ok(Err(not_until)) => {
            let retry_after = not_until.wait_time_from(now);
            Decision {
                allowed: false,
                limit: limit.count(),
                remaining: 0,
                reset_after: retry_after + interval * limit.count().saturating_sub(cost.get()),
                retry_after,
            }
        }
        Err(_) => limit.never(),
    }
}

fn free(limit: &Limit) -> Decision {
    Decision {
        allowed: true,
        limit: limit.count(),
        remaining: limit.count(),
        reset_after: Duration::ZERO,
        retry_after: Duration::ZERO,
    }
}

/// One owner's allowance under one limit (a connection's frames per
/// second): nothing shared, a few dozen bytes.
pub struct Bucket {
    limit: Limit,
    clock: SharedClock,
    limiter: Direct,
}

impl Bucket {
    pub fn new(limit: Limit, clock: SharedClock) -> Self {
        let limiter = governor::RateLimiter::new(
            quota(&limit),
            InMemoryState::default(),
            Clock(Arc::clone(&clock)),
        );
        Self {
            limit,
            clock,
            limiter,
        }
    }

    /// Takes `cost` units if the bucket holds them; a refusal takes nothing.
    pub fn take(&self, cost: u32) -> Decision {
        let Some(cost) = NonZeroU32::new(cost) else {
            return free(&self.limit);
        };
        let outcome = self.limiter.check_n(cost);
        decision(&self.limit, cost, outcome, self.clock.now())
    }

    pub fn limit(&self) -> &Limit {
        &self.limit
    }
}

/// Limits kept in this process only.
pub struct LocalLimiter {
    clock: SharedClock,
    limiters: DashMap<Limit, Arc<Keyed>>,
    checks: AtomicU64,
}

impl LocalLimiter {
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            limiters: DashMap::new(),
            checks: AtomicU64::new(0),
        }
    }

    fn limiter(&self, limit: &Limit) -> Arc<Keyed> {
        if let Some(keyed) = self.limiters.get(limit) {
            return Arc::clone(&keyed);
        }
        let entry = self.limiters.entry(limit.clone()).or_insert_with(|| {
            Arc::new(governor::RateLimiter::new(
                quota(limit),
                DashMapStateStore::default(),
                Clock(Arc::clone(&self.clock)),
            ))
        });
        Arc::clone(&entry)
    }

    /// Forgets keys whose allowance is whole again, so that many one-off
    /// keys (IPs of a scan) do not grow memory.
    fn sweep(&self) {
        for keyed in self.limiters.iter() {
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
    }

    /// The decision, without the async trait around it (the Redis limiter's
    /// local tier calls it too).
    pub fn decide(&self, limit: &Limit, key: &str, cost: u32) -> Decision {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let Some(cost) = NonZeroU32::new(cost) else {
            return free(limit);
        };
        let outcome = self.limiter(limit).check_key_n(&key.to_owned(), cost);
        decision(limit, cost, outcome, self.clock.now())
    }
}

#[async_trait::async_trait]
impl RateLimiter for LocalLimiter {
    async fn check(&self, limit: &Limit, key: &str, cost: u32) -> Decision {
        self.decide(limit, key, cost)
    }

    fn backend(&self) -> Backend {
        Backend::Local
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use unhidra_core::{clock::ManualClock, rate::Rate};

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_over_time() {
        let clock = Arc::new(ManualClock::starting_at(Duration::from_secs(1_000)));
        let count = NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN);
        let limit = Limit::new("ws_frames", Rate::per_second(count));
        let Some(limit) = limit else { return };
        let bucket = Bucket::new(limit, Arc::clone(&clock) as SharedClock);
        for _ in 0..10 {
            assert!(bucket.take(1).allowed);
        }
        let refused = bucket.take(1);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        clock.advance(Duration::from_millis(250));
        assert!(bucket.take(2).allowed, "two frames back after 250 ms");
        assert!(!bucket.take(1).allowed);
    }
}
