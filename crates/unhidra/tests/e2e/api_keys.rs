//! API keys as a bot's developer and its owner meet them: a key is shown
//! once, lists never hold a secret, `X-API-Key` works wherever a bearer token
//! does (HTTP on every service, the WebSocket handshake) within the key's
//! scopes, a key cannot manage credentials, and revoking, rotating, expiry
//! and disabling the owner end it everywhere.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{http::HeaderValue, protocol::frame::coding::CloseCode},
};
use unhidra_core::{
    Config,
    clock::{ManualClock, SharedClock},
};

use crate::harness::*;

const ADMIN_EMAIL: &str = "keys-owner@example.com";
const ADMIN_PASSWORD: &str = "admin password three";

/// A request with the key in `X-API-Key`.
async fn with_key(
    method: Method,
    url: &str,
    key: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), Error> {
    let mut request = http().request(method, url).header("x-api-key", key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

async fn make_key(base: &str, token: &str, body: Value) -> Result<(StatusCode, Value), Error> {
    post(&format!("{base}/api/v1/api-keys"), Some(token), body).await
}

async fn new_key(base: &str, token: &str, scopes: &[&str]) -> Result<Value, Error> {
    let (status, body) = make_key(base, token, json!({"name": "bot", "scopes": scopes})).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    Ok(body)
}

fn error_of(answer: &(StatusCode, Value)) -> (StatusCode, Option<&str>) {
    (answer.0, answer.1["error"].as_str())
}

/// A WebSocket handshake with the key in `X-API-Key`.
fn key_handshake(
    ws_url: &str,
    key: &str,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = ws_url.into_client_request()?;
    let headers = request.headers_mut();
    headers.insert("x-api-key", HeaderValue::from_str(key)?);
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("unhidra.v1"),
    );
    Ok(request)
}

#[tokio::test]
async fn api_keys_act_for_their_owner_within_their_scopes() -> TestResult {
    on_each_store(api_keys_act_for_their_owner_within_their_scopes_on).await
}

async fn api_keys_act_for_their_owner_within_their_scopes_on(store: Store) -> TestResult {
    let stack = Embedded::start_with(on(
        &store,
        Config {
            bootstrap_admin_email: Some(ADMIN_EMAIL.into()),
            bootstrap_admin_password: Some(ADMIN_PASSWORD.to_owned().into()),
            ..unhidra_testkit::config()
        },
    ))
    .await?;
    let api = stack.api();
    let base = stack.app.http();
    let alice = api.user("alice").await?;

    // Made with an access token; the key is in this answer only.
    let created = new_key(&base, &alice.token, &["read", "write"]).await?;
    let key = str_of(&created, "key")?;
    let prefix = str_of(&created, "prefix")?;
    assert!(key.starts_with(&format!("uhk_{prefix}_")), "{created}");
    assert_eq!(created["scopes"], json!(["read", "write"]));
    let (status, list) = get(&format!("{base}/api/v1/api-keys"), Some(&alice.token)).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["api_keys"][0]["prefix"], prefix.as_str());
    assert!(
        !list.to_string().contains(&key[prefix.len() + 5..]),
        "{list}"
    );
    assert!(list["api_keys"][0].get("key").is_none());

    // Bad requests.
    for (body, code) in [
        (json!({"name": "x", "scopes": ["root"]}), "invalid_input"),
        (json!({"name": "x", "scopes": []}), "invalid_input"),
        (json!({"name": " ", "scopes": ["read"]}), "invalid_input"),
        (
            json!({"name": "x", "scopes": ["read"], "expires_in_secs": 1}),
            "invalid_input",
        ),
        (json!({"name": "x", "scopes": ["admin"]}), "forbidden"),
    ] {
        let answer = make_key(&base, &alice.token, body.clone()).await?;
        assert_eq!(answer.1["error"], code, "{body}: {}", answer.1);
    }

    // The key acts as alice on every service, within its scopes.
    let (status, me) =
        with_key(Method::GET, &format!("{base}/api/v1/users/me"), &key, None).await?;
    assert_eq!(
        (status, me["user_id"].as_str()),
        (StatusCode::OK, Some(alice.id.as_str()))
    );
    let (status, room) = with_key(
        Method::POST,
        &format!("{base}/api/v1/rooms"),
        &key,
        Some(json!({"name": "bots", "visibility": "public"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{room}");
    let room = str_of(&room, "room_id")?;
    let reader = str_of(&new_key(&base, &alice.token, &["read"]).await?, "key")?;
    let history = format!("{base}/api/v1/rooms/{room}/messages");
    assert_eq!(
        with_key(Method::GET, &history, &reader, None).await?.0,
        StatusCode::OK
    );
    let answer = with_key(
        Method::POST,
        &format!("{base}/api/v1/rooms"),
        &reader,
        Some(json!({"name": "nope", "visibility": "public"})),
    )
    .await?;
    assert_eq!(
        error_of(&answer),
        (StatusCode::FORBIDDEN, Some("insufficient_scope"))
    );

    // No key manages credentials, its own or others.
    for (method, path) in [
        (Method::GET, "/api/v1/api-keys"),
        (Method::POST, "/api/v1/auth/logout"),
        (Method::GET, "/api/v1/auth/sessions"),
        (Method::POST, "/api/v1/users/me/deletion"),
    ] {
        let answer = with_key(method, &format!("{base}{path}"), &key, Some(json!({}))).await?;
        assert_eq!(
            error_of(&answer),
            (StatusCode::FORBIDDEN, Some("api_key_not_allowed")),
            "{path}"
        );
    }

    // Hostile and ambiguous credentials.
    // A guess at the secret of a key whose prefix is known (an unused one):
    // refused, and the key does not count as used.
    let unused = new_key(&base, &alice.token, &["read"]).await?;
    let forged = format!("uhk_{}_{}", str_of(&unused, "prefix")?, "A".repeat(43));
    for bad in ["uhk_nope", "' OR 1=1 --", forged.as_str()] {
        let answer = with_key(Method::GET, &format!("{base}/api/v1/users/me"), bad, None).await?;
        assert_eq!(
            error_of(&answer),
            (StatusCode::UNAUTHORIZED, Some("invalid_token")),
            "{bad}"
        );
    }
    let (_, list) = get(&format!("{base}/api/v1/api-keys"), Some(&alice.token)).await?;
    let last_used = |id: &Value| {
        list["api_keys"]
            .as_array()
            .and_then(|keys| keys.iter().find(|k| k["id"] == *id))
            .map(|k| k["last_used_at"].clone())
    };
    assert_eq!(last_used(&unused["id"]), Some(Value::Null), "{list}");
    assert!(
        last_used(&created["id"]).is_some_and(|at| at.is_string()),
        "the key in use has a last use: {list}"
    );
    let revoke_unused = http()
        .delete(format!("{base}/api/v1/api-keys/{}", str_of(&unused, "id")?))
        .bearer_auth(&alice.token)
        .send()
        .await?;
    assert_eq!(revoke_unused.status(), StatusCode::NO_CONTENT);
    let both = http()
        .get(format!("{base}/api/v1/users/me"))
        .header("x-api-key", &key)
        .bearer_auth(&alice.token)
        .send()
        .await?;
    assert_eq!(both.status(), StatusCode::UNAUTHORIZED);

    // WebSockets: a key with `read` connects; sending needs `write`.
    let ws = stack.app.ws();
    let (mut bot, _) = connect_async(key_handshake(&ws, &key)?).await?;
    send(
        &mut bot,
        json!({"type": "send", "id": "b-1", "room": room, "body": "beep"}),
    )
    .await?;
    assert_eq!(next_of(&mut bot, "ack").await?["id"], "b-1");
    let (mut watcher, _) = connect_async(key_handshake(&ws, &reader)?).await?;
    send(
        &mut watcher,
        json!({"type": "send", "id": "w-1", "room": room, "body": "no"}),
    )
    .await?;
    let refused_send = next_of(&mut watcher, "error").await?;
    assert_eq!(
        (&refused_send["id"], &refused_send["code"]),
        (&json!("w-1"), &json!("forbidden"))
    );
    let writer = str_of(&new_key(&base, &alice.token, &["write"]).await?, "key")?;
    let (status, body) = refused(key_handshake(&ws, &writer)?).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("insufficient_scope"))
    );

    // Revoking closes its sockets within a second and refuses it everywhere.
    let id = str_of(&created, "id")?;
    let started = Instant::now();
    let status = http()
        .delete(format!("{base}/api/v1/api-keys/{id}"))
        .bearer_auth(&alice.token)
        .send()
        .await?
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (code, took) = closed(&mut bot, started).await?;
    assert_eq!(code, CloseCode::Library(4003));
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    let answer = with_key(Method::GET, &format!("{base}/api/v1/users/me"), &key, None).await?;
    assert_eq!(answer.0, StatusCode::UNAUTHORIZED, "{}", answer.1);
    let (status, _) = refused(key_handshake(&ws, &key)?).await?;
    assert_eq!(status, 401);
    let again = http()
        .delete(format!("{base}/api/v1/api-keys/{id}"))
        .bearer_auth(&alice.token)
        .send()
        .await?;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    // Rotation: at once by default, or with a grace period.
    let (_, list) = get(&format!("{base}/api/v1/api-keys"), Some(&alice.token)).await?;
    let reader_id = list["api_keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["scopes"] == json!(["read"])))
        .and_then(|k| k["id"].as_str())
        .ok_or("the read key")?
        .to_owned();
    let (status, rotated) = post(
        &format!("{base}/api/v1/api-keys/{reader_id}/rotate"),
        Some(&alice.token),
        json!({}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{rotated}");
    assert_eq!(rotated["scopes"], json!(["read"]));
    let new_reader = str_of(&rotated, "key")?;
    let me_url = format!("{base}/api/v1/users/me");
    assert_eq!(
        with_key(Method::GET, &me_url, &new_reader, None).await?.0,
        StatusCode::OK
    );
    assert_eq!(
        with_key(Method::GET, &me_url, &reader, None).await?.0,
        StatusCode::UNAUTHORIZED
    );
    let new_id = str_of(&rotated, "id")?;
    let (status, graced) = post(
        &format!("{base}/api/v1/api-keys/{new_id}/rotate"),
        Some(&alice.token),
        json!({"grace_secs": 3600}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{graced}");
    assert_eq!(
        with_key(Method::GET, &me_url, &new_reader, None).await?.0,
        StatusCode::OK
    );
    assert_eq!(
        with_key(Method::GET, &me_url, &str_of(&graced, "key")?, None)
            .await?
            .0,
        StatusCode::OK
    );

    // Admin keys: for admins only, and only with the admin scope.
    let (_, login) = post(
        &format!("{base}/api/v1/auth/login"),
        None,
        json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
    )
    .await?;
    let admin = str_of(&login, "access_token")?;
    let admin_key = str_of(&new_key(&base, &admin, &["read", "admin"]).await?, "key")?;
    let plain_key = str_of(&new_key(&base, &admin, &["read"]).await?, "key")?;
    let users = format!("{base}/api/v1/admin/users");
    assert_eq!(
        with_key(Method::GET, &users, &admin_key, None).await?.0,
        StatusCode::OK
    );
    let answer = with_key(Method::GET, &users, &plain_key, None).await?;
    assert_eq!(
        error_of(&answer),
        (StatusCode::FORBIDDEN, Some("insufficient_scope"))
    );

    // Disabling the owner ends their keys.
    let (status, _) = with_key(
        Method::PATCH,
        &format!("{base}/api/v1/admin/users/{}", alice.id),
        &admin_key,
        Some(json!({"disabled": true})),
    )
    .await?;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the admin key has no write scope"
    );
    let change = http()
        .patch(format!("{base}/api/v1/admin/users/{}", alice.id))
        .bearer_auth(&admin)
        .json(&json!({"disabled": true}))
        .send()
        .await?;
    assert_eq!(change.status(), StatusCode::OK);
    assert_eq!(
        with_key(Method::GET, &me_url, &new_reader, None).await?.0,
        StatusCode::UNAUTHORIZED
    );

    let created = wait_for_audit(&stack, "api_key_created", 1).await?;
    assert!(
        created.iter().any(|e| e["subject"] == prefix.as_str()),
        "{created:?}"
    );
    wait_for_audit(&stack, "api_key_revoked", 1).await?;
    wait_for_audit(&stack, "api_key_rotated", 2).await?;
    stack.app.stop().await
}

#[tokio::test]
async fn an_expired_api_key_is_refused_and_no_longer_listed() -> TestResult {
    on_each_store(an_expired_api_key_is_refused_and_no_longer_listed_on).await
}

async fn an_expired_api_key_is_refused_and_no_longer_listed_on(store: Store) -> TestResult {
    let clock = Arc::new(ManualClock::starting_at(Duration::from_secs(1_800_000_000)));
    let shared: SharedClock = clock.clone();
    let stack = Embedded::start_on_clock(on(&store, unhidra_testkit::config()), shared).await?;
    let base = stack.app.http();
    let bob = stack.api().user("bob").await?;
    let (status, created) = make_key(
        &base,
        &bob.token,
        json!({"name": "short", "scopes": ["read"], "expires_in_secs": 60}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    clock.advance(Duration::from_secs(61));
    let answer = with_key(
        Method::GET,
        &format!("{base}/api/v1/users/me"),
        &str_of(&created, "key")?,
        None,
    )
    .await?;
    assert_eq!(
        error_of(&answer),
        (StatusCode::UNAUTHORIZED, Some("invalid_token"))
    );
    let (_, list) = get(&format!("{base}/api/v1/api-keys"), Some(&bob.token)).await?;
    assert_eq!(list["api_keys"], json!([]));
    stack.app.stop().await
}

#[tokio::test]
async fn api_keys_work_on_services_in_other_processes_until_revoked() -> TestResult {
    let Some(stack) = Scaled::start_with(false, 1, 2).await? else {
        return Ok(());
    };
    let api = stack.api();
    let carol = api.user("carol").await?;
    let created = new_key(&api.auth, &carol.token, &["read", "write"]).await?;
    let key = str_of(&created, "key")?;

    // chat-service and the second gateway, separate instances that reach
    // auth-api over NATS only, ask it about the key.
    let (status, room) = with_key(
        Method::POST,
        &format!("{}/api/v1/rooms", api.chat),
        &key,
        Some(json!({"name": "far", "visibility": "public"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{room}");
    let gateways = stack.gateway_urls();
    let (mut far, _) = connect_async(key_handshake(&gateways[1], &key)?).await?;
    send(&mut far, json!({"type": "ping", "id": "p"})).await?;
    assert_eq!(next_of(&mut far, "pong").await?["id"], "p");

    let started = Instant::now();
    let status = http()
        .delete(format!(
            "{}/api/v1/api-keys/{}",
            api.auth,
            str_of(&created, "id")?
        ))
        .bearer_auth(&carol.token)
        .send()
        .await?
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (code, took) = closed(&mut far, started).await?;
    assert_eq!(code, CloseCode::Library(4003));
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    let answer = with_key(
        Method::GET,
        &format!("{}/api/v1/rooms", api.chat),
        &key,
        None,
    )
    .await?;
    assert_eq!(answer.0, StatusCode::UNAUTHORIZED, "{}", answer.1);
    stack.stop().await
}
