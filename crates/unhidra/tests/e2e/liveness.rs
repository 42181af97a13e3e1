//! Connections as the operator's gateway treats them: a gateway that stops
//! closes its WebSockets with 1012 spread over its drain period (not all at
//! once), and its 1,000 clients, resuming on another gateway, miss and
//! repeat nothing of the traffic meanwhile; a client that answers nothing,
//! not even the server's pings, is closed with 4009 after the idle timeout,
//! while one that reads stays.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};
use unhidra_core::Config;

use crate::harness::*;

const CONNECTIONS: usize = 1000;
/// How long a client of the draining test waits for its next frame: long,
/// since the test checks what arrives, not how fast; on a loaded machine
/// 1,000 clients resuming at once take their time.
const SILENCE: Duration = Duration::from_secs(30);

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
/// reset, a refused connect), resumes on `then` from the last it saw, as
/// often as it takes.
async fn follow_and_resume(
    gateways: [String; 2],
    api: Api,
    bob: User,
    room: String,
    total: u64,
) -> Result<Vec<u64>, Error> {
    let mut seen = Vec::new();
    let mut endings = Vec::new();
    for url in gateways.iter().chain(std::iter::repeat_n(&gateways[1], 20)) {
        match follow(url, &api, &bob, &room, total, &mut seen).await? {
            None => return Ok(seen),
            Some(ended) => endings.push(ended),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("after {:?} the connections ended: {endings:?}", seen.last()).into())
}

/// Resumes `room` on `url` from the last of `seen` and adds what comes
/// until `total`: `None` once it came, or how the connection ended first
/// (a refused handshake, a close, a resume the server could not answer).
/// A gap the server reports is filled from history, as a client does.
async fn follow(
    url: &str,
    api: &Api,
    bob: &User,
    room: &str,
    total: u64,
    seen: &mut Vec<u64>,
) -> Result<Option<String>, Error> {
    let mut socket = match connect(&format!("{url}?resume=true"), &bob.token).await {
        Ok(socket) => socket,
        Err(e) => return Ok(Some(format!("handshake: {e}"))),
    };
    let last = seen.last().copied().unwrap_or(0);
    send(
        &mut socket,
        json!({"type": "resume", "rooms": {room: last}}),
    )
    .await?;
    loop {
        let next = tokio::time::timeout(SILENCE, socket.next())
            .await
            .map_err(|_| format!("nothing for {SILENCE:?} on {url} after {:?}", seen.last()))?
            .ok_or("connection ended")?;
        let text = match next {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => return Ok(Some(format!("closed: {frame:?}"))),
            Err(e) => return Ok(Some(e.to_string())),
            Ok(_) => continue,
        };
        let frame: serde_json::Value = serde_json::from_str(text.as_str())?;
        match frame["type"].as_str() {
            Some("message") if frame["room"] == room => {
                seen.push(frame["seq"].as_u64().ok_or("seq")?);
            }
            Some("gap") => {
                let (from, to) = (frame["from_seq"].as_u64(), frame["to_seq"].as_u64());
                let (from, to) = from.zip(to).ok_or("gap without its range")?;
                let stored = history_of_at_least(api, bob, room, to as usize, SILENCE).await?;
                seen.extend(
                    stored
                        .iter()
                        .rev()
                        .filter_map(|m| m["seq"].as_u64())
                        .filter(|seq| (from..=to).contains(seq)),
                );
            }
            Some("error") if frame["code"] == "unavailable" => {
                return Ok(Some(format!("{frame}")));
            }
            Some("error") => return Err(format!("on {url}: {frame}").into()),
            _ => {}
        }
        if seen.last() == Some(&total) {
            return Ok(None);
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
                [draining.clone(), staying.clone()],
                api.clone(),
                bob.clone(),
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
        // A send the server could not answer in time (`unavailable`, under
        // the load of 1,000 resuming clients) is retried under its id, as
        // a client does; the retry is answered with the first ack.
        let mut acked = HashSet::new();
        while acked.len() < TOTAL as usize {
            let frame = next_frame_within(&mut sender, SILENCE)
                .await
                .map_err(|e| format!("alice's ack {}: {e}", acked.len() + 1))?;
            let id = frame["id"].as_str().unwrap_or_default().to_owned();
            match frame["type"].as_str() {
                Some("ack") => {
                    acked.insert(id);
                }
                Some("error") if frame["code"] == "unavailable" => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    send(
                        &mut sender,
                        json!({"type": "send", "id": id, "room": room, "body": "x"}),
                    )
                    .await?;
                }
                Some("error") => return Err(format!("alice's send failed: {frame}").into()),
                _ => {}
            }
        }
        Ok::<u64, Error>(acked.len() as u64)
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
