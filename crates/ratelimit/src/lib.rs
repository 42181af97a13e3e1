//! Rate limits: one [`RateLimiter`] trait with two implementations, chosen in
//! one place ([`from_config`]) by `UNHIDRA_REDIS_URL`. [`LocalLimiter`] keeps
//! the state in-process (governor's GCRA); [`RedisLimiter`] shares it between
//! every node through one atomic Lua script, with a local tier in front that
//! refuses hot keys without a round trip and takes over, with the same
//! limits, while Redis is unreachable.

mod local;
mod redis;

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use unhidra_core::{Config, clock::SharedClock, rate::Rate};

pub use crate::{
    local::{Bucket, LocalLimiter},
    redis::RedisLimiter,
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

/// The limiter the configuration names: Redis under `prefix` when
/// `redis_url` is set, in-process otherwise.
pub fn from_config(
    config: &Config,
    prefix: &str,
    clock: SharedClock,
) -> anyhow::Result<Arc<dyn RateLimiter>> {
    Ok(match &config.redis_url {
        Some(url) => Arc::new(RedisLimiter::new(url.expose_secret(), prefix, clock)?),
        None => Arc::new(LocalLimiter::new(clock)),
    })
}
