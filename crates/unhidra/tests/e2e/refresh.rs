//! Token refresh on an open socket, as a long-lived client meets it: a
//! warning before the token expires, a `refresh` with a fresh token of the
//! same user that keeps the connection past the first token's expiry, a
//! token of another user refused, and 4001 when the last token runs out.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use unhidra_core::Config;

use crate::harness::*;

#[tokio::test]
async fn a_socket_refreshed_in_time_outlives_its_first_token() -> TestResult {
    let stack = Embedded::start_with(Config {
        access_token_ttl_secs: 6,
        token_warning_secs: 5,
        ..unhidra_testkit::config()
    })
    .await?;
    let api = stack.api();
    let base = stack.app.http();
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let started = Instant::now();
    let mut socket = connect(&stack.app.ws(), &alice.token).await?;

    // 5 s before the token expires: a warning with its expiry.
    let warning = next_of(&mut socket, "token_expiring").await?;
    let first_expiry = warning["expires_at"].as_i64().ok_or("expires_at")?;

    // Another user's token is refused; the connection goes on.
    send(
        &mut socket,
        json!({"type": "refresh", "id": "r0", "token": bob.token}),
    )
    .await?;
    let refused = next_of(&mut socket, "error").await?;
    assert_eq!(
        (&refused["id"], &refused["code"]),
        (&json!("r0"), &json!("forbidden"))
    );
    send(
        &mut socket,
        json!({"type": "refresh", "token": "not.a.token"}),
    )
    .await?;
    assert_eq!(
        next_of(&mut socket, "error").await?["code"],
        "invalid_token"
    );

    // A fresh token of alice's (a login mints one), taken 2 s before the
    // first expires, extends the connection.
    let wait = |until: i64| {
        Duration::from_secs(u64::try_from(until - chrono::Utc::now().timestamp()).unwrap_or(0))
    };
    tokio::time::sleep(wait(first_expiry - 2)).await;
    let (status, login) = post(
        &format!("{base}/api/v1/auth/login"),
        None,
        json!({"email": email_of(&api, &alice).await?, "password": "correct horse battery"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{login}");
    let fresh = str_of(&login, "access_token")?;
    send(
        &mut socket,
        json!({"type": "refresh", "id": "r1", "token": fresh}),
    )
    .await?;
    let refreshed = next_of(&mut socket, "refreshed").await?;
    assert_eq!(refreshed["id"], "r1");
    let second_expiry = refreshed["expires_at"].as_i64().ok_or("expires_at")?;
    assert!(second_expiry >= first_expiry + 3, "{refreshed}");

    // Past the first token's expiry, the socket still answers.
    let past_first = Duration::from_secs(
        u64::try_from(first_expiry - chrono::Utc::now().timestamp() + 1).unwrap_or(0),
    );
    tokio::time::sleep(past_first).await;
    send(&mut socket, json!({"type": "ping", "id": "alive"})).await?;
    assert_eq!(next_of(&mut socket, "pong").await?["id"], "alive");

    // Without another refresh it closes with 4001 when the second expires.
    let (code, took) = closed(&mut socket, started).await?;
    assert_eq!(code, CloseCode::Library(4001));
    assert!(took > Duration::from_secs(6), "closed after {took:?}");
    stack.app.stop().await
}

/// The email `user` registered with (read back from the account).
async fn email_of(api: &Api, user: &User) -> Result<String, Error> {
    let (_, me) = get(&format!("{}/api/v1/users/me", api.auth), Some(&user.token)).await?;
    str_of(&me, "email")
}
