//! Connections as the operator's gateway treats them: a gateway that stops
//! closes its WebSockets with 1012 spread over its drain period (not all at
//! once); a client that answers nothing, not even the server's pings, is
//! closed with 4009 after the idle timeout, while one that reads stays.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};
use unhidra_core::Config;

use crate::harness::*;

const CONNECTIONS: usize = 1000;

#[tokio::test]
async fn a_stopping_gateway_closes_its_sockets_with_1012_over_the_drain_period() -> TestResult {
    let drain = Duration::from_secs(2);
    let stack = Embedded::start_with(Config {
        drain_secs: drain.as_secs(),
        ..unhidra_testkit::config()
    })
    .await?;
    let alice = stack.api().user("alice").await?;
    let ws = stack.app.ws();
    let mut sockets = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        sockets.push(connect(&ws, &alice.token).await?);
    }
    let stopped_at = Instant::now();
    let stopping = tokio::spawn(stack.app.stop());
    let closes = futures::future::join_all(
        sockets
            .into_iter()
            .map(|mut socket| async move { closed(&mut socket, stopped_at).await }),
    )
    .await;
    let mut times = Vec::with_capacity(CONNECTIONS);
    for close in closes {
        let (code, after) = close?;
        assert_eq!(code, CloseCode::Restart, "1012 service restart");
        times.push(after);
    }
    times.sort();
    let (first, last) = (times[0], times[CONNECTIONS - 1]);
    assert!(
        last < drain + Duration::from_secs(2),
        "last closed after {last:?}"
    );
    assert!(
        last - first > drain / 2,
        "closes spread over {:?} only",
        last - first
    );
    // Not bunched: every quarter of the drain period closed some.
    for quarter in 0..4 {
        let (from, to) = (drain * quarter / 4, drain * (quarter + 1) / 4);
        let count = times.iter().filter(|t| **t >= from && **t < to).count();
        assert!(
            count > CONNECTIONS / 10,
            "{count} closed in quarter {quarter}"
        );
    }
    stopping.await??;
    Ok(())
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_idle_timeout_and_a_reading_one_stays() -> TestResult {
    let stack = Embedded::start_with(Config {
        ws_ping_secs: 1,
        ws_idle_timeout_secs: 2,
        ..unhidra_testkit::config()
    })
    .await?;
    let alice = stack.api().user("alice").await?;
    let ws = stack.app.ws();
    let mut silent = connect(&ws, &alice.token).await?;
    let mut reading = connect(&ws, &alice.token).await?;

    // The reading client answers the pings (the WebSocket library pongs as
    // it reads); the silent one reads nothing for 4 s.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        match tokio::time::timeout(Duration::from_millis(200), reading.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return Err(format!("closed: {frame:?}").into()),
            Ok(None | Some(Err(_))) => return Err("the reading client lost its connection".into()),
            Ok(Some(Ok(_))) | Err(_) => {}
        }
    }
    send(&mut reading, json!({"type": "ping", "id": "still"})).await?;
    assert_eq!(next_of(&mut reading, "pong").await?["id"], "still");

    let (code, _) = closed(&mut silent, started).await?;
    assert_eq!(code, CloseCode::Library(4009));
    stack.app.stop().await
}
