//! Rate limits: one [`RateLimiter`] trait with two implementations, chosen in
//! one place ([`from_config`]) by `UNHIDRA_REDIS_URL`. [`LocalLimiter`] keeps
//! the state in-process (governor's GCRA); [`RedisLimiter`] shares it between
//! every node through one atomic Lua script, with a local tier in front that
//! refuses hot keys without a round trip and takes over, with the same
//! limits, while Redis is unreachable.

mod blocks;
mod local;
mod redis;

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use unhidra_core::{Config, clock::SharedClock, rate::Rate};

pub use crate::{
    blocks::{Blocklist, LocalBlocklist, RedisBlocklist},
    local::{Bucket, LocalLimiter},
    redis::{RedisLimiter, connection as redis_connection},
};

/// A named limit: at most `count` units per `period`, in bursts of up to
/// `count`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Limit {
    name: &'static str,
    count: NonZeroU32,
    period: Duration,
}

impl Limit {
    /// The limit `name` at `rate`; `None` when the rate is `off`.
    pub fn new(name: &'static str, rate: Rate) -> Option<Self> {
        match rate {
            Rate::Off => None,
            Rate::Every { count, period } => Some(Self {
                name,
                count,
                period,
            }),
        }
    }

    /// Names the limit in metrics, logs and keys (`login_ip`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Units allowed per period (`X-RateLimit-Limit`).
    pub fn count(&self) -> u32 {
        self.count.get()
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// The time one unit takes to come back.
    fn interval(&self) -> Duration {
        self.period / self.count.get()
    }

    /// A refusal for a cost the limit can never allow at once.
    fn never(&self) -> Decision {
        Decision {
            allowed: false,
            limit: self.count(),
            remaining: 0,
            reset_after: self.period,
            retry_after: self.period,
        }
    }
}

/// The answer to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The limit's count.
    pub limit: u32,
    /// Units still allowed right now.
    pub remaining: u32,
    /// Until the limit is whole again.
    pub reset_after: Duration,
    /// Until a refused unit would be allowed; zero when allowed.
    pub retry_after: Duration,
}

/// Where the limiter keeps its state right now (readiness and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In this process: the embedded default.
    Local,
    /// In Redis, shared by every node.
    Shared,
    /// Redis is configured but unreachable: local limits apply meanwhile.
    Fallback,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Shared => "redis",
            Self::Fallback => "fallback_local",
        }
    }
}

/// Counts units against limits per key (an IP, a user, an email).
#[async_trait::async_trait]
pub trait RateLimiter: Send + Sync {
    /// Takes `cost` units from `key`'s allowance under `limit`, if it has
    /// them; a refused check takes nothing.
    async fn check(&self, limit: &Limit, key: &str, cost: u32) -> Decision;

    fn backend(&self) -> Backend;
}

/// The limiter and blocklist the configuration names: in Redis under
/// `prefix` (one connection for both) when `redis_url` is set, in-process
/// otherwise.
pub struct Backends {
    pub limiter: Arc<dyn RateLimiter>,
    pub blocklist: Arc<dyn Blocklist>,
}

pub fn from_config(config: &Config, prefix: &str, clock: SharedClock) -> anyhow::Result<Backends> {
    let redis = match &config.redis_url {
        Some(url) => Some(redis::Redis::connect(
            url.expose_secret(),
            prefix,
            Arc::clone(&clock),
        )?),
        None => None,
    };
    let limiter: Arc<dyn RateLimiter> = match &redis {
        Some(redis) => Arc::new(RedisLimiter::on(redis.clone(), Arc::clone(&clock))),
        None => Arc::new(LocalLimiter::new(Arc::clone(&clock))),
    };
    Ok(Backends {
        limiter,
        blocklist: blocks::shared(redis, clock),
    })
}
