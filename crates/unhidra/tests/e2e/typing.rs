//! Typing indicators as chat members see them: relayed to the room's other
//! members (on every gateway), not to the typist's own connections, at most
//! one per second per connection and room, refused outside the user's
//! rooms, and never stored.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// The typing frames `socket` gets within `window`.
async fn typing_within(socket: &mut Socket, window: Duration) -> Result<Vec<Value>, Error> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(next) = tokio::time::timeout_at(deadline, socket.next()).await {
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(text.as_str())?;
                if frame["type"] == "typing" {
                    seen.push(frame);
                }
            }
            Some(Ok(_)) => {}
            other => return Err(format!("connection ended: {other:?}").into()),
        }
    }
    Ok(seen)
}

async fn typing_reaches_the_other_members(api: &Api, alice_ws: &str, bob_ws: &str) -> TestResult {
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let room = api.create_room(&alice, "public").await?;
    assert_eq!(api.join(&bob, &room).await?.0, StatusCode::OK);
    let mut typist = connect(alice_ws, &alice.token).await?;
    let mut typist_elsewhere = connect(bob_ws, &alice.token).await?;
    let mut reader = connect(bob_ws, &bob.token).await?;
    // Answered pings: their rooms are loaded (a connection reads once they are).
    for socket in [&mut typist_elsewhere, &mut reader] {
        send(socket, json!({"type": "ping", "id": "ready"})).await?;
        next_of(socket, "pong").await?;
    }

    // Three indicators at once: one goes out.
    for _ in 0..3 {
        send(&mut typist, json!({"type": "typing", "room": room})).await?;
    }
    let seen = typing_within(&mut reader, Duration::from_millis(700)).await?;
    assert_eq!(
        seen,
        vec![json!({"type": "typing", "room": room, "user": alice.id})]
    );
    assert_eq!(
        typing_within(&mut typist_elsewhere, Duration::from_millis(200)).await?,
        Vec::<Value>::new()
    );

    // A second later, another.
    tokio::time::sleep(Duration::from_millis(400)).await;
    send(&mut typist, json!({"type": "typing", "room": room})).await?;
    assert_eq!(
        typing_within(&mut reader, Duration::from_millis(700))
            .await?
            .len(),
        1
    );

    // Not in a room that is not yours.
    let private = api
        .create_room(&api.user("carol").await?, "private")
        .await?;
    send(&mut typist, json!({"type": "typing", "room": private})).await?;
    assert_eq!(next_of(&mut typist, "error").await?["code"], "forbidden");

    // Never stored.
    let (status, history) = get(
        &format!("{}/api/v1/rooms/{room}/messages", api.history),
        Some(&bob.token),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["messages"], json!([]));
    Ok(())
}

#[tokio::test]
async fn typing_indicators_reach_the_other_members_and_are_never_stored() -> TestResult {
    let stack = Embedded::start().await?;
    let ws = stack.app.ws();
    typing_reaches_the_other_members(&stack.api(), &ws, &ws).await?;
    stack.app.stop().await
}

#[tokio::test]
async fn typing_indicators_cross_gateways() -> TestResult {
    let Some(stack) = Scaled::start_with(false, 1, 2).await? else {
        return Ok(());
    };
    let gateways = stack.gateway_urls();
    typing_reaches_the_other_members(&stack.api(), &gateways[0], &gateways[1]).await?;
    stack.stop().await
}
