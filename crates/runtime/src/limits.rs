//! Rate limits and address blocks at the HTTP edge: the process's [`Limits`]
//! (the configured limiter and blocklist, counted in `/metrics`), the edge
//! middleware that resolves the client address, refuses blocked addresses
//! and applies the per-IP budget to every API route (the WebSocket handshake
//! included), and [`Throttle`], with which handlers apply their own limits
//! (login per IP, per account). Every limited route answers `X-RateLimit-Limit`,
//! `-Remaining` and `-Reset` for the tightest limit it applied; a refusal is
//! `429` with `Retry-After`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, FromRef, FromRequestParts, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, header::RETRY_AFTER, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use ipnet::IpNet;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use unhidra_core::{Config, clock::SharedClock};
use unhidra_ratelimit::{Backend, Blocklist, Decision, Limit, RateLimiter};
use unhidra_telemetry::metrics::Metrics;

use crate::{ApiError, ClientIp, origin::RequestOrigin};

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// A stage of automatic address blocks: `failures` within `window` block
/// the address for `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockStage {
    failures: u32,
    window: Duration,
    block: Duration,
}

/// An address block that a failure just caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub failures: u32,
    pub window: Duration,
    pub block: Duration,
}

/// The process's rate limiter and blocklist, and the limits every service
/// shares.
#[derive(Clone)]
pub struct Limits {
    limiter: Arc<dyn RateLimiter>,
    blocklist: Arc<dyn Blocklist>,
    /// Longest block first.
    stages: Arc<[BlockStage]>,
    decisions: IntCounterVec,
    blocks: IntCounterVec,
    blocked_requests: IntCounter,
    fallback: IntGauge,
    trusted_proxies: Arc<[IpNet]>,
    http_ip: Option<Limit>,
    http_user: Option<Limit>,
}

impl Limits {
    /// The limiter `config` names (Redis or in-process), registered in
    /// `metrics`.
    pub fn new(config: &Config, clock: SharedClock, metrics: &Metrics) -> anyhow::Result<Self> {
        let backends = unhidra_ratelimit::from_config(config, &config.bus_prefix, clock)?;
        let stage = |failures, window, block| BlockStage {
            failures,
            window: Duration::from_secs(window),
            block: Duration::from_secs(block),
        };
        let mut stages = vec![
            stage(
                config.ip_block_long_failures,
                config.ip_block_long_window_secs,
                config.ip_block_long_secs,
            ),
            stage(
                config.ip_block_failures,
                config.ip_block_window_secs,
                config.ip_block_secs,
            ),
        ];
        stages.retain(|s| s.failures > 0);
        stages.sort_by_key(|s| std::cmp::Reverse(s.block));
        Ok(Self {
            limiter: backends.limiter,
            blocklist: backends.blocklist,
            stages: stages.into(),
            blocks: metrics.counter_vec(
                "unhidra_ip_blocks_total",
                "Client addresses blocked automatically, by block length in seconds.",
                &["block_secs"],
                &[],
            )?,
            blocked_requests: metrics.counter(
                "unhidra_blocked_requests_total",
                "Requests and WebSocket handshakes refused because their address is blocked.",
            )?,
            decisions: metrics.counter_vec(
                "unhidra_rate_limit_decisions_total",
                "Rate-limit checks by limit and outcome (allowed, limited).",
                &["limit", "outcome"],
                &[],
            )?,
            fallback: metrics.gauge(
                "unhidra_rate_limit_fallback",
                "1 while Redis is unreachable and this node applies its own limits.",
            )?,
            trusted_proxies: config.trusted_proxies.clone().into(),
            http_ip: Limit::new("http_ip", config.limit_http_ip),
            http_user: Limit::new("http_user", config.limit_http_user),
        })
    }

    /// Takes `cost` from `key`'s allowance under `limit`, and counts the
    /// decision.
    pub async fn check(&self, limit: &Limit, key: &str, cost: u32) -> Decision {
        let decision = self.limiter.check(limit, key, cost).await;
        let outcome = if decision.allowed {
            "allowed"
        } else {
            "limited"
        };
        self.decisions
            .with_label_values(&[limit.name(), outcome])
            .inc();
        self.fallback
            .set(i64::from(self.limiter.backend() == Backend::Fallback));
        decision
    }

    /// Takes one unit from `key` under `limit` (none when the limit is
    /// off), or refuses with 429.
    pub async fn enforce(&self, limit: Option<&Limit>, key: &str) -> Result<(), ApiError> {
        match limit {
            Some(limit) => enforce(self, &Applied::default(), limit, key).await,
            None => Ok(()),
        }
    }

    /// Counts a failed credential check from `ip`; when that completes a
    /// block stage, blocks the address on every node and says so.
    pub async fn strike(&self, ip: &ClientIp) -> Option<Blocked> {
        let key = ip.key();
        let mut reached = None;
        for stage in self.stages.iter() {
            let counter = format!("{key}|{}", stage.window.as_secs());
            let failures = self.blocklist.strike(&counter, stage.window).await;
            if reached.is_none() && failures >= stage.failures {
                reached = Some(Blocked {
                    failures,
                    window: stage.window,
                    block: stage.block,
                });
            }
        }
        let blocked = reached?;
        self.blocklist.block(&key, blocked.block).await;
        self.blocks
            .with_label_values(&[&blocked.block.as_secs().to_string()])
            .inc();
        tracing::warn!(client_ip = %ip, failures = blocked.failures, block_secs = blocked.block.as_secs(), "address blocked");
        Some(blocked)
    }

    /// Blocks `ip` on every node for `duration` (an admin's decision).
    pub async fn block(&self, ip: &ClientIp, duration: Duration) {
        self.blocklist.block(&ip.key(), duration).await;
    }

    pub async fn unblock(&self, ip: &ClientIp) {
        self.blocklist.unblock(&ip.key()).await;
    }

    /// How long `ip` stays blocked, if it is.
    pub async fn blocked(&self, ip: &ClientIp) -> Option<Duration> {
        self.blocklist.blocked(&ip.key()).await
    }

    /// Where limits are kept right now (`/readyz` names it).
    pub fn backend(&self) -> Backend {
        self.limiter.backend()
    }
}

/// The limits applied to one request so far; the tightest one goes into
/// the response headers.
#[derive(Clone, Default)]
struct Applied(Arc<Mutex<Option<Decision>>>);

impl Applied {
    fn record(&self, decision: Decision) {
        if let Ok(mut tightest) = self.0.lock() {
            let tighter = tightest.is_none_or(|t| {
                (decision.remaining, std::cmp::Reverse(decision.reset_after))
                    < (t.remaining, std::cmp::Reverse(t.reset_after))
            });
            if tighter {
                *tightest = Some(decision);
            }
        }
    }

    fn tightest(&self) -> Option<Decision> {
        self.0.lock().ok().and_then(|t| *t)
    }
}

/// Applies limits inside a handler, recording them for the headers.
pub struct Throttle {
    pub ip: ClientIp,
    limits: Limits,
    applied: Applied,
}

impl Throttle {
    /// Takes one unit from `key` under `limit` (none when the limit is
    /// off), or refuses with 429.
    pub async fn limit(&self, limit: Option<&Limit>, key: &str) -> Result<(), ApiError> {
        let Some(limit) = limit else { return Ok(()) };
        enforce(&self.limits, &self.applied, limit, key).await
    }

    /// [`Throttle::limit`] keyed by the client address.
    pub async fn limit_ip(&self, limit: Option<&Limit>) -> Result<(), ApiError> {
        self.limit(limit, &self.ip.key()).await
    }
}

async fn enforce(
    limits: &Limits,
    applied: &Applied,
    limit: &Limit,
    key: &str,
) -> Result<(), ApiError> {
    let decision = limits.check(limit, key, 1).await;
    applied.record(decision);
    if decision.allowed {
        return Ok(());
    }
    // The key may be an email: only the limit's name at info.
    tracing::info!(limit = limit.name(), "rate limited");
    tracing::debug!(limit = limit.name(), key, "rate limited key");
    Err(ApiError::RateLimited {
        limit: limit.name(),
        decision,
    })
}

impl<S> FromRequestParts<S> for Throttle
where
    Limits: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ip = ClientIp::from_request_parts(parts, state).await?;
        let applied = parts
            .extensions
            .get::<Applied>()
            .cloned()
            .unwrap_or_default();
        Ok(Self {
            ip,
            limits: Limits::from_ref(state),
            applied,
        })
    }
}

/// Applies the per-user request budget to an authenticated request.
pub(crate) async fn limit_user(parts: &Parts, limits: &Limits, user: &str) -> Result<(), ApiError> {
    let Some(limit) = &limits.http_user else {
        return Ok(());
    };
    let applied = parts
        .extensions
        .get::<Applied>()
        .cloned()
        .unwrap_or_default();
    enforce(limits, &applied, limit, user).await
}

/// The edge middleware of the API routes: resolves the client address,
/// applies the per-IP budget, runs the request as coming from its origin
/// (for audit events), and writes the rate-limit headers.
pub async fn edge(State(limits): State<Limits>, mut request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let ip = ClientIp::resolve(peer, request.headers(), &limits.trusted_proxies);
    let applied = Applied::default();
    if let Some(left) = limits.blocked(&ip).await {
        limits.blocked_requests.inc();
        tracing::info!(client_ip = %ip, "refused: address blocked");
        return ApiError::IpBlocked { retry_after: left }.into_response();
    }
    request.extensions_mut().insert(ip);
    request.extensions_mut().insert(applied.clone());
    if let Some(limit) = &limits.http_ip {
        if let Err(refused) = enforce(&limits, &applied, limit, &ip.key()).await {
            return refused.into_response();
        }
    }
    let origin = RequestOrigin::new(ip, request.headers());
    let mut response = origin.scope(next.run(request)).await;
    if let Some(decision) = applied.tightest() {
        if !response.headers().contains_key(LIMIT) {
            write_headers(response.headers_mut(), &decision);
        }
    }
    response
}

/// `X-RateLimit-*` for `decision`, and `Retry-After` when it refused.
pub(crate) fn write_headers(headers: &mut HeaderMap, decision: &Decision) {
    headers.insert(LIMIT, HeaderValue::from(decision.limit));
    headers.insert(REMAINING, HeaderValue::from(decision.remaining));
    headers.insert(
        RESET,
        HeaderValue::from(whole_seconds(decision.reset_after)),
    );
    if !decision.allowed {
        let retry = whole_seconds(decision.retry_after).max(1);
        headers.insert(RETRY_AFTER, HeaderValue::from(retry));
    }
}

/// Seconds, rounded up: a client that waits this long is not refused again.
pub(crate) fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}
