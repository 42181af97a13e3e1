//! Resume as a reconnecting client meets it: after a drop in the middle of a
//! burst, exactly the messages it missed, in order, then live ones with none
//! lost or doubled at the seam, on the same gateway, on another one and
//! after its gateway is gone, and from the gateway's memory of the room
//! while history is down; a client too far behind gets a `gap` that
//! history fills.

use futures::SinkExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use unhidra_core::Config;

use crate::harness::*;

const BURST: u64 = 1000;

/// Sends `count` messages to `room` as fast as the socket takes them, then
/// waits for every ack; the acked sequence numbers.
async fn burst(mut socket: Socket, room: String, count: u64) -> Result<Vec<u64>, Error> {
    for i in 0..count {
        let frame =
            json!({"type": "send", "id": format!("b-{i}"), "room": room, "body": format!("m{i}")});
        socket.feed(Message::text(frame.to_string())).await?;
    }
    socket.flush().await?;
    let mut acked = Vec::new();
    while (acked.len() as u64) < count {
        let frame = next_frame(&mut socket).await?;
        match frame["type"].as_str() {
            Some("ack") => acked.push(frame["seq"].as_u64().ok_or("seq")?),
            Some("error") => return Err(format!("send refused: {frame}").into()),
            _ => {}
        }
    }
    Ok(acked)
}

/// The sequences of the messages `socket` gets until it has seen `last`,
/// with every other frame kind in order of arrival.
async fn messages_until(
    socket: &mut Socket,
    room: &str,
    last: u64,
) -> Result<(Vec<u64>, Vec<Value>), Error> {
    let mut seqs = Vec::new();
    let mut others = Vec::new();
    loop {
        let frame = next_frame(socket).await?;
        if frame["type"] == "message" && frame["room"] == room {
            let seq = frame["seq"].as_u64().ok_or("seq")?;
            seqs.push(seq);
            if seq == last {
                return Ok((seqs, others));
            }
        } else {
            others.push(frame);
        }
    }
}

/// Bob drops out of `first` in the middle of Alice's burst (his socket
/// closes, or with `stop` his gateway stops) and resumes on `second`: he
/// sees every message once, in order.
async fn drop_and_resume(
    api: &Api,
    send_on: &str,
    first: &str,
    second: Option<&str>,
    stop: Option<Running>,
) -> TestResult {
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let room = api.create_room(&alice, "public").await?;
    assert_eq!(api.join(&bob, &room).await?.0, StatusCode::OK);
    let mut before = connect(first, &bob.token).await?;
    let sender = connect(send_on, &alice.token).await?;
    let sending = tokio::spawn(burst(sender, room.clone(), BURST));

    // Bob reads a part of the burst, then his connection drops.
    let (seen, _) = messages_until(&mut before, &room, 150).await?;
    assert_eq!(seen, (1..=150).collect::<Vec<_>>());
    if let Some(gateway) = stop {
        gateway.stop().await?;
    }
    drop(before);

    let resuming = format!("{}?resume=true", second.unwrap_or(first));
    let mut after = connect(&resuming, &bob.token).await?;
    send(
        &mut after,
        json!({"type": "resume", "rooms": {room.clone(): 150}}),
    )
    .await?;
    let (seqs, mut others) = messages_until(&mut after, &room, BURST).await?;
    if others.iter().all(|f| f["type"] != "resumed") {
        // The burst was over before the resume: `resumed` ends the replay.
        others.push(next_of(&mut after, "resumed").await?);
    }
    assert_eq!(
        seqs,
        (151..=BURST).collect::<Vec<_>>(),
        "every missed and live message once, in order"
    );
    let resumed: Vec<&Value> = others.iter().filter(|f| f["type"] == "resumed").collect();
    assert_eq!(resumed.len(), 1, "{others:?}");
    assert_eq!(resumed[0]["room"], room.as_str());
    assert!(resumed[0]["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(others.iter().all(|f| f["type"] != "gap"), "{others:?}");
    let acked = sending.await??;
    assert_eq!(acked.len() as u64, BURST);
    Ok(())
}

#[tokio::test]
async fn a_client_resumes_a_burst_without_loss_or_duplicates() -> TestResult {
    let stack = Embedded::start().await?;
    let ws = stack.app.ws();
    drop_and_resume(&stack.api(), &ws, &ws, None, None).await?;
    stack.app.stop().await
}

#[tokio::test]
async fn a_client_resumes_on_another_gateway_and_after_its_gateway_stopped() -> TestResult {
    let Some(mut stack) = Scaled::start_with(false, 1, 2).await? else {
        return Ok(());
    };
    let api = stack.api();
    let gateways = stack.gateway_urls();
    // Dropped on one gateway, resumed on the other.
    drop_and_resume(&api, &gateways[0], &gateways[0], Some(&gateways[1]), None).await?;
    // Its gateway stops (SIGTERM: close 1012) mid-burst; it resumes on the other.
    let second = stack.more_gateways.remove(0);
    drop_and_resume(
        &api,
        &gateways[0],
        &gateways[1],
        Some(&gateways[0]),
        Some(second),
    )
    .await?;
    stack.stop().await
}

#[tokio::test]
async fn a_resume_is_served_from_the_gateways_memory_while_history_is_down() -> TestResult {
    const SENT: u64 = 40;
    let Some(mut stack) = Scaled::start().await? else {
        return Ok(());
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let room = api.create_room(&alice, "public").await?;
    assert_eq!(api.join(&bob, &room).await?.0, StatusCode::OK);
    let ws = stack.gateway.ws();
    let mut before = connect(&ws, &bob.token).await?;
    let sender = connect(&ws, &alice.token).await?;
    // Alice's other device keeps the room followed on this gateway.
    let _other_device = connect(&ws, &alice.token).await?;

    // History is gone: what Bob misses can only come from the gateway.
    let history = stack.history.take().ok_or("history not running")?;
    history.stop().await?;
    let acked = burst(sender, room.clone(), SENT).await?;
    assert_eq!(acked.len() as u64, SENT);
    let (seen, _) = messages_until(&mut before, &room, 10).await?;
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    drop(before);

    let mut after = connect(&format!("{ws}?resume=true"), &bob.token).await?;
    send(
        &mut after,
        json!({"type": "resume", "rooms": {room.clone(): 10}}),
    )
    .await?;
    let (seqs, others) = messages_until(&mut after, &room, SENT).await?;
    assert_eq!(seqs, (11..=SENT).collect::<Vec<_>>());
    assert!(others.iter().all(|f| f["type"] != "gap"), "{others:?}");
    assert_eq!(next_of(&mut after, "resumed").await?["seq"], SENT);
    stack.stop().await
}

#[tokio::test]
async fn a_client_too_far_behind_gets_a_gap_that_history_fills() -> TestResult {
    let stack = Embedded::start_with(Config {
        resume_window: 20,
        ..unhidra_testkit::config()
    })
    .await?;
    let api = stack.api();
    let ws = stack.app.ws();
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "public").await?;
    let sender = connect(&ws, &alice.token).await?;
    burst(sender, room.clone(), 50).await?;

    // 5 seen, 45 missed: more than the window.
    let mut socket = connect(&format!("{ws}?resume=true"), &alice.token).await?;
    send(
        &mut socket,
        json!({"type": "resume", "rooms": {room.clone(): {"seq": 5}}}),
    )
    .await?;
    let gap = next_of(&mut socket, "gap").await?;
    assert_eq!(
        (gap["from_seq"].as_u64(), gap["to_seq"].as_u64()),
        (Some(6), Some(50))
    );
    let missed = history_of_at_least(&api, &alice, &room, 50, WAIT).await?;
    let seqs: Vec<u64> = missed
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .filter(|s| (6..=50).contains(s))
        .collect();
    assert_eq!(seqs.len(), 45, "history holds the gap");

    // Another epoch: the client's positions mean nothing; a gap from 1.
    send(
        &mut socket,
        json!({"type": "resume", "rooms": {room.clone(): {"seq": 50, "epoch": "old"}}}),
    )
    .await?;
    let gap = next_of(&mut socket, "gap").await?;
    assert_eq!(
        (gap["from_seq"].as_u64(), gap["to_seq"].as_u64()),
        (Some(1), Some(50))
    );

    // Up to date: nothing to send, `resumed` at once; then live messages.
    send(
        &mut socket,
        json!({"type": "resume", "rooms": {room.clone(): 50}}),
    )
    .await?;
    let resumed = next_of(&mut socket, "resumed").await?;
    assert_eq!(resumed["seq"], 50);
    assert_eq!(resumed["epoch"], gap["epoch"]);

    // A room that is not yours: an error, and the socket keeps serving.
    let other = api
        .create_room(&api.user("carol").await?, "private")
        .await?;
    send(&mut socket, json!({"type": "resume", "rooms": {other: 0}})).await?;
    assert_eq!(next_of(&mut socket, "error").await?["code"], "forbidden");
    send(&mut socket, json!({"type": "ping", "id": "still"})).await?;
    assert_eq!(next_of(&mut socket, "pong").await?["id"], "still");
    stack.app.stop().await
}

#[tokio::test]
async fn a_send_retried_after_a_drop_gets_its_first_ack_and_posts_once() -> TestResult {
    let stack = Embedded::start().await?;
    let api = stack.api();
    let ws = stack.app.ws();
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "public").await?;
    let send_frame = json!({"type": "send", "id": "retry-1", "room": room, "body": "only once"});

    let mut first = connect(&ws, &alice.token).await?;
    send(&mut first, send_frame.clone()).await?;
    let ack = next_of(&mut first, "ack").await?;
    drop(first);

    // The client never saw that ack (say); it retries on a new connection.
    let mut second = connect(&ws, &alice.token).await?;
    send(&mut second, send_frame).await?;
    let again = next_of(&mut second, "ack").await?;
    assert_eq!(
        (&again["seq"], &again["message_id"], &again["id"]),
        (&ack["seq"], &ack["message_id"], &json!("retry-1"))
    );
    send(
        &mut second,
        json!({"type": "send", "id": "retry-2", "room": room, "body": "next"}),
    )
    .await?;
    assert_eq!(next_of(&mut second, "ack").await?["seq"], 2);
    let stored = history_of_at_least(&api, &alice, &room, 2, WAIT).await?;
    let bodies: Vec<&str> = stored.iter().filter_map(|m| m["body"].as_str()).collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(bodies.iter().filter(|b| **b == "only once").count(), 1);
    stack.app.stop().await
}
