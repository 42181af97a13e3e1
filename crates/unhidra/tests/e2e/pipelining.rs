//! Clients that send without waiting: every ack in sending order and naming a
//! committed message, every room's sequence gap-free, every member connection
//! receiving every message once and in order; embedded, and scaled out with
//! two chat-service instances and two gateways on Postgres and on SQLite.

use std::collections::HashMap;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// Sends `sends` (room, client id) without waiting, then reads until every one
/// is answered; returns the acks in arrival order. Message frames (the
/// sender's own messages) are skipped; anything else fails the test.
async fn pipeline(socket: Socket, sends: Vec<(String, String)>) -> Result<Vec<Value>, Error> {
    let (mut sink, mut stream) = socket.split();
    let count = sends.len();
    let writer = tokio::spawn(async move {
        for (room, id) in sends {
            let frame =
                json!({"type": "send", "id": id, "room": room, "body": format!("body of {id}")});
            sink.send(Message::text(frame.to_string())).await?;
        }
        Ok::<_, Error>(sink)
    });
    let mut acks = Vec::with_capacity(count);
    while acks.len() < count {
        let message = tokio::time::timeout(WAIT * 3, stream.next())
            .await?
            .ok_or("connection ended")??;
        let Message::Text(text) = message else {
            if let Message::Close(close) = message {
                return Err(format!("closed: {close:?}").into());
            }
            continue;
        };
        let frame: Value = serde_json::from_str(text.as_str())?;
        match frame["type"].as_str() {
            Some("ack") => acks.push(frame),
            // Messages, and other users coming online (on another gateway,
            // told at its next beat), may come between the acks.
            Some("message" | "presence") => {}
            _ => return Err(format!("unexpected frame {frame}").into()),
        }
    }
    let _sink = writer.await??;
    Ok(acks)
}

/// Reads `count` message frames; returns (room, seq, body) in arrival order.
async fn receive(mut socket: Socket, count: usize) -> Result<Vec<(String, u64, String)>, Error> {
    let mut received: Vec<(String, u64, String)> = Vec::with_capacity(count);
    while received.len() < count {
        let frame = match next_of(&mut socket, "message").await {
            Ok(frame) => frame,
            Err(e) => {
                let last: HashMap<&str, u64> = received
                    .iter()
                    .map(|(room, seq, _)| (room.as_str(), *seq))
                    .collect();
                let got = received.len();
                return Err(format!("{e}: a listener got {got} of {count}, up to {last:?}").into());
            }
        };
        received.push((
            str_of(&frame, "room")?,
            frame["seq"].as_u64().ok_or("no seq")?,
            str_of(&frame, "body")?,
        ));
    }
    Ok(received)
}

/// Four senders pipelining into two rooms over `ws_urls` (round robin), two
/// listeners connected to every gateway.
pub async fn pipelined_senders_keep_order_everywhere(api: &Api, ws_urls: &[String]) -> TestResult {
    const SENDERS: usize = 4;
    const EACH: usize = 200;
    let owner = api.user("owner").await?;
    let rooms = [
        api.create_room(&owner, "public").await?,
        api.create_room(&owner, "public").await?,
    ];
    let mut users = Vec::new();
    for name in ["s0", "s1", "s2", "s3", "listener0", "listener1"] {
        let user = api.user(name).await?;
        for room in &rooms {
            let (status, body) = api.join(&user, room).await?;
            assert!(status.is_success(), "{body}");
        }
        users.push(user);
    }
    let mut listeners = Vec::new();
    for listener in &users[SENDERS..] {
        for url in ws_urls {
            let socket = connect(url, &listener.token).await?;
            listeners.push(tokio::spawn(receive(socket, SENDERS * EACH)));
        }
    }
    let mut senders = Vec::new();
    for (s, user) in users[..SENDERS].iter().enumerate() {
        let socket = connect(&ws_urls[s % ws_urls.len()], &user.token).await?;
        let sends: Vec<(String, String)> = (0..EACH)
            .map(|i| (rooms[i % 2].clone(), format!("s{s}-{i}")))
            .collect();
        senders.push(tokio::spawn(pipeline(socket, sends)));
    }

    let mut by_room: HashMap<String, Vec<u64>> = HashMap::new();
    let mut bodies: HashMap<(String, u64), String> = HashMap::new();
    for (s, sender) in senders.into_iter().enumerate() {
        let acks = sender.await??;
        // Acks come in sending order, and a connection's sends to a room are
        // numbered in that order.
        let ids: Vec<String> = acks
            .iter()
            .map(|a| str_of(a, "id"))
            .collect::<Result<_, _>>()?;
        let sent: Vec<String> = (0..EACH).map(|i| format!("s{s}-{i}")).collect();
        assert_eq!(ids, sent);
        let mut last: HashMap<String, u64> = HashMap::new();
        for ack in &acks {
            let (room, seq) = (str_of(ack, "room")?, ack["seq"].as_u64().ok_or("no seq")?);
            let previous = last.insert(room.clone(), seq).unwrap_or(0);
            assert!(seq > previous, "{ack} after seq {previous}");
            by_room.entry(room.clone()).or_default().push(seq);
            bodies.insert((room, seq), format!("body of {}", str_of(ack, "id")?));
        }
    }
    for room in &rooms {
        let mut seqs = by_room.remove(room).unwrap_or_default();
        seqs.sort_unstable();
        let n = (SENDERS * EACH / 2) as u64;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "room {room}");
    }
    // Every listener connection got every message once, each room in order,
    // and each is the message its ack named.
    for listener in listeners {
        let received = listener.await??;
        let mut next: HashMap<&str, u64> = HashMap::new();
        for (room, seq, body) in &received {
            let expected = next.entry(room.as_str()).or_insert(1);
            assert_eq!(*seq, *expected, "room {room}");
            *expected += 1;
            assert_eq!(bodies.get(&(room.clone(), *seq)), Some(body));
        }
    }
    Ok(())
}

#[tokio::test]
async fn embedded_pipelined_senders_keep_order_everywhere() -> TestResult {
    let stack = Embedded::start().await?;
    pipelined_senders_keep_order_everywhere(&stack.api(), &[stack.app.ws()]).await?;
    stack.app.stop().await
}

#[tokio::test]
async fn two_chat_services_and_two_gateways_keep_order_on_postgres() -> TestResult {
    let Some(stack) = Scaled::start_with(false, 2, 2).await? else {
        return Ok(());
    };
    pipelined_senders_keep_order_everywhere(&stack.api(), &stack.gateway_urls()).await?;
    stack.stop().await
}

#[tokio::test]
async fn two_chat_services_and_two_gateways_keep_order_on_sqlite() -> TestResult {
    let Some(stack) = Scaled::start_with(true, 2, 2).await? else {
        return Ok(());
    };
    pipelined_senders_keep_order_everywhere(&stack.api(), &stack.gateway_urls()).await?;
    stack.stop().await
}

#[tokio::test]
async fn a_connection_that_pipelines_1000_sends_gets_1000_acks_in_send_order() -> TestResult {
    const COUNT: usize = 1000;
    let stack = Embedded::start().await?;
    let api = stack.api();
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "private").await?;
    let socket = connect(&stack.app.ws(), &alice.token).await?;
    let sends = (0..COUNT)
        .map(|i| (room.clone(), format!("c{i}")))
        .collect();
    let acks = pipeline(socket, sends).await?;
    let got: Vec<(String, u64)> = acks
        .iter()
        .map(|a| Ok((str_of(a, "id")?, a["seq"].as_u64().ok_or("no seq")?)))
        .collect::<Result<_, Error>>()?;
    let expected: Vec<(String, u64)> = (0..COUNT)
        .map(|i| (format!("c{i}"), i as u64 + 1))
        .collect();
    assert_eq!(got, expected);
    // Every ack names a message that is in the history.
    let stored = history_of_at_least(&api, &alice, &room, COUNT, WAIT).await?;
    let mut stored_ids: Vec<&str> = stored
        .iter()
        .filter_map(|m| m["message_id"].as_str())
        .collect();
    let mut acked_ids: Vec<&str> = acks
        .iter()
        .filter_map(|a| a["message_id"].as_str())
        .collect();
    stored_ids.sort_unstable();
    acked_ids.sort_unstable();
    assert_eq!(stored_ids, acked_ids);
    stack.app.stop().await
}
