//! One suite for every `RateLimiter` and one for every `Blocklist`:
//! in-process and Redis, each on a clock the test moves. Redis runs under a prefix of its own per test;
//! outside CI a missing Redis skips its half with a message.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use unhidra_core::{
    clock::{ManualClock, SharedClock},
    rate::Rate,
};
use unhidra_ratelimit::{
    Backend, Blocklist, Limit, LocalBlocklist, LocalLimiter, RateLimiter, RedisBlocklist,
    RedisLimiter,
};
use unhidra_testkit::{Proxy, redis_url, unique_prefix};

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::starting_at(Duration::from_secs(1_800_000_000)))
}

fn limit(name: &'static str, count: u32, period: Duration) -> Limit {
    let count = NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN);
    Limit::new(name, Rate::Every { count, period }).unwrap_or_else(|| unreachable!())
}

/// What every implementation must do; `name` is in every failure.
async fn conformance(name: &str, limiter: &dyn RateLimiter, clock: &ManualClock) {
    let five_a_minute = limit("login_ip", 5, Duration::from_secs(60));

    // A burst of the whole count, then refusals that say when to come back.
    for expected_remaining in (0..5).rev() {
        let d = limiter.check(&five_a_minute, "203.0.113.7", 1).await;
        assert!(d.allowed, "{name}: allowed within the limit");
        assert_eq!(d.limit, 5, "{name}: limit");
        assert_eq!(d.remaining, expected_remaining, "{name}: remaining");
    }
    let refused = limiter.check(&five_a_minute, "203.0.113.7", 1).await;
    assert!(!refused.allowed, "{name}: the sixth is refused");
    assert_eq!(refused.remaining, 0, "{name}: nothing remains");
    let interval = Duration::from_secs(12);
    assert!(
        refused.retry_after > interval - Duration::from_millis(1)
            && refused.retry_after <= interval,
        "{name}: one unit comes back after 12 s, not {:?}",
        refused.retry_after
    );
    assert!(
        refused.reset_after >= refused.retry_after
            && refused.reset_after <= Duration::from_secs(60),
        "{name}: whole again within the period, not {:?}",
        refused.reset_after
    );

    // Another key and another limit are not touched.
    let other_ip = limiter.check(&five_a_minute, "198.51.100.1", 1).await;
    assert!(other_ip.allowed, "{name}: keys are independent");
    let register = limit("register_ip", 3, Duration::from_secs(60));
    let d = limiter.check(&register, "203.0.113.7", 1).await;
    assert!(
        d.allowed && d.remaining == 2,
        "{name}: limits are independent"
    );

    // Refusals take nothing: after one interval exactly one more is allowed.
    for _ in 0..10 {
        assert!(
            !limiter
                .check(&five_a_minute, "203.0.113.7", 1)
                .await
                .allowed
        );
    }
    clock.advance(interval);
    let back = limiter.check(&five_a_minute, "203.0.113.7", 1).await;
    assert!(back.allowed, "{name}: one unit back after one interval");
    assert!(
        !limiter
            .check(&five_a_minute, "203.0.113.7", 1)
            .await
            .allowed,
        "{name}: and only one"
    );

    // After a whole period the whole burst is back.
    clock.advance(Duration::from_secs(60));
    let whole = limiter.check(&five_a_minute, "203.0.113.7", 1).await;
    assert!(
        whole.allowed && whole.remaining == 4,
        "{name}: whole again after the period, remaining {}",
        whole.remaining
    );

    // Costs: bytes per second, where one check takes many units.
    let bytes = limit("ws_bytes", 1000, Duration::from_secs(1));
    let d = limiter.check(&bytes, "conn-1", 600).await;
    assert!(d.allowed && d.remaining == 400, "{name}: 600 of 1000 taken");
    let d = limiter.check(&bytes, "conn-1", 600).await;
    assert!(!d.allowed, "{name}: 600 more do not fit");
    assert!(
        d.retry_after > Duration::from_millis(150) && d.retry_after <= Duration::from_millis(200),
        "{name}: 200 units come back in 200 ms, not {:?}",
        d.retry_after
    );
    let d = limiter.check(&bytes, "conn-1", 400).await;
    assert!(d.allowed && d.remaining == 0, "{name}: the 400 left fit");
    let d = limiter.check(&bytes, "conn-2", 1001).await;
    assert!(
        !d.allowed,
        "{name}: a cost above the limit is never allowed"
    );
    assert!(
        limiter.check(&bytes, "conn-2", 1000).await.allowed,
        "{name}: and took nothing"
    );
}

#[tokio::test]
async fn local_limiter_conforms() {
    let clock = clock();
    let limiter = LocalLimiter::new(Arc::clone(&clock) as SharedClock);
    conformance("local", &limiter, &clock).await;
    assert_eq!(limiter.backend(), Backend::Local);
}

#[tokio::test]
async fn redis_limiter_conforms() {
    let Some(url) = redis_url().await else { return };
    let clock = clock();
    let limiter = RedisLimiter::new(&url, &unique_prefix(), Arc::clone(&clock) as SharedClock)
        .unwrap_or_else(|e| panic!("redis limiter: {e}"));
    conformance("redis", &limiter, &clock).await;
    assert_eq!(limiter.backend(), Backend::Shared);
}

#[tokio::test]
async fn nodes_sharing_redis_enforce_one_limit() {
    let Some(url) = redis_url().await else { return };
    let (clock, prefix) = (clock(), unique_prefix());
    let node = || {
        RedisLimiter::new(&url, &prefix, Arc::clone(&clock) as SharedClock)
            .unwrap_or_else(|e| panic!("redis limiter: {e}"))
    };
    let (a, b) = (node(), node());
    let login = limit("login_ip", 5, Duration::from_secs(60));
    for i in 0..5 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert!(
            node.check(&login, "203.0.113.7", 1).await.allowed,
            "login {i}"
        );
    }
    assert!(!a.check(&login, "203.0.113.7", 1).await.allowed, "6th on a");
    assert!(!b.check(&login, "203.0.113.7", 1).await.allowed, "6th on b");
}

#[tokio::test]
async fn a_redis_outage_falls_back_to_local_limits_and_recovers() {
    let Some(url) = redis_url().await else { return };
    let proxy = Proxy::start(&unhidra_testkit::host_port(&url))
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let (clock, prefix) = (clock(), unique_prefix());
    let through_proxy = format!("redis://{}", proxy.address);
    let node = || {
        RedisLimiter::new(&through_proxy, &prefix, Arc::clone(&clock) as SharedClock)
            .unwrap_or_else(|e| panic!("redis limiter: {e}"))
    };
    let (a, b) = (node(), node());
    let messages = limit("messages_user", 4, Duration::from_secs(1));

    assert!(a.check(&messages, "ann", 2).await.allowed);
    assert_eq!(a.backend(), Backend::Shared);

    proxy.cut();
    // Neither unlimited nor refusing everyone: each node keeps its own count.
    let a_during: Vec<bool> = checks(&a, &messages, "ann", 4).await;
    assert_eq!(a_during, [true, true, false, false], "a counts locally");
    assert_eq!(a.backend(), Backend::Fallback, "a names the fallback");
    let b_during: Vec<bool> = checks(&b, &messages, "ann", 5).await;
    assert_eq!(
        b_during,
        [true, true, true, true, false],
        "b counts locally"
    );
    assert_eq!(b.backend(), Backend::Fallback);

    proxy.restore();
    // The first check after the outage may still find the old connection
    // broken; Redis is asked again a second later.
    for node in [&a, &b] {
        let mut tries = 0;
        while node.backend() != Backend::Shared {
            tries += 1;
            assert!(tries < 50, "shares again once Redis answers");
            clock.advance(Duration::from_secs(2));
            node.check(&messages, "warm-up", 1).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    clock.advance(Duration::from_secs(2));
    assert!(a.check(&messages, "ann", 1).await.allowed);
    // The shared count holds a's unit: b, whose local tier is whole again,
    // is refused by Redis after three.
    let b_after = checks(&b, &messages, "ann", 4).await;
    assert_eq!(b_after, [true, true, true, false], "one shared limit again");
}

async fn checks(limiter: &dyn RateLimiter, limit: &Limit, key: &str, n: usize) -> Vec<bool> {
    let mut allowed = Vec::with_capacity(n);
    for _ in 0..n {
        allowed.push(limiter.check(limit, key, 1).await.allowed);
    }
    allowed
}

/// What every blocklist must do; `name` is in every failure.
async fn blocklist_conformance(name: &str, blocks: &dyn Blocklist, clock: &ManualClock) {
    let window = Duration::from_secs(15 * 60);
    for expected in 1..=3 {
        let count = blocks.strike("203.0.113.7", window).await;
        assert_eq!(count, expected, "{name}: failures counted in the window");
    }
    assert_eq!(
        blocks.strike("198.51.100.1", window).await,
        1,
        "{name}: keys are independent"
    );
    clock.advance(window);
    assert_eq!(
        blocks.strike("203.0.113.7", window).await,
        1,
        "{name}: a new window starts over"
    );

    assert_eq!(
        blocks.blocked("203.0.113.7").await,
        None,
        "{name}: not blocked yet"
    );
    blocks.block("203.0.113.7", Duration::from_secs(900)).await;
    assert_eq!(
        blocks.blocked("203.0.113.7").await,
        Some(Duration::from_secs(900)),
        "{name}: blocked for the whole duration"
    );
    blocks.block("203.0.113.7", Duration::from_secs(60)).await;
    clock.advance(Duration::from_secs(600));
    assert_eq!(
        blocks.blocked("203.0.113.7").await,
        Some(Duration::from_secs(300)),
        "{name}: a shorter block does not shorten a longer one"
    );
    assert_eq!(
        blocks.blocked("198.51.100.1").await,
        None,
        "{name}: only that key"
    );
    clock.advance(Duration::from_secs(300));
    assert_eq!(
        blocks.blocked("203.0.113.7").await,
        None,
        "{name}: the block expires"
    );

    blocks.block("192.0.2.9", Duration::from_secs(86_400)).await;
    assert!(blocks.blocked("192.0.2.9").await.is_some());
    blocks.unblock("192.0.2.9").await;
    assert_eq!(blocks.blocked("192.0.2.9").await, None, "{name}: unblocked");
}

#[tokio::test]
async fn local_blocklist_conforms() {
    let clock = clock();
    let blocks = LocalBlocklist::new(Arc::clone(&clock) as SharedClock);
    blocklist_conformance("local", &blocks, &clock).await;
}

#[tokio::test]
async fn redis_blocklist_conforms_and_is_shared() {
    let Some(url) = redis_url().await else { return };
    let (clock, prefix) = (clock(), unique_prefix());
    let node = || {
        RedisBlocklist::connect(&url, &prefix, Arc::clone(&clock) as SharedClock)
            .unwrap_or_else(|e| panic!("redis blocklist: {e}"))
    };
    let (a, b) = (node(), node());
    blocklist_conformance("redis", &a, &clock).await;
    a.block("203.0.113.50", Duration::from_secs(60)).await;
    assert_eq!(
        b.blocked("203.0.113.50").await,
        Some(Duration::from_secs(60)),
        "seen by b"
    );
    assert_eq!(b.strike("203.0.113.51", Duration::from_secs(60)).await, 1);
    assert_eq!(
        a.strike("203.0.113.51", Duration::from_secs(60)).await,
        2,
        "counted together"
    );
    b.unblock("203.0.113.50").await;
    assert_eq!(
        a.blocked("203.0.113.50").await,
        None,
        "unblocked everywhere"
    );
}
