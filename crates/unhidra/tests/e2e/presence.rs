//! Presence as room members see it: a member coming online and going
//! offline is told to the others' connections (once, whatever rooms they
//! share), the room's presence lists who is online, and a gateway that dies
//! without a word (SIGKILL) has its users marked offline on the others
//! within 10 s, with the gateways' lists on the bus and in Redis.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use unhidra_core::Config;

use crate::harness::*;

/// The next presence frame about `user`.
async fn presence_of(socket: &mut Socket, user: &str) -> Result<Value, Error> {
    loop {
        let frame = next_of(socket, "presence").await?;
        if frame["user"] == user {
            return Ok(frame);
        }
    }
}

async fn online_in(api_base: &str, room: &str, token: &str) -> Result<Vec<String>, Error> {
    let (status, body) = get(
        &format!("{api_base}/api/v1/rooms/{room}/presence"),
        Some(token),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut online: Vec<String> = body["online"]
        .as_array()
        .ok_or("online")?
        .iter()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect();
    online.sort();
    Ok(online)
}

#[tokio::test]
async fn members_see_each_other_come_and_go() -> TestResult {
    let stack = Embedded::start().await?;
    let api = stack.api();
    let base = stack.app.http();
    let ws = stack.app.ws();
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    // Two shared rooms: bob hears of alice once per change all the same.
    for _ in 0..2 {
        let room = api.create_room(&alice, "public").await?;
        assert_eq!(api.join(&bob, &room).await?.0, StatusCode::OK);
    }
    let room = api.create_room(&alice, "public").await?;
    assert_eq!(api.join(&bob, &room).await?.0, StatusCode::OK);
    let mut bob_ws = connect(&ws, &bob.token).await?;

    let alice_ws = connect(&ws, &alice.token).await?;
    assert_eq!(
        presence_of(&mut bob_ws, &alice.id).await?,
        json!({"type": "presence", "user": alice.id, "online": true})
    );
    let mut both = vec![alice.id.clone(), bob.id.clone()];
    both.sort();
    assert_eq!(online_in(&base, &room, &bob.token).await?, both);

    drop(alice_ws);
    assert_eq!(presence_of(&mut bob_ws, &alice.id).await?["online"], false);
    assert_eq!(
        online_in(&base, &room, &bob.token).await?,
        vec![bob.id.clone()]
    );
    // One frame per change, not one per shared room.
    send(&mut bob_ws, json!({"type": "ping", "id": "after"})).await?;
    loop {
        let frame = next_frame(&mut bob_ws).await?;
        assert_ne!(
            frame["type"], "presence",
            "a repeated presence frame: {frame}"
        );
        if frame["type"] == "pong" {
            break;
        }
    }

    // Not a member: no presence of the room.
    let carol = api.user("carol").await?;
    let (status, _) = get(
        &format!("{base}/api/v1/rooms/{room}/presence"),
        Some(&carol.token),
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    stack.app.stop().await
}

#[tokio::test]
async fn a_killed_gateways_users_go_offline_on_the_others_within_10_s() -> TestResult {
    a_killed_gateways_users_go_offline(None).await
}

#[tokio::test]
async fn with_redis_a_killed_gateways_users_go_offline_on_the_others_within_10_s() -> TestResult {
    let Some(redis) = unhidra_testkit::redis_url().await else {
        return Ok(());
    };
    a_killed_gateways_users_go_offline(Some(redis)).await
}

/// The users each live gateway holds, as Redis has them.
async fn online_in_redis(redis: &str, prefix: &str) -> Result<(usize, Vec<String>), Error> {
    let mut conn = redis::Client::open(redis)?
        .get_multiplexed_async_connection()
        .await?;
    let gateways: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}:presence:gateways"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await?;
    let lists: Vec<String> = gateways
        .iter()
        .map(|gateway| format!("{prefix}:presence:gateway:{gateway}"))
        .collect();
    let mut users: Vec<String> = redis::cmd("SUNION")
        .arg(lists)
        .query_async(&mut conn)
        .await?;
    users.sort();
    Ok((gateways.len(), users))
}

async fn a_killed_gateways_users_go_offline(redis: Option<String>) -> TestResult {
    let base = Config {
        redis_url: redis.clone().map(Into::into),
        ..unhidra_testkit::config()
    };
    let Some(stack) = Scaled::start_configured(base, false, 1, 1).await? else {
        return Ok(());
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let room = api.create_room(&alice, "public").await?;
    assert_eq!(api.join(&bob, &room).await?.0, StatusCode::OK);

    // A second gateway in a process of its own, on the same NATS and
    // database (the `unhidra` binary: every service, one port).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let nats = unhidra_testkit::nats_url().await.ok_or("NATS")?;
    let mut other = Command::new(env!("CARGO_BIN_EXE_unhidra"))
        .env("UNHIDRA_BIND", format!("127.0.0.1:{port}"))
        .env("UNHIDRA_NATS_URL", nats)
        .env("UNHIDRA_BUS_PREFIX", &stack.config.bus_prefix)
        .env("UNHIDRA_DATABASE_URL", stack.db.url())
        .env("UNHIDRA_STREAM_MAX_BYTES", "8388608")
        .envs(redis.iter().map(|url| ("UNHIDRA_REDIS_URL", url)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let other_base = format!("http://127.0.0.1:{port}");
    wait_ready(&other_base).await?;

    let mut bob_ws = connect(&stack.gateway.ws(), &bob.token).await?;
    let _alice_ws = connect(&format!("ws://127.0.0.1:{port}/ws"), &alice.token).await?;
    assert_eq!(presence_of(&mut bob_ws, &alice.id).await?["online"], true);
    let mut both = vec![alice.id.clone(), bob.id.clone()];
    both.sort();
    assert_eq!(
        online_in(&stack.gateway.http(), &room, &bob.token).await?,
        both
    );
    assert_eq!(online_in(&other_base, &room, &alice.token).await?, both);
    let prefix = &stack.config.bus_prefix;
    if let Some(redis) = &redis {
        assert_eq!(online_in_redis(redis, prefix).await?, (2, both.clone()));
    }

    let killed_at = Instant::now();
    other.kill()?;
    other.wait()?;
    let offline = presence_of(&mut bob_ws, &alice.id).await?;
    assert_eq!(offline["online"], false);
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(10), "offline after {took:?}");
    assert_eq!(
        online_in(&stack.gateway.http(), &room, &bob.token).await?,
        vec![bob.id.clone()]
    );
    if let Some(redis) = &redis {
        // The dead gateway's list expired; the live one's next beat (every
        // 2 s) drops its entry.
        let deadline = Instant::now() + Duration::from_secs(4);
        while online_in_redis(redis, prefix).await? != (1, vec![bob.id.clone()]) {
            assert!(
                Instant::now() < deadline,
                "Redis still lists the dead gateway: {:?}",
                online_in_redis(redis, prefix).await?
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stack.stop().await
}
