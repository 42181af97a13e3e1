//! Limits shared by every node through Redis: GCRA in one Lua script (read,
//! decide and write atomically; keys expire when their allowance is whole
//! again), behind a local tier that answers without a round trip when the
//! answer is already known, and that decides alone while Redis is down.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use dashmap::DashMap;
use redis::{
    Client, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use unhidra_core::clock::SharedClock;

use crate::{Backend, Decision, Limit, LocalLimiter, RateLimiter};

/// GCRA over a key holding the theoretical arrival time, all in
/// microseconds: ARGV = now, emission interval, burst, cost. Answers
/// {allowed, remaining, reset_after, retry_after}.
const GCRA: &str = r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local tau = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - tau
if allow_at > now then
  return {0, math.floor((now + tau - tat) / interval), tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now + tau - new_tat) / interval), new_tat - now, 0}
";

/// Longest wait for Redis before the local tier decides alone.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, Redis is left alone this long before it is tried again,
/// so an outage costs no request a timeout.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Remembered refusals beyond which expired ones are swept.
const MAX_REMEMBERED_REFUSALS: usize = 10_000;

/// Limits in Redis, under a key prefix, with a local tier in front.
pub struct RedisLimiter {
    redis: ConnectionManager,
    script: Script,
    prefix: String,
    clock: SharedClock,
    /// Same limits, this node's traffic only: a key it refuses is refused
    /// everywhere, and while Redis is unreachable it decides.
    local: LocalLimiter,
    /// Refusals Redis gave, until they lapse: a flood on one key is refused
    /// here instead of costing a round trip each.
    refused_until: DashMap<String, Duration>,
    /// Microseconds since the epoch before which Redis is not asked.
    quiet_until: AtomicU64,
    unreachable: AtomicBool,
}

impl RedisLimiter {
    /// Connects lazily: a Redis that is down at start-up leaves the limiter
    /// in fallback until it answers.
    pub fn new(url: &str, prefix: &str, clock: SharedClock) -> anyhow::Result<Self> {
        let client = Client::open(url).map_err(|e| anyhow::anyhow!("redis_url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let redis = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            redis,
            script: Script::new(GCRA),
            prefix: prefix.to_owned(),
            local: LocalLimiter::new(std::sync::Arc::clone(&clock)),
            clock,
            refused_until: DashMap::new(),
            quiet_until: AtomicU64::new(0),
            unreachable: AtomicBool::new(false),
        })
    }

    async fn ask(
        &self,
        limit: &Limit,
        key: &str,
        cost: u32,
        now: Duration,
    ) -> anyhow::Result<Decision> {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut redis = self.redis.clone();
        let mut invocation = self.script.key(self.key(limit, key));
        invocation
            .arg(micros(now))
            .arg(micros(limit.interval()).max(1))
            .arg(limit.count())
            .arg(cost);
        let answer = tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut redis));
        let (allowed, remaining, reset_after, retry_after): (u8, u32, u64, u64) =
            answer
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {REDIS_TIMEOUT:?}"))??;
        Ok(Decision {
            allowed: allowed == 1,
            limit: limit.count(),
            remaining: remaining.min(limit.count()),
            reset_after: Duration::from_micros(reset_after),
            retry_after: Duration::from_micros(retry_after),
        })
    }

    fn key(&self, limit: &Limit, key: &str) -> String {
        format!("{}:rl:{}:{}", self.prefix, limit.name(), key)
    }

    fn remember_refusal(&self, remembered: String, until: Duration, now: Duration) {
        if self.refused_until.len() >= MAX_REMEMBERED_REFUSALS {
            self.refused_until.retain(|_, until| *until > now);
        }
        self.refused_until.insert(remembered, until);
    }

    fn failed(&self, error: &anyhow::Error, now: Duration) {
        let quiet = u64::try_from((now + RETRY_AFTER_FAILURE).as_micros()).unwrap_or(u64::MAX);
        self.quiet_until.store(quiet, Ordering::Relaxed);
        if !self.unreachable.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %error, "Redis unreachable: rate limits fall back to this node's own");
        }
    }

    fn answered(&self) {
        if self.unreachable.swap(false, Ordering::Relaxed) {
            tracing::info!("Redis answers again: rate limits are shared again");
        }
    }
}

#[async_trait::async_trait]
impl RateLimiter for RedisLimiter {
    async fn check(&self, limit: &Limit, key: &str, cost: u32) -> Decision {
        if cost > limit.count() {
            return limit.never();
        }
        let now = self.clock.now();
        let remembered = format!("{}\0{key}", limit.name());
        if let Some(until) = self.refused_until.get(&remembered).map(|u| *u) {
            if until > now {
                return Decision {
                    allowed: false,
                    limit: limit.count(),
                    remaining: 0,
                    reset_after: until - now,
                    retry_after: until - now,
                };
            }
            self.refused_until.remove(&remembered);
        }
        let local = self.local.decide(limit, key, cost);
        if !local.allowed {
            return local;
        }
        let quiet_until = Duration::from_micros(self.quiet_until.load(Ordering::Relaxed));
        if now < quiet_until {
            return local;
        }
        match self.ask(limit, key, cost, now).await {
            Ok(decision) => {
                self.answered();
                if !decision.allowed {
                    self.remember_refusal(remembered, now + decision.retry_after, now);
                }
                decision
            }
            Err(e) => {
                self.failed(&e, now);
                local
            }
        }
    }

    fn backend(&self) -> Backend {
        if self.unreachable.load(Ordering::Relaxed) {
            Backend::Fallback
        } else {
            Backend::Shared
        }
    }
}
