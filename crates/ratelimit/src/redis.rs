//! Limits shared by every node through Redis: GCRA in one Lua script (read,
//! decide and write atomically; keys expire when their allowance is whole
//! again), behind a local tier that answers without a round trip when the
//! answer is already known, and that decides alone while Redis is down.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use redis::{
    Client, RedisResult, Script,
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

/// One Redis connection under a key prefix, shared by the limiter and the
/// blocklist, with the outage handling both need: a bounded wait, then a
/// quiet second before Redis is asked again, logged once per outage.
#[derive(Clone)]
pub(crate) struct Redis {
    inner: Arc<RedisInner>,
}

struct RedisInner {
    manager: ConnectionManager,
    prefix: String,
    clock: SharedClock,
    /// Microseconds since the epoch before which Redis is not asked.
    quiet_until: AtomicU64,
    unreachable: AtomicBool,
}

/// A connection to the Redis at `url`, made when first used (a Redis that is
/// down at start-up does not stop the process) and remade after a failure;
/// a command waits at most `timeout` for it.
pub fn connection(url: &str, timeout: Duration) -> anyhow::Result<ConnectionManager> {
    let client = Client::open(url).map_err(|e| anyhow::anyhow!("redis_url: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

impl Redis {
    /// Connects lazily: a Redis that is down at start-up leaves its users
    /// on local state until it answers.
    pub(crate) fn connect(url: &str, prefix: &str, clock: SharedClock) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Arc::new(RedisInner {
                manager: connection(url, REDIS_TIMEOUT)?,
                prefix: prefix.to_owned(),
                clock,
                quiet_until: AtomicU64::new(0),
                unreachable: AtomicBool::new(false),
            }),
        })
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Runs `command` on Redis; `None` when Redis is unreachable (now, or
    /// within the last second).
    pub(crate) async fn run<T, F, Fut>(&self, command: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let inner = &self.inner;
        let now = inner.clock.now();
        if now < Duration::from_micros(inner.quiet_until.load(Ordering::Relaxed)) {
            return None;
        }
        match tokio::time::timeout(REDIS_TIMEOUT, command(inner.manager.clone())).await {
            Ok(Ok(answer)) => {
                if inner.unreachable.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis answers again: limits and blocks are shared again");
                }
                Some(answer)
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {REDIS_TIMEOUT:?}"),
                };
                let quiet = now + RETRY_AFTER_FAILURE;
                inner.quiet_until.store(
                    u64::try_from(quiet.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                if !inner.unreachable.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "Redis unreachable: this node applies its own limits and blocks");
                }
                None
            }
        }
    }

    pub(crate) fn reachable(&self) -> bool {
        !self.inner.unreachable.load(Ordering::Relaxed)
    }
}

/// Limits in Redis, under a key prefix, with a local tier in front.
pub struct RedisLimiter {
    redis: Redis,
    script: Script,
    clock: SharedClock,
    /// Same limits, this node's traffic only: a key it refuses is refused
    /// everywhere, and while Redis is unreachable it decides.
    local: LocalLimiter,
    /// Refusals Redis gave, until they lapse: a flood on one key is refused
    /// here instead of costing a round trip each.
    refused_until: DashMap<String, Duration>,
}

impl RedisLimiter {
    /// Connects lazily: a Redis that is down at start-up leaves the limiter
    /// in fallback until it answers.
    pub fn new(url: &str, prefix: &str, clock: SharedClock) -> anyhow::Result<Self> {
        Ok(Self::on(
            Redis::connect(url, prefix, Arc::clone(&clock))?,
            clock,
        ))
    }

    pub(crate) fn on(redis: Redis, clock: SharedClock) -> Self {
        Self {
            redis,
            script: Script::new(GCRA),
            local: LocalLimiter::new(Arc::clone(&clock)),
            clock,
            refused_until: DashMap::new(),
        }
    }

    async fn ask(&self, limit: &Limit, key: &str, cost: u32, now: Duration) -> Option<Decision> {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut invocation = self.script.key(self.key(limit, key));
        invocation
            .arg(micros(now))
            .arg(micros(limit.interval()).max(1))
            .arg(limit.count())
            .arg(cost);
        let (allowed, remaining, reset_after, retry_after): (u8, u32, u64, u64) = self
            .redis
            .run(|mut c: ConnectionManager| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Some(Decision {
            allowed: allowed == 1,
            limit: limit.count(),
            remaining: remaining.min(limit.count()),
            reset_after: Duration::from_micros(reset_after),
            retry_after: Duration::from_micros(retry_after),
        })
    }

    fn key(&self, limit: &Limit, key: &str) -> String {
        format!("{}:rl:{}:{}", self.redis.prefix(), limit.name(), key)
    }

    /// Remembers a refusal, while there is room: lapsed ones are swept when
    /// the map is full, and beyond that Redis is simply asked again.
    fn remember_refusal(&self, remembered: String, until: Duration, now: Duration) {
        if self.refused_until.len() >= MAX_REMEMBERED_REFUSALS {
            self.refused_until.retain(|_, until| *until > now);
            if self.refused_until.len() >= MAX_REMEMBERED_REFUSALS {
                return;
            }
        }
        self.refused_until.insert(remembered, until);
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
        match self.ask(limit, key, cost, now).await {
            Some(decision) => {
                if !decision.allowed {
                    self.remember_refusal(remembered, now + decision.retry_after, now);
                }
                decision
            }
            None => local,
        }
    }

    fn backend(&self) -> Backend {
        if self.redis.reachable() {
            Backend::Shared
        } else {
            Backend::Fallback
        }
    }
}
