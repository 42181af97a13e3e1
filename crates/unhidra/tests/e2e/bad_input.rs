//! Hostile and malformed input gets its documented refusal, and the server
//! keeps serving.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{
    Message, client::IntoClientRequest, http::HeaderValue, protocol::frame::coding::CloseCode,
};
use unhidra_core::{Config, token::AccessClaims};

use crate::harness::*;

async fn error_for(socket: &mut Socket, frame: Message) -> Result<Value, Error> {
    socket.send(frame).await?;
    let reply = next_of(socket, "error").await?;
    Ok(reply)
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_keeps_serving() -> TestResult {
    let stack = Embedded::start().await?;
    let api = stack.api();
    let alice = api.user("alice").await?;
    let mallory = api.user("mallory").await?;
    let private_room = api.create_room(&alice, "private").await?;
    let mut ws = connect(&stack.app.ws(), &mallory.token).await?;

    let e = error_for(&mut ws, Message::text("{not json")).await?;
    assert_eq!(
        (e["code"].as_str(), &e["id"]),
        (Some("invalid_frame"), &Value::Null)
    );

    let e = error_for(&mut ws, Message::text(r#"{"type":"teleport","id":"t1"}"#)).await?;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("unknown_type"), Some("t1"))
    );

    let e = error_for(
        &mut ws,
        Message::text(r#"{"type":"send","id":"t2","room":42,"body":"x"}"#),
    )
    .await?;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("invalid_frame"), Some("t2"))
    );

    let huge =
        json!({"type": "send", "id": "big", "room": private_room, "body": "x".repeat(512 * 1024)});
    let e = error_for(&mut ws, Message::text(huge.to_string())).await?;
    assert_eq!(e["code"], "too_large");

    let e = error_for(&mut ws, Message::binary(vec![0_u8, 159, 146, 150])).await?;
    assert_eq!(e["code"], "invalid_frame");

    let intrusion = json!({"type": "send", "id": "t3", "room": private_room, "body": "let me in"});
    let e = error_for(&mut ws, Message::text(intrusion.to_string())).await?;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("forbidden"), Some("t3"))
    );

    let nowhere =
        json!({"type": "send", "id": "t4", "room": uuid::Uuid::now_v7(), "body": "hello?"});
    let e = error_for(&mut ws, Message::text(nowhere.to_string())).await?;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("not_found"), Some("t4"))
    );

    let injection =
        json!({"type": "send", "id": "t5", "room": "'; DROP TABLE rooms; --", "body": "x"});
    let e = error_for(&mut ws, Message::text(injection.to_string())).await?;
    assert_eq!(e["code"], "invalid_frame");

    // Still serving, on the same connection.
    send(&mut ws, json!({"type": "ping", "id": "p"})).await?;
    assert_eq!(next_of(&mut ws, "pong").await?["id"], "p");
    // And nothing reached the private room.
    let (_, page) = api.history(&alice, &private_room, "").await?;
    assert_eq!(page["messages"], json!([]));
    stack.app.stop().await
}

#[tokio::test]
async fn a_frame_over_the_hard_limit_closes_with_1009() -> TestResult {
    let stack = Embedded::start_with(Config {
        max_frame_bytes: 1024,
        ..unhidra_testkit::config()
    })
    .await?;
    let alice = stack.api().user("alice").await?;
    let mut ws = connect(&stack.app.ws(), &alice.token).await?;
    ws.send(Message::text("x".repeat(64 * 1024))).await?;
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await? {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => return Err(format!("expected a close frame, got {other:?}").into()),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Size));
    // The server is fine.
    let mut again = connect(&stack.app.ws(), &alice.token).await?;
    send(&mut again, json!({"type": "ping"})).await?;
    next_of(&mut again, "pong").await?;
    stack.app.stop().await
}

fn sign(claims: &AccessClaims, kid: &str, der: &[u8]) -> Result<String, Error> {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    Ok(jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ed_der(der),
    )?)
}

#[tokio::test]
async fn hostile_tokens_and_origins_are_refused_before_the_upgrade() -> TestResult {
    let stack = Embedded::start_with(Config {
        allowed_origins: vec!["https://app.example".into()],
        ..unhidra_testkit::config()
    })
    .await?;
    let alice = stack.api().user("alice").await?;

    // The real signing key, as persisted by auth-api.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        stack.data_dir.join("auth-api.db").display()
    ))
    .await?;
    let (kid, pkcs8): (String, String) =
        sqlx::query_as("SELECT kid, private_key_pkcs8 FROM signing_keys")
            .fetch_one(&db)
            .await?;
    let real_key = base64::engine::general_purpose::STANDARD.decode(pkcs8)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let claims = AccessClaims {
        sub: alice.id.clone(),
        sid: uuid::Uuid::now_v7().to_string(),
        role: unhidra_core::users::SystemRole::Member,
        did: None,
        jti: uuid::Uuid::now_v7().to_string(),
        iat: now - 3600,
        exp: now - 600,
        iss: "unhidra".into(),
        aud: "unhidra".into(),
    };
    let expired = sign(&claims, &kid, &real_key)?;
    let fresh = AccessClaims {
        iat: now,
        exp: now + 600,
        ..claims.clone()
    };
    // Sanity: the same key and claims, unexpired, are accepted.
    connect(&stack.app.ws(), &sign(&fresh, &kid, &real_key)?).await?;

    let other_key =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| "keygen")?;
    let forged = sign(&fresh, &kid, other_key.as_ref())?;
    let wrong_audience = sign(
        &AccessClaims {
            aud: "elsewhere".into(),
            ..fresh.clone()
        },
        &kid,
        &real_key,
    )?;
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#)),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&fresh)?)
    );

    for (token, code) in [
        (expired.as_str(), "token_expired"),
        (forged.as_str(), "invalid_token"),
        (wrong_audience.as_str(), "invalid_token"),
        (unsigned.as_str(), "invalid_token"),
        ("not-a-jwt", "invalid_token"),
    ] {
        let mut request = stack.app.ws().into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        let (status, body) = refused(request).await?;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some(code)),
            "{token}"
        );
    }

    let (status, body) = refused(stack.app.ws().into_client_request()?).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthenticated"))
    );

    let mut request = stack.app.ws().into_client_request()?;
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", alice.token))?,
    );
    headers.insert("origin", HeaderValue::from_static("https://evil.example"));
    let (status, body) = refused(request).await?;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));

    let mut request = stack.app.ws().into_client_request()?;
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", alice.token))?,
    );
    headers.insert("origin", HeaderValue::from_static("https://app.example"));
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    send(&mut ws, json!({"type": "ping"})).await?;
    next_of(&mut ws, "pong").await?;
    stack.app.stop().await
}

#[tokio::test]
async fn http_apis_refuse_bad_input_with_stable_codes() -> TestResult {
    let stack = Embedded::start().await?;
    let api = stack.api();
    let base = stack.app.http();
    let register = format!("{base}/api/v1/auth/register");

    let response = http()
        .post(&register)
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await?["error"], "malformed_json");

    for body in [
        json!({"email": 42, "password": "long enough"}),
        json!({"email": "a@example.com"}),
        json!({"email": "not an email", "password": "long enough"}),
        json!({"email": "c@example.com", "password": "x".repeat(2000)}),
        json!({"email": "d@example.com", "password": "long enough", "display_name": ""}),
        json!({"email": "e@example.com", "password": "long enough", "admin": true}),
    ] {
        let (status, reply) = post(&register, None, body.clone()).await?;
        assert_eq!(
            (status, reply["error"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input")),
            "{body}"
        );
    }

    // The password policy answers with a code of its own.
    for (password, code) in [
        ("short", "password_too_short"),
        ("Password123", "password_too_common"),
        ("aaaaaaaaaaaa", "password_too_common"),
    ] {
        let body = json!({"email": "b@example.com", "password": password});
        let (status, reply) = post(&register, None, body).await?;
        assert_eq!(
            (status, reply["error"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(code)),
            "{password}"
        );
    }

    // SQL in strings is stored as text.
    let hostile = "Robert'); DROP TABLE users; --";
    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let (status, created) = post(
        &register,
        None,
        json!({"email": email, "password": "long enough", "display_name": hostile}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["display_name"], hostile);
    let (status, taken) = post(
        &register,
        None,
        json!({"email": email.to_uppercase(), "password": "long enough"}),
    )
    .await?;
    assert_eq!(
        (status, taken["error"].as_str()),
        (StatusCode::CONFLICT, Some("email_taken"))
    );

    let login = format!("{base}/api/v1/auth/login");
    let (status, body) = post(
        &login,
        None,
        json!({"email": email, "password": "wrong password"}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
    );
    let (status, body) = post(
        &login,
        None,
        json!({"email": "nobody@example.com", "password": "wrong password"}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
    );

    // Refresh tokens rotate: each works once.
    let (status, tokens) = post(
        &login,
        None,
        json!({"email": email, "password": "long enough"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (tokens["token_type"].as_str(), tokens["expires_in"].as_u64()),
        (Some("Bearer"), Some(900))
    );
    let refresh = format!("{base}/api/v1/auth/refresh");
    let (status, rotated) = post(
        &refresh,
        None,
        json!({"refresh_token": tokens["refresh_token"]}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_ne!(rotated["refresh_token"], tokens["refresh_token"]);
    let (status, reused) = post(
        &refresh,
        None,
        json!({"refresh_token": tokens["refresh_token"]}),
    )
    .await?;
    assert_eq!(
        (status, reused["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_refresh_token"))
    );

    // Rooms and history: authentication, membership, validation.
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let private_room = api.create_room(&alice, "private").await?;
    let (status, body) = post(
        &format!("{base}/api/v1/rooms"),
        None,
        json!({"name": "x", "visibility": "public"}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthenticated"))
    );
    let (status, body) = post(
        &format!("{base}/api/v1/rooms"),
        Some(&alice.token),
        json!({"name": "x", "visibility": "secret"}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input"))
    );
    let (status, body) = api.join(&bob, &private_room).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (status, body) = api.join(&bob, "not-a-room").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, body) = api.history(&bob, &private_room, "").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (status, body) = get(
        &format!("{base}/api/v1/rooms/{private_room}/messages"),
        None,
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthenticated"))
    );
    let (status, body) = api
        .history(&alice, &uuid::Uuid::now_v7().to_string(), "")
        .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    for query in ["?limit=0", "?limit=1000", "?limit=abc", "?before=-1"] {
        let (status, body) = api.history(&alice, &private_room, query).await?;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input")),
            "{query}"
        );
    }
    stack.app.stop().await
}
