//! Connections as the operator's gateway treats them: a gateway that stops
//! closes its WebSockets with 1012 spread over its drain period (not all at
//! once), and its 1,000 clients, resuming on another gateway, miss and
//! repeat nothing of the traffic meanwhile; a client that answers nothing,
//! not even the server's pings, is closed with 4009 after the idle timeout,
//! while one that reads stays.

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

/// What one client saw of the room, every sequence in order of arrival:
/// it follows the room on `first` and, when that connection ends (1012, a
/// reset, a refused connect), resumes on `then` from the last it saw.
async fn follow_and_resume(
    first: String,
    then: String,
    token: String,
    room: String,
    total: u64,
) -> Result<Vec<u64>, Error> {
    let mut seen = Vec::new();
    if follow(&first, &token, &room, total, &mut seen)
        .await
        .unwrap_or(false)
        || follow(&then, &token, &room, total, &mut seen).await?
    {
        return Ok(seen);
    }
    Err(format!("the resumed connection ended after {:?}", seen.last()).into())
}

/// Resumes `room` on `url` from the last of `seen` and adds what comes
/// until `total`: true once it came, false if the connection ended first.
async fn follow(
    url: &str,
    token: &str,
    room: &str,
    total: u64,
    seen: &mut Vec<u64>,
) -> Result<bool, Error> {
    let mut socket = connect(&format!("{url}?resume=true"), token).await?;
    let last = seen.last().copied().unwrap_or(0);
    send(
        &mut socket,
        json!({"type": "resume", "rooms": {room: last}}),
    )
    .await?;
    loop {
        let next = tokio::time::timeout(WAIT, socket.next())
            .await?
            .ok_or("connection ended")?;
        match next {
            Ok(Message::Text(text)) => {
                let frame: serde_json::Value = serde_json::from_str(text.as_str())?;
                if frame["type"] == "message" && frame["room"] == room {
                    let seq = frame["seq"].as_u64().ok_or("seq")?;
                    seen.push(seq);
                    if seq == total {
                        return Ok(true);
                    }
                }
            }
            Ok(Message::Close(_)) | Err(_) => return Ok(false),
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn clients_of_a_draining_gateway_resume_elsewhere_and_lose_nothing() -> TestResult {
    const TOTAL: u64 = 300;
    let Some(mut stack) = Scaled::start_with(false, 1, 2).await? else {
        return Ok(());
    };
    let api = stack.api();
    let gateways = stack.gateway_urls();
    let (draining, staying) = (gateways[1].clone(), gateways[0].clone());
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let room = api.create_room(&alice, "public").await?;
    assert_eq!(api.join(&bob, &room).await?.0, reqwest::StatusCode::OK);

    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            tokio::spawn(follow_and_resume(
                draining.clone(),
                staying.clone(),
                bob.token.clone(),
                room.clone(),
                TOTAL,
            ))
        })
        .collect();
    // Every client is connected before the traffic starts.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Alice sends on the staying gateway, paced over about 1.5 s, while
    // the other one drains.
    let mut sender = connect(&staying, &alice.token).await?;
    let sending = tokio::spawn(async move {
        for i in 0..TOTAL {
            send(
                &mut sender,
                json!({"type": "send", "id": format!("d-{i}"), "room": room, "body": "x"}),
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut acked = 0;
        while acked < TOTAL {
            if next_frame(&mut sender).await?["type"] == "ack" {
                acked += 1;
            }
        }
        Ok::<u64, Error>(acked)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gateway = stack.more_gateways.remove(0);
    gateway.stop().await?;
    assert_eq!(sending.await??, TOTAL);

    for client in clients {
        let seen = client.await??;
        assert_eq!(
            seen,
            (1..=TOTAL).collect::<Vec<_>>(),
            "a client lost or repeated messages"
        );
    }
    stack.stop().await
}
