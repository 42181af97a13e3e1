//! Blocked client addresses and the failures that lead to blocks, shared by
//! every node through Redis when it is configured (in-process otherwise).
//! Times come from the injected clock and are stored as values, so a test
//! can move through windows and blocks; Redis expiry only collects garbage.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use redis::{Script, aio::ConnectionManager};
use unhidra_core::clock::SharedClock;

use crate::redis::Redis;

/// Failures counted in a window, and blocks with an end.
#[async_trait::async_trait]
pub trait Blocklist: Send + Sync {
    /// Counts one failure for `key` and answers how many it has within
    /// `window` (the window starts at its first failure).
    async fn strike(&self, key: &str, window: Duration) -> u32;
    /// Blocks `key` for `duration` (a longer block already there stays).
    async fn block(&self, key: &str, duration: Duration);
    /// How long `key` stays blocked, if it is.
    async fn blocked(&self, key: &str) -> Option<Duration>;
    async fn unblock(&self, key: &str);
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Keys whose failures a node counts at most; beyond them (a failure spread
/// over this many addresses at once) new keys are not counted until old
/// windows end, so memory stays bounded.
const MAX_COUNTED_KEYS: usize = 100_000;
/// Between two sweeps of ended windows and blocks.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Blocks kept in this process.
pub struct LocalBlocklist {
    clock: SharedClock,
    /// Microseconds since the epoch of the last sweep.
    swept_at: AtomicU64,
    /// Key → (window end, failures).
    strikes: DashMap<String, (Duration, u32)>,
    /// Key → end of the block.
    blocks: DashMap<String, Duration>,
}

impl LocalBlocklist {
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            swept_at: AtomicU64::new(0),
            strikes: DashMap::new(),
            blocks: DashMap::new(),
        }
    }

    /// Forgets ended windows and blocks, at most once a second.
    fn sweep(&self, now: Duration) {
        let last = Duration::from_micros(self.swept_at.load(Ordering::Relaxed));
        if now < last + SWEEP_EVERY {
            return;
        }
        self.swept_at.store(micros(now), Ordering::Relaxed);
        self.strikes.retain(|_, (end, _)| *end > now);
        self.blocks.retain(|_, until| *until > now);
    }

    fn strike_now(&self, key: &str, window: Duration) -> u32 {
        let now = self.clock.now();
        if self.strikes.len() >= MAX_COUNTED_KEYS {
            self.sweep(now);
            if self.strikes.len() >= MAX_COUNTED_KEYS && !self.strikes.contains_key(key) {
                tracing::warn!("failure counts full: a failure from a new address is not counted");
                return 0;
            }
        }
        let mut entry = self
            .strikes
            .entry(key.to_owned())
            .or_insert((now + window, 0));
        if entry.0 <= now {
            *entry = (now + window, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1
    }

    fn block_now(&self, key: &str, duration: Duration) {
        self.sweep(self.clock.now());
        let until = self.clock.now() + duration;
        let mut entry = self.blocks.entry(key.to_owned()).or_insert(until);
        if *entry < until {
            *entry = until;
        }
    }

    fn blocked_now(&self, key: &str) -> Option<Duration> {
        let now = self.clock.now();
        let until = *self.blocks.get(key)?;
        if until > now {
            return Some(until - now);
        }
        self.blocks.remove_if(key, |_, until| *until <= now);
        None
    }
}

#[async_trait::async_trait]
impl Blocklist for LocalBlocklist {
    async fn strike(&self, key: &str, window: Duration) -> u32 {
        self.strike_now(key, window)
    }

    async fn block(&self, key: &str, duration: Duration) {
        self.block_now(key, duration);
    }

    async fn blocked(&self, key: &str) -> Option<Duration> {
        self.blocked_now(key)
    }

    async fn unblock(&self, key: &str) {
        self.blocks.remove(key);
    }
}

/// A failure count in a window: ARGV = now, window (microseconds). The key
/// holds "window end:count".
const STRIKE: &str = r"
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local held = redis.call('GET', KEYS[1])
local ends, count = now + window, 0
if held then
  local e, c = string.match(held, '^(%d+):(%d+)$')
  if e and tonumber(e) > now then ends, count = tonumber(e), tonumber(c) end
end
count = count + 1
redis.call('SET', KEYS[1], string.format('%.0f:%d', ends, count), 'PX', math.ceil((ends - now) / 1000) + 1)
return count
";

/// A block that only ever lengthens: ARGV = now, until (microseconds).
const BLOCK: &str = r"
local now = tonumber(ARGV[1])
local untill = tonumber(ARGV[2])
local held = tonumber(redis.call('GET', KEYS[1]))
if held and held > untill then untill = held end
redis.call('SET', KEYS[1], string.format('%.0f', untill), 'PX', math.ceil((untill - now) / 1000) + 1)
return 1
";

/// Blocks in Redis, shared by every node; while Redis is unreachable this
/// node's own blocks apply (and are kept, so none is forgotten).
pub struct RedisBlocklist {
    redis: Redis,
    strike: Script,
    block: Script,
    local: LocalBlocklist,
}

impl RedisBlocklist {
    /// Connects lazily, as [`crate::RedisLimiter::new`] does.
    pub fn connect(url: &str, prefix: &str, clock: SharedClock) -> anyhow::Result<Self> {
        Ok(Self::new(
            Redis::connect(url, prefix, Arc::clone(&clock))?,
            clock,
        ))
    }

    pub(crate) fn new(redis: Redis, clock: SharedClock) -> Self {
        Self {
            redis,
            strike: Script::new(STRIKE),
            block: Script::new(BLOCK),
            local: LocalBlocklist::new(clock),
        }
    }

    fn key(&self, kind: &str, key: &str) -> String {
        format!("{}:{kind}:{key}", self.redis.prefix())
    }

    fn now(&self) -> Duration {
        self.local.clock.now()
    }
}

#[async_trait::async_trait]
impl Blocklist for RedisBlocklist {
    async fn strike(&self, key: &str, window: Duration) -> u32 {
        let local = self.local.strike_now(key, window);
        let mut invocation = self.strike.key(self.key("strikes", key));
        invocation.arg(micros(self.now())).arg(micros(window));
        let shared = self
            .redis
            .run(|mut c: ConnectionManager| async move { invocation.invoke_async(&mut c).await })
            .await;
        shared.unwrap_or(local)
    }

    async fn block(&self, key: &str, duration: Duration) {
        self.local.block_now(key, duration);
        let now = self.now();
        let mut invocation = self.block.key(self.key("block", key));
        invocation.arg(micros(now)).arg(micros(now + duration));
        let _: Option<u8> = self
            .redis
            .run(|mut c: ConnectionManager| async move { invocation.invoke_async(&mut c).await })
            .await;
    }

    async fn blocked(&self, key: &str) -> Option<Duration> {
        let held: Option<Option<u64>> = self
            .redis
            .run(|mut c: ConnectionManager| {
                let key = self.key("block", key);
                async move { redis::cmd("GET").arg(key).query_async(&mut c).await }
            })
            .await;
        match held {
            Some(until) => {
                let now = self.now();
                until
                    .map(Duration::from_micros)
                    .filter(|until| *until > now)
                    .map(|until| until - now)
            }
            None => self.local.blocked_now(key),
        }
    }

    async fn unblock(&self, key: &str) {
        self.local.blocks.remove(key);
        let _: Option<u8> = self
            .redis
            .run(|mut c: ConnectionManager| {
                let key = self.key("block", key);
                async move { redis::cmd("DEL").arg(key).query_async(&mut c).await }
            })
            .await;
    }
}

/// The blocklist the configuration names, next to its limiter.
pub(crate) fn shared(redis: Option<Redis>, clock: SharedClock) -> Arc<dyn Blocklist> {
    match redis {
        Some(redis) => Arc::new(RedisBlocklist::new(redis, clock)),
        None => Arc::new(LocalBlocklist::new(clock)),
    }
}
