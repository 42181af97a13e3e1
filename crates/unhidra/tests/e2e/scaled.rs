//! Scaled out: every service on its own listener with its own bus connection,
//! talking only through real NATS JetStream and Postgres.

use std::time::Instant;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use unhidra_core::Config;

use crate::{
    embedded::{concurrent_sends_get_gap_free_sequences, one_message_end_to_end},
    harness::*,
};

#[tokio::test]
async fn scaled_out_two_users_one_message() -> TestResult {
    let started = Instant::now();
    let Some(stack) = Scaled::start().await? else {
        return Ok(());
    };
    one_message_end_to_end(&stack.api(), &stack.gateway.ws()).await?;
    let (status, _) = post(
        &format!("{}/api/v1/auth/login", stack.auth.http()),
        None,
        json!({"email": "nobody@example.com", "password": "guessing"}),
    )
    .await?;
    assert_eq!(status.as_u16(), 401);

    // The audit log recorded the registrations, logins (and the failed one)
    // and the room.
    let pool = sqlx::PgPool::connect(stack.db.url()).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let kinds: Vec<String> =
            sqlx::query_scalar("SELECT kind FROM audit_events ORDER BY occurred_at")
                .fetch_all(&pool)
                .await?;
        let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
        if count("user_registered") == 2
            && count("login_succeeded") == 2
            && count("login_failed") == 1
            && count("room_created") == 1
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "audit log incomplete: {kinds:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stack.stop().await?;
    eprintln!("scaled-out scenario wall time: {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn history_down_during_1000_sends_then_stores_each_exactly_once() -> TestResult {
    const COUNT: usize = 1000;
    let Some(mut stack) = Scaled::start().await? else {
        return Ok(());
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "public").await?;

    // history-service goes away before the messages are sent.
    let history = stack.history.take().ok_or("history not running")?;
    let history_address = history.address;
    history.stop().await?;

    let socket = connect(&stack.gateway.ws(), &alice.token).await?;
    let (mut sink, mut stream) = socket.split();
    let reader = tokio::spawn(async move {
        let mut acks = Vec::new();
        while acks.len() < COUNT {
            let Some(Ok(Message::Text(text))) = stream.next().await else {
                return Err::<Vec<Value>, String>("connection ended".into());
            };
            let frame: Value = serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
            match frame["type"].as_str() {
                Some("ack") => acks.push(frame),
                Some("message") => {}
                _ => return Err(format!("unexpected frame {frame}")),
            }
        }
        Ok(acks)
    });
    for i in 0..COUNT {
        let frame = json!({"type": "send", "id": format!("c{i}"), "room": room, "body": format!("message {i}")});
        sink.send(Message::text(frame.to_string())).await?;
    }
    let acks = tokio::time::timeout(WAIT * 6, reader).await???;
    let mut seqs: Vec<u64> = acks.iter().filter_map(|a| a["seq"].as_u64()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=COUNT as u64).collect::<Vec<_>>());

    // history-service comes back (same durable consumer) and catches up.
    stack.history =
        Some(Running::start_at(history_address, stack.config.clone(), history_service::run).await?);
    let history_api = stack.api();
    let stored = history_of_at_least(&history_api, &alice, &room, COUNT, WAIT * 6).await?;
    let mut stored_seqs: Vec<u64> = stored.iter().filter_map(|m| m["seq"].as_u64()).collect();
    stored_seqs.sort_unstable();
    assert_eq!(
        stored_seqs,
        (1..=COUNT as u64).collect::<Vec<_>>(),
        "each message exactly once"
    );
    let mut acked_ids: Vec<&str> = acks
        .iter()
        .filter_map(|a| a["message_id"].as_str())
        .collect();
    let mut stored_ids: Vec<&str> = stored
        .iter()
        .filter_map(|m| m["message_id"].as_str())
        .collect();
    acked_ids.sort_unstable();
    stored_ids.sort_unstable();
    assert_eq!(acked_ids, stored_ids);
    stack.stop().await
}

#[tokio::test]
async fn scaled_out_concurrent_sends_get_gap_free_sequences() -> TestResult {
    let Some(stack) = Scaled::start().await? else {
        return Ok(());
    };
    concurrent_sends_get_gap_free_sequences(&stack.api(), &stack.gateway.ws()).await?;
    stack.stop().await
}

async fn readiness(service: &Running) -> Result<(u16, Value), Error> {
    let (status, body) = get(&format!("{}/readyz", service.http()), None).await?;
    Ok((status.as_u16(), body))
}

/// Polls `/readyz` until `want` (status) or the deadline.
async fn await_readiness(service: &Running, want: u16) -> Result<Value, Error> {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let (status, body) = readiness(service).await?;
        if status == want {
            return Ok(body);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("readyz stayed {status}: {body}").into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn readyz_follows_postgres_and_nats_outages_without_a_restart() -> TestResult {
    let Some(nats) = unhidra_testkit::nats_url().await else {
        return Ok(());
    };
    let Some(db) = unhidra_testkit::TestDatabase::postgres().await? else {
        return Ok(());
    };
    let nats_proxy = unhidra_testkit::Proxy::start(&unhidra_testkit::host_port(&nats)).await?;
    let pg_proxy = unhidra_testkit::Proxy::start(&unhidra_testkit::host_port(db.url())).await?;
    let db_name = db.url().rsplit('/').next().ok_or("database name")?;
    let config = Config {
        nats_url: Some(format!("nats://{}", nats_proxy.address).into()),
        database_url: Some(format!("postgres://postgres@{}/{db_name}", pg_proxy.address).into()),
        bus_prefix: unhidra_testkit::unique_prefix(),
        ..unhidra_testkit::config()
    };
    let history = Running::start(config, history_service::run).await?;
    let body = await_readiness(&history, 200).await?;
    assert_eq!(body["checks"]["database:history-service"], "ok");

    pg_proxy.cut();
    let body = await_readiness(&history, 503).await?;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["database:history-service"], "unreachable");
    assert_eq!(body["checks"]["bus"], "ok");
    pg_proxy.restore();
    await_readiness(&history, 200).await?;

    nats_proxy.cut();
    let body = await_readiness(&history, 503).await?;
    assert_eq!(body["checks"]["bus"], "unreachable");
    assert_eq!(body["checks"]["database:history-service"], "ok");
    nats_proxy.restore();
    await_readiness(&history, 200).await?;
    // Liveness never wavered.
    let (status, _) = get(&format!("{}/healthz", history.http()), None).await?;
    assert_eq!(status.as_u16(), 200);
    history.stop().await
}

#[tokio::test]
async fn a_membership_change_with_joined_false_stops_the_room_at_once() -> TestResult {
    use unhidra_bus::{Bus, Headers, NatsBus};
    use unhidra_core::{
        events::{MembershipChanged, RoomMessage, SCHEMA_VERSION},
        ids::MessageId,
        subjects::Subjects,
    };

    let Some(stack) = Scaled::start().await? else {
        return Ok(());
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let room = api.create_room(&alice, "public").await?;
    api.join(&bob, &room).await?;
    let mut alice_ws = connect(&stack.gateway.ws(), &alice.token).await?;
    let mut bob_ws = connect(&stack.gateway.ws(), &bob.token).await?;

    // What chat-service will publish when bob leaves, published here on the
    // same NATS under the stack's prefix. Each change is followed by a probe
    // message from the same connection: once alice has the probe, the gateway
    // has applied the change (one publisher's messages arrive in order). A
    // gateway gives no connection a sequence at or below one it gave it, so
    // each probe takes a sequence above the room's real messages so far, and
    // the room's next real message is numbered above the probe.
    let chat_db = sqlx::PgPool::connect(stack.db.url()).await?;
    let numbered_above = async |seq: i64| -> Result<(), Error> {
        sqlx::query("UPDATE rooms SET last_seq = $1 WHERE id = $2")
            .bind(seq)
            .bind(&room)
            .execute(&chat_db)
            .await?;
        Ok(())
    };
    let nats =
        NatsBus::connect(&unhidra_testkit::nats_url().await.ok_or("NATS")?, "_INBOX").await?;
    let subjects = Subjects::new(stack.config.bus_prefix.clone());
    let (room_id, bob_id) = (room.parse()?, bob.id.parse()?);
    let change_then_probe = async |joined: bool, probe: &str| -> Result<(), Error> {
        let change = MembershipChanged {
            v: SCHEMA_VERSION,
            room: room_id,
            user: bob_id,
            joined,
            // As chat-service would: the room's latest sequence before.
            seq: if joined { 1001 } else { 0 },
        };
        let probe = RoomMessage {
            v: SCHEMA_VERSION,
            room: room_id,
            seq: if joined { 2000 } else { 1000 },
            message_id: MessageId::new(),
            sender: alice.id.parse()?,
            body: probe.to_owned(),
            sent_at: chrono::Utc::now(),
        };
        let (members, messages) = (
            subjects.room_members(room_id),
            subjects.room_messages(room_id),
        );
        nats.publish(
            &members,
            Headers::new(),
            serde_json::to_vec(&change)?.into(),
        )
        .await?;
        nats.publish(
            &messages,
            Headers::new(),
            serde_json::to_vec(&probe)?.into(),
        )
        .await?;
        Ok(())
    };
    let next_message = async |ws: &mut Socket| -> Result<(Option<u64>, String), Error> {
        let frame = next_of(ws, "message").await?;
        Ok((frame["seq"].as_u64(), str_of(&frame, "body")?))
    };

    change_then_probe(false, "probe while out").await?;
    assert_eq!(
        next_message(&mut alice_ws).await?,
        (Some(1000), "probe while out".into())
    );
    numbered_above(1000).await?;
    send(
        &mut alice_ws,
        json!({"type": "send", "id": "while-out", "room": room, "body": "not for bob"}),
    )
    .await?;
    assert_eq!(
        next_message(&mut alice_ws).await?,
        (Some(1001), "not for bob".into())
    );

    change_then_probe(true, "probe after rejoining").await?;
    assert_eq!(
        next_message(&mut alice_ws).await?,
        (Some(2000), "probe after rejoining".into())
    );
    numbered_above(2000).await?;
    send(
        &mut alice_ws,
        json!({"type": "send", "id": "back", "room": room, "body": "for bob"}),
    )
    .await?;
    // Bob's connection got nothing of the room while he was out, and what
    // was sent after he was back. (Whether the probe after rejoining reaches
    // him depends on which of the join and the probe his gateway takes
    // first: joins and a room's messages come on different subscriptions.
    // The probe is no real message, so the catch-up cannot supply it.)
    let mut first = next_message(&mut bob_ws).await?;
    if first == (Some(2000), "probe after rejoining".into()) {
        first = next_message(&mut bob_ws).await?;
    }
    assert_eq!(first, (Some(2001), "for bob".into()));
    stack.stop().await
}

#[tokio::test]
async fn a_group_committed_but_not_published_before_a_restart_is_published_after() -> TestResult {
    use unhidra_core::subjects::Subjects;

    const COUNT: usize = 300;
    let Some(mut stack) = Scaled::start().await? else {
        return Ok(());
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "public").await?;

    // The rooms stream goes away: sends are still committed and acked, but
    // every publish after the group commit fails, as if chat-service died
    // between the two.
    let nats = async_nats::connect(unhidra_testkit::nats_url().await.ok_or("NATS")?).await?;
    let stream = Subjects::new(stack.config.bus_prefix.clone())
        .rooms_stream()
        .name;
    async_nats::jetstream::new(nats)
        .delete_stream(&stream)
        .await?;
    let socket = connect(&stack.gateway.ws(), &alice.token).await?;
    let (mut sink, mut frames) = socket.split();
    for i in 0..COUNT {
        let frame =
            json!({"type": "send", "id": format!("c{i}"), "room": room, "body": format!("m{i}")});
        sink.send(Message::text(frame.to_string())).await?;
    }
    let mut acked = Vec::new();
    while acked.len() < COUNT {
        let Some(Ok(Message::Text(text))) = tokio::time::timeout(WAIT, frames.next()).await? else {
            return Err("connection ended".into());
        };
        let frame: Value = serde_json::from_str(text.as_str())?;
        // Live subscribers see the messages: they go live before the
        // stream's publish fails.
        match frame["type"].as_str() {
            Some("ack") => acked.push(str_of(&frame, "message_id")?),
            Some("message") => {}
            _ => return Err(format!("unexpected frame {frame}").into()),
        }
    }

    // chat-service restarts (and recreates the stream): its relay publishes
    // every acknowledged message, which history stores exactly once.
    let chat_address = stack.chat.address;
    stack.chat.stop().await?;
    stack.chat = Running::start_at(chat_address, stack.config.clone(), chat_service::run).await?;
    wait_ready(&stack.chat.http()).await?;
    let stored = history_of_at_least(&api, &alice, &room, COUNT, WAIT * 3).await?;
    let mut stored_ids: Vec<String> = stored
        .iter()
        .map(|m| str_of(m, "message_id"))
        .collect::<Result<_, _>>()?;
    stored_ids.sort_unstable();
    acked.sort_unstable();
    assert_eq!(stored_ids, acked, "each acknowledged message exactly once");
    let mut seqs: Vec<u64> = stored.iter().filter_map(|m| m["seq"].as_u64()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=COUNT as u64).collect::<Vec<_>>());
    stack.stop().await
}
