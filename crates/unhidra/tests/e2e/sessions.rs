//! Sessions as users meet them: logout, listing and revoking their own
//! sessions, refresh-token reuse revoking the session, and every revocation
//! reaching the gateways (sockets closed with 4003, handshakes refused),
//! embedded and across processes.

use std::time::Instant;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

use crate::harness::*;

/// Tokens of one login.
struct Login {
    access: String,
    refresh: String,
}

async fn register(api: &Api, name: &str) -> Result<String, Error> {
    let email = format!("{name}-{}@example.com", uuid::Uuid::new_v4().simple());
    let (status, body) = post(
        &format!("{}/api/v1/auth/register", api.auth),
        None,
        json!({"email": email, "password": "correct horse battery"}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    Ok(email)
}

async fn login(api: &Api, email: &str) -> Result<Login, Error> {
    let (status, body) = post(
        &format!("{}/api/v1/auth/login", api.auth),
        None,
        json!({"email": email, "password": "correct horse battery"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    Ok(Login {
        access: str_of(&body, "access_token")?,
        refresh: str_of(&body, "refresh_token")?,
    })
}

/// Waits for the close frame; its code and how long it took.
async fn closed(
    socket: &mut Socket,
    since: Instant,
) -> Result<(CloseCode, std::time::Duration), Error> {
    loop {
        match tokio::time::timeout(WAIT, socket.next()).await? {
            Some(Ok(Message::Close(Some(frame)))) => return Ok((frame.code, since.elapsed())),
            Some(Ok(_)) => {}
            other => return Err(format!("no close frame: {other:?}").into()),
        }
    }
}

async fn delete(url: &str, token: &str) -> Result<StatusCode, Error> {
    Ok(http().delete(url).bearer_auth(token).send().await?.status())
}

#[tokio::test]
async fn logout_and_revoked_sessions_close_their_sockets_only() -> TestResult {
    let stack = Embedded::start().await?;
    let api = stack.api();
    let base = stack.app.http();
    let email = register(&api, "ann").await?;
    let (laptop, phone, tablet) = (
        login(&api, &email).await?,
        login(&api, &email).await?,
        login(&api, &email).await?,
    );
    let mut laptop_ws = connect(&stack.app.ws(), &laptop.access).await?;
    let mut phone_ws = connect(&stack.app.ws(), &phone.access).await?;
    let mut tablet_ws = connect(&stack.app.ws(), &tablet.access).await?;

    // Three sessions; the one asking is marked.
    let (status, list) = get(
        &format!("{base}/api/v1/auth/sessions"),
        Some(&laptop.access),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let sessions = list["sessions"].as_array().ok_or("sessions")?;
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);

    // Logout: the laptop's socket closes with 4003, the others stay.
    let started = Instant::now();
    let (status, _) = post(
        &format!("{base}/api/v1/auth/logout"),
        Some(&laptop.access),
        json!({}),
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (code, took) = closed(&mut laptop_ws, started).await?;
    assert_eq!(code, CloseCode::Library(4003));
    eprintln!("logout to close frame: {took:?}");
    send(&mut phone_ws, json!({"type": "ping", "id": "still"})).await?;
    assert_eq!(next_of(&mut phone_ws, "pong").await?["id"], "still");

    // Its tokens are refused everywhere now.
    let (status, body) = get(&format!("{base}/api/v1/rooms"), Some(&laptop.access)).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("session_revoked"))
    );
    let (status, body) = refused(handshake(&stack.app.ws(), &laptop.access)?).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("session_revoked"))
    );
    let (status, _) = post(
        &format!("{base}/api/v1/auth/refresh"),
        None,
        json!({"refresh_token": laptop.refresh}),
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Revoking one session by its id (the `sid` of its tokens).
    let (_, list) = get(&format!("{base}/api/v1/auth/sessions"), Some(&phone.access)).await?;
    let tablet_sid = list["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["current"] == false))
        .and_then(|s| s["session_id"].as_str())
        .ok_or("the tablet's session")?
        .to_owned();
    let started = Instant::now();
    let status = delete(
        &format!("{base}/api/v1/auth/sessions/{tablet_sid}"),
        &phone.access,
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        closed(&mut tablet_ws, started).await?.0,
        CloseCode::Library(4003)
    );
    assert_eq!(
        delete(
            &format!("{base}/api/v1/auth/sessions/{tablet_sid}"),
            &phone.access
        )
        .await?,
        StatusCode::NOT_FOUND,
        "already revoked"
    );
    // Someone else's session is not found, not revoked.
    let bob_email = register(&api, "bob").await?;
    let bob = login(&api, &bob_email).await?;
    let (_, bobs) = get(&format!("{base}/api/v1/auth/sessions"), Some(&bob.access)).await?;
    let bob_sid = bobs["sessions"][0]["session_id"]
        .as_str()
        .ok_or("bob's session")?
        .to_owned();
    assert_eq!(
        delete(
            &format!("{base}/api/v1/auth/sessions/{bob_sid}"),
            &phone.access
        )
        .await?,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&format!("{base}/api/v1/rooms"), Some(&bob.access))
            .await?
            .0,
        StatusCode::OK
    );

    // Revoke all: the last socket closes too.
    let started = Instant::now();
    assert_eq!(
        delete(&format!("{base}/api/v1/auth/sessions"), &phone.access).await?,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        closed(&mut phone_ws, started).await?.0,
        CloseCode::Library(4003)
    );
    let (status, _) = get(&format!("{base}/api/v1/rooms"), Some(&phone.access)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    stack.app.stop().await
}

#[tokio::test]
async fn a_reused_refresh_token_revokes_its_session() -> TestResult {
    let stack = Embedded::start().await?;
    let api = stack.api();
    let base = stack.app.http();
    let email = register(&api, "ann").await?;
    let first = login(&api, &email).await?;
    let refresh = |token: String| {
        let url = format!("{}/api/v1/auth/refresh", stack.app.http());
        async move { post(&url, None, json!({"refresh_token": token})).await }
    };
    let (status, rotated) = refresh(first.refresh.clone()).await?;
    assert_eq!(status, StatusCode::OK);
    let second_access = str_of(&rotated, "access_token")?;
    let second_refresh = str_of(&rotated, "refresh_token")?;
    let mut socket = connect(&stack.app.ws(), &second_access).await?;

    // The first refresh token again: a thief or the owner replaying it.
    let started = Instant::now();
    let (status, body) = refresh(first.refresh).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_refresh_token"))
    );
    assert_eq!(
        closed(&mut socket, started).await?.0,
        CloseCode::Library(4003)
    );
    // The whole session is gone: the newer tokens too.
    let (status, _) = refresh(second_refresh).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = get(&format!("{base}/api/v1/rooms"), Some(&second_access)).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("session_revoked"))
    );
    stack.app.stop().await
}

#[tokio::test]
async fn revocations_reach_gateways_in_other_processes_and_late_starters() -> TestResult {
    let Some(stack) = Scaled::start_with(false, 1, 2).await? else {
        return Ok(());
    };
    let api = stack.api();
    let email = register(&api, "ann").await?;
    let ann = login(&api, &email).await?;
    let gateways = stack.gateway_urls();
    let mut far = connect(&gateways[1], &ann.access).await?;
    let started = Instant::now();
    let (status, _) = post(
        &format!("{}/api/v1/auth/logout", api.auth),
        Some(&ann.access),
        json!({}),
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (code, took) = closed(&mut far, started).await?;
    assert_eq!(code, CloseCode::Library(4003));
    eprintln!("logout to close frame on another gateway process: {took:?}");

    // A gateway that starts after the logout refuses the token too.
    let mut late = Running::start(stack.config.clone(), gateway_service::run).await?;
    late.ready().await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let refusal: Value = loop {
        let (status, body) =
            match tokio_tungstenite::connect_async(handshake(&late.ws(), &ann.access)?).await {
                Ok(_) => (101, Value::Null),
                Err(_) => refused(handshake(&late.ws(), &ann.access)?).await?,
            };
        if status == 401 {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the late gateway never learnt the revocation"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(refusal["error"], "session_revoked");
    late.stop().await?;
    stack.stop().await
}

#[tokio::test]
async fn a_password_change_ends_every_other_session() -> TestResult {
    let stack = Embedded::start().await?;
    let api = stack.api();
    let base = stack.app.http();
    let email = register(&api, "ann").await?;
    let (laptop, phone) = (login(&api, &email).await?, login(&api, &email).await?);
    let mut phone_ws = connect(&stack.app.ws(), &phone.access).await?;
    let change = |current: &str, new: &str| {
        let url = format!("{}/api/v1/auth/password", stack.app.http());
        let body = json!({"current_password": current, "new_password": new});
        let token = laptop.access.clone();
        async move { post(&url, Some(&token), body).await }
    };

    let (status, body) = change("not my password", "a brand new passphrase").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
    );
    let (status, body) = change("correct horse battery", "password123").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("password_too_common")
        )
    );
    let started = Instant::now();
    let (status, _) = change("correct horse battery", "a brand new passphrase").await?;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // The phone's session ended; the laptop's goes on.
    assert_eq!(
        closed(&mut phone_ws, started).await?.0,
        CloseCode::Library(4003)
    );
    let (status, _) = get(&format!("{base}/api/v1/rooms"), Some(&phone.access)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = get(&format!("{base}/api/v1/rooms"), Some(&laptop.access)).await?;
    assert_eq!(status, StatusCode::OK);
    let login_with = |password: &'static str| {
        let url = format!("{}/api/v1/auth/login", stack.app.http());
        let body = json!({"email": email.clone(), "password": password});
        async move { post(&url, None, body).await }
    };
    assert_eq!(
        login_with("correct horse battery").await?.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        login_with("a brand new passphrase").await?.0,
        StatusCode::OK
    );
    stack.app.stop().await
}
