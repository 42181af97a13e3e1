//! Where the gateways learn whom the others hold. In memory by default: each
//! gateway beats its list on the bus (`presence.beats`) and keeps the
//! others' lists. In Redis when `UNHIDRA_REDIS_URL` is set: each gateway's
//! list is a set that expires unless the next beat renews it, so a gateway
//! that starts knows at once who is online anywhere, and a gateway that dies
//! without a word drops out when its set expires.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use redis::{AsyncCommands, aio::ConnectionManager};
use secrecy::ExposeSecret;
use tokio::time::Instant;
use unhidra_bus::Message;
use unhidra_core::{
    events::{PresenceBeat, SCHEMA_VERSION},
    ids::UserId,
};
use unhidra_runtime::ServiceContext;

use crate::registry::lock;

use super::DEAD_AFTER;

/// Longest wait for Redis before a beat is skipped.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

pub enum Roster {
    Bus {
        subject: String,
        /// The others' latest lists, by gateway, and when they came.
        heard: Mutex<HashMap<String, (Instant, HashSet<UserId>)>>,
    },
    Redis(RedisRoster),
}

pub struct RedisRoster {
    manager: ConnectionManager,
    /// Sorted set of the gateways, scored by when their list expires (Unix
    /// milliseconds).
    gateways_key: String,
    /// Each gateway's list is the set `<list_prefix><gateway id>`.
    list_prefix: String,
    unreachable: AtomicBool,
}

impl Roster {
    /// Redis when the configuration names it, else the bus.
    pub fn from_context(ctx: &ServiceContext) -> anyhow::Result<Self> {
        let Some(url) = &ctx.config.redis_url else {
            return Ok(Self::Bus {
                subject: ctx.subjects.presence_beats(),
                heard: Mutex::new(HashMap::new()),
            });
        };
        let prefix = &ctx.config.bus_prefix;
        Ok(Self::Redis(RedisRoster {
            manager: unhidra_ratelimit::redis_connection(url.expose_secret(), REDIS_TIMEOUT)?,
            gateways_key: format!("{prefix}:presence:gateways"),
            list_prefix: format!("{prefix}:presence:gateway:"),
            unreachable: AtomicBool::new(false),
        }))
    }

    /// The other gateways' beats, when they come over the bus.
    pub async fn listen(&self, ctx: &ServiceContext) -> anyhow::Result<Option<Beats>> {
        match self {
            Self::Bus { subject, .. } => Ok(Some(ctx.bus.subscribe(subject).await?)),
            Self::Redis(_) => Ok(None),
        }
    }

    /// Keeps another gateway's beat.
    pub fn heard(&self, own: &str, message: &Message) {
        let Self::Bus { heard, .. } = self else {
            return;
        };
        let beat = match serde_json::from_slice::<PresenceBeat>(&message.payload) {
            Ok(beat) => beat,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable presence beat");
                return;
            }
        };
        if beat.gateway == own {
            return;
        }
        let mut heard = lock(heard);
        if beat.leaving {
            heard.remove(&beat.gateway);
        } else {
            heard.insert(
                beat.gateway,
                (Instant::now(), beat.users.into_iter().collect()),
            );
        }
    }

    /// Says that gateway `own` holds `users`, and answers whom every other
    /// live gateway holds; `None` when that cannot be known now (Redis
    /// unreachable), so nobody is presumed gone for it.
    pub async fn beat(
        &self,
        ctx: &ServiceContext,
        own: &str,
        users: Vec<UserId>,
    ) -> Option<HashSet<UserId>> {
        match self {
            Self::Bus { subject, heard } => {
                let beat = PresenceBeat {
                    v: SCHEMA_VERSION,
                    gateway: own.to_owned(),
                    users,
                    leaving: false,
                };
                if let Err(e) = ctx.announce(subject, &beat).await {
                    tracing::warn!(error = %e, "presence beat not sent");
                }
                let now = Instant::now();
                let mut heard = lock(heard);
                heard.retain(|_, (at, _)| now.duration_since(*at) < DEAD_AFTER);
                Some(
                    heard
                        .values()
                        .flat_map(|(_, users)| users)
                        .copied()
                        .collect(),
                )
            }
            Self::Redis(redis) => {
                let answer = within(redis.beat(ctx.clock.now_millis(), own, users)).await;
                redis.outcome(answer)
            }
        }
    }

    /// Says that gateway `own` holds nobody any more.
    pub async fn leave(&self, ctx: &ServiceContext, own: &str) {
        let left = match self {
            Self::Bus { subject, .. } => {
                let goodbye = PresenceBeat {
                    v: SCHEMA_VERSION,
                    gateway: own.to_owned(),
                    users: Vec::new(),
                    leaving: true,
                };
                ctx.announce(subject, &goodbye).await
            }
            Self::Redis(redis) => within(redis.leave(own)).await,
        };
        if let Err(e) = left {
            tracing::debug!(error = %e, "presence goodbye not said");
        }
    }
}

/// The other gateways' beats.
pub type Beats = unhidra_bus::Subscription;

impl RedisRoster {
    fn list_key(&self, gateway: &str) -> String {
        format!("{}{gateway}", self.list_prefix)
    }

    /// Replaces this gateway's list (expiring after [`DEAD_AFTER`]), drops
    /// the gateways whose lists expired, and reads the others' lists.
    async fn beat(
        &self,
        now_millis: i64,
        own: &str,
        users: Vec<UserId>,
    ) -> anyhow::Result<HashSet<UserId>> {
        let dead_after = i64::try_from(DEAD_AFTER.as_millis()).unwrap_or(i64::MAX);
        let own_key = self.list_key(own);
        let mut manager = self.manager.clone();
        let mut write = redis::pipe();
        write.atomic().del(&own_key).ignore();
        if !users.is_empty() {
            let users: Vec<String> = users.iter().map(ToString::to_string).collect();
            write
                .sadd(&own_key, users)
                .ignore()
                .pexpire(&own_key, dead_after)
                .ignore();
        }
        write
            .zadd(&self.gateways_key, own, now_millis + dead_after)
            .ignore()
            .zrembyscore(&self.gateways_key, "-inf", now_millis)
            .ignore()
            .zrange(&self.gateways_key, 0, -1);
        let (gateways,): (Vec<String>,) = write.query_async(&mut manager).await?;
        let others: Vec<String> = gateways
            .iter()
            .filter(|gateway| *gateway != own)
            .map(|gateway| self.list_key(gateway))
            .collect();
        if others.is_empty() {
            return Ok(HashSet::new());
        }
        let online: Vec<String> = manager.sunion(others).await?;
        Ok(online
            .iter()
            .filter_map(|user| match user.parse() {
                Ok(user) => Some(user),
                Err(_) => {
                    tracing::warn!(%user, "not a user id in a presence list");
                    None
                }
            })
            .collect())
    }

    async fn leave(&self, own: &str) -> anyhow::Result<()> {
        let mut manager = self.manager.clone();
        redis::pipe()
            .atomic()
            .del(self.list_key(own))
            .ignore()
            .zrem(&self.gateways_key, own)
            .ignore()
            .query_async::<()>(&mut manager)
            .await?;
        Ok(())
    }

    /// Logs an outage once, and its end.
    fn outcome(&self, answer: anyhow::Result<HashSet<UserId>>) -> Option<HashSet<UserId>> {
        match answer {
            Ok(online) => {
                if self.unreachable.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis answers again: presence is shared again");
                }
                Some(online)
            }
            Err(e) => {
                if !self.unreachable.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "Redis unreachable: presence held as it was until it answers");
                }
                None
            }
        }
    }
}

/// `work`, or an error if Redis has not answered within [`REDIS_TIMEOUT`].
async fn within<T>(work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(REDIS_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {REDIS_TIMEOUT:?}")))
}

/// The next beat of `beats`; never, without them.
pub async fn next_beat(beats: &mut Option<Beats>) -> Option<Message> {
    match beats {
        Some(beats) => beats.next().await,
        None => std::future::pending().await,
    }
}
