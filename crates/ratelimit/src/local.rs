//! In-process limits on governor's keyed GCRA, one keyed limiter per limit.

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
    Quota, clock, middleware::StateInformationMiddleware, state::keyed::DashMapStateStore,
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
            let interval = limit.interval().max(Duration::from_nanos(1));
            let quota = Quota::with_period(interval)
                .unwrap_or_else(|| Quota::per_second(limit.count))
                .allow_burst(limit.count);
            Arc::new(governor::RateLimiter::new(
                quota,
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
            return Decision {
                allowed: true,
                limit: limit.count(),
                remaining: limit.count(),
                reset_after: Duration::ZERO,
                retry_after: Duration::ZERO,
            };
        };
        let interval = limit.interval();
        let keyed = self.limiter(limit);
        match keyed.check_key_n(&key.to_owned(), cost) {
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
                let retry_after = not_until.wait_time_from(self.clock.now());
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
