//! A gateway follows on the bus only the rooms its connections are in:
//! checked on a NATS server of the test's own, by the subscriptions it
//! lists, as connections come, join, leave and go.

use std::{collections::BTreeSet, time::Duration};

use serde_json::{Value, json};
use unhidra_bus::{Bus, Headers, NatsBus};
use unhidra_core::{
    Config,
    events::{MembershipChanged, SCHEMA_VERSION},
    subjects::Subjects,
};
use unhidra_testkit::{NatsServer, TestDatabase};

use crate::harness::*;

/// The rooms some client of `nats` is subscribed to one by one
/// (`<prefix>.room.<room>.*`).
async fn followed(nats: &NatsServer, prefix: &str) -> Result<BTreeSet<String>, Error> {
    let connz: Value = http()
        .get(format!("{}/connz?subs=1", nats.monitor_url()))
        .send()
        .await?
        .json()
        .await?;
    let mut rooms = BTreeSet::new();
    for connection in connz["connections"].as_array().ok_or("no connections")? {
        for subject in connection["subscriptions_list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let subject = subject.as_str().unwrap_or_default();
            if let Some(room) = subject
                .strip_prefix(&format!("{prefix}.room."))
                .and_then(|rest| rest.strip_suffix(".*"))
                .filter(|room| *room != "*")
            {
                rooms.insert(room.to_owned());
            }
        }
    }
    Ok(rooms)
}

/// Waits until the rooms followed are `expected`.
async fn until_followed(nats: &NatsServer, prefix: &str, expected: &[&str]) -> TestResult {
    let expected: BTreeSet<String> = expected.iter().map(|r| (*r).to_owned()).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = followed(nats, prefix).await?;
        if now == expected {
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "followed {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One instance of each service on a NATS server of the test's own (whose
/// subscriptions the test reads) and Postgres, under a fresh bus prefix;
/// `None` when either server is missing outside CI.
async fn one_of_each_on_own_nats() -> Result<Option<(NatsServer, String, Scaled)>, Error> {
    let Some(nats) = NatsServer::start("", &[]).await? else {
        return Ok(None);
    };
    let Some(db) = TestDatabase::postgres().await? else {
        return Ok(None);
    };
    let prefix = unhidra_testkit::unique_prefix();
    let config = Config {
        nats_url: Some(nats.url().into()),
        database_url: Some(db.url().to_owned().into()),
        bus_prefix: prefix.clone(),
        ..unhidra_testkit::config()
    };
    let stack = Scaled::start_on(config, db, |_, config| config, 1, 1).await?;
    Ok(Some((nats, prefix, stack)))
}

#[tokio::test]
async fn a_gateway_follows_the_rooms_of_its_connections_and_no_others() -> TestResult {
    let Some((nats, prefix, stack)) = one_of_each_on_own_nats().await? else {
        return Ok(());
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let hers = api.create_room(&alice, "public").await?;
    let his = api.create_room(&bob, "public").await?;
    // Nobody connected: no room is followed.
    until_followed(&nats, &prefix, &[]).await?;

    let mut alice_ws = connect(&stack.gateway.ws(), &alice.token).await?;
    until_followed(&nats, &prefix, &[&hers]).await?;

    // A join follows the room.
    api.join(&alice, &his).await?;
    until_followed(&nats, &prefix, &[&hers, &his]).await?;

    // A leave (as chat-service announces it) releases the room: no other
    // connection here is in it.
    let bus = NatsBus::connect(&nats.url(), "_INBOX").await?;
    let left = MembershipChanged {
        v: SCHEMA_VERSION,
        room: his.parse()?,
        user: alice.id.parse()?,
        joined: false,
        seq: 0,
    };
    let subjects = Subjects::new(prefix.clone());
    bus.publish(
        &subjects.room_members(left.room),
        Headers::new(),
        serde_json::to_vec(&left)?.into(),
    )
    .await?;
    until_followed(&nats, &prefix, &[&hers]).await?;

    // The last connection going releases the rest.
    alice_ws.close(None).await?;
    until_followed(&nats, &prefix, &[]).await?;
    let metrics = http()
        .get(format!("{}/metrics", stack.gateway.http()))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("unhidra_gateway_rooms_followed 0"),
        "{metrics}"
    );
    stack.stop().await
}

/// Sends `body` to `room` on `socket` and waits for the ack: a connection
/// reads frames only once it has its rooms, so every `chat.rooms_of` of its
/// opening was made before. Returns the bodies of the messages that came
/// before the ack (the sender's own message may come before it or after).
async fn sent(socket: &mut Socket, id: &str, room: &str, body: &str) -> Result<Vec<Value>, Error> {
    send(
        socket,
        json!({"type": "send", "id": id, "room": room, "body": body}),
    )
    .await?;
    let mut before = Vec::new();
    loop {
        let frame = next_frame(socket).await?;
        match frame["type"].as_str() {
            Some("ack") => {
                assert_eq!(frame["id"], id);
                return Ok(before);
            }
            Some("message") => before.push(frame["body"].clone()),
            _ => {}
        }
    }
}

/// The `chat.rooms_of` requests that reached NATS so far.
async fn requests_seen(requests: &mut unhidra_bus::Subscription) -> usize {
    let mut seen = 0;
    while let Ok(Some(_)) = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(requests),
    )
    .await
    {
        seen += 1;
    }
    seen
}

#[tokio::test]
async fn a_connect_loads_the_users_rooms_again_only_when_they_may_have_changed_meanwhile()
-> TestResult {
    let Some((nats, prefix, stack)) = one_of_each_on_own_nats().await? else {
        return Ok(());
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "public").await?;
    // A copy of every `chat.rooms_of` request the gateway makes.
    let bus = NatsBus::connect(&nats.url(), "_INBOX").await?;
    let mut requests = bus
        .subscribe(&Subjects::new(prefix.clone()).chat_rooms_of())
        .await?;

    // The first connection subscribes to the room after loading it, so a
    // leave published in between could have been missed: loaded again.
    let mut first = connect(&stack.gateway.ws(), &alice.token).await?;
    sent(&mut first, "c-1", &room, "first").await?;
    until_followed(&nats, &prefix, &[&room]).await?;
    assert_eq!(requests_seen(&mut requests).await, 2);

    // Nothing changed while the second one opened: loaded once.
    let mut second = connect(&stack.gateway.ws(), &alice.token).await?;
    let early = sent(&mut second, "c-2", &room, "to both").await?;
    assert_eq!(requests_seen(&mut requests).await, 1);

    // Both connections are in the room all the same.
    let to_both = json!("to both");
    for (socket, mut seen) in [(&mut first, false), (&mut second, early.contains(&to_both))] {
        while !seen {
            seen = next_of(socket, "message").await?["body"] == to_both;
        }
    }
    stack.stop().await
}
