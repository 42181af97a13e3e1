//! One public entry point when scaled out: the gateway routes every public
//! path to the service that owns it (the other scaled-out tests already go
//! through it for all their API calls), passes the client's address and the
//! request id on, answers `not_found` for a path nobody owns and
//! `unavailable` while the owner is down.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use unhidra_core::{
    Config,
    routes::{Upstream, owner},
};

use crate::harness::*;

#[test]
fn every_documented_path_is_routed_to_the_service_that_serves_it() {
    for (doc, service) in [
        (auth_api::openapi(), Upstream::AuthApi),
        (chat_service::openapi(), Upstream::Chat),
        (history_service::openapi(), Upstream::History),
    ] {
        assert!(!doc.paths.paths.is_empty());
        for path in doc.paths.paths.keys() {
            // Path parameters as a client fills them.
            let filled = path.replace('{', "x").replace('}', "");
            assert_eq!(owner(&filled), Some(service), "{path}");
        }
    }
}

#[tokio::test]
async fn the_gateway_passes_the_api_on_with_the_client_and_request_id() -> TestResult {
    let base = Config {
        trusted_proxies: vec!["127.0.0.1/32".parse()?],
        ..unhidra_testkit::config()
    };
    let Some(mut stack) = Scaled::start_configured(base, false, 1, 1).await? else {
        return Ok(());
    };
    let entry = stack.gateway.http();

    // Behind a trusted proxy that named the client: auth-api records that
    // client and the request id the caller gave, through the gateway.
    let email = unique_email("entry");
    let response = http()
        .post(format!("{entry}/api/v1/auth/register"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-request-id", "entry-register-1")
        .json(&json!({"email": email, "password": "correct horse battery"}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("entry-register-1")
    );
    let pool = sqlx::PgPool::connect(stack.db.url()).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let (client_ip, request_id) = loop {
        let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT client_ip, request_id FROM audit_events WHERE kind = 'user_registered'",
        )
        .fetch_optional(&pool)
        .await?;
        if let Some(row) = row {
            break row;
        }
        assert!(tokio::time::Instant::now() < deadline, "no audit event");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(client_ip.as_deref(), Some("203.0.113.9"));
    assert_eq!(request_id.as_deref(), Some("entry-register-1"));

    // A path nobody owns, and a traversal that would reach another service
    // (sent as written: an HTTP client library would resolve it first).
    let (status, body) = get(&format!("{entry}/api/v1/nothing"), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found", "{body}");
    let mut raw = tokio::net::TcpStream::connect(stack.gateway.address).await?;
    raw.write_all(b"GET /api/v1/rooms/%2e%2e/admin/users HTTP/1.0\r\n\r\n")
        .await?;
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await?;
    assert!(answer.starts_with("HTTP/1.0 404"), "{answer}");
    assert!(answer.contains(r#""error":"not_found""#), "{answer}");

    // The owner's own refusals come back as it gave them.
    let (status, body) = get(&format!("{entry}/api/v1/rooms"), None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "unauthenticated");

    let api = stack.api();
    let alice = api.user("alice").await?;

    // A body streamed without a length is refused at the API's limit (1 MiB
    // here), as a declared one is.
    let chunks = (0..32).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024]));
    let response = http()
        .post(format!("{entry}/api/v1/rooms"))
        .bearer_auth(&alice.token)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await?;
    assert_eq!(body["error"], "too_large", "{body}");

    // While history-service is down, its paths are unavailable; the rest is
    // served.
    let room = api.create_room(&alice, "public").await?;
    stack
        .history
        .take()
        .ok_or("history not running")?
        .stop()
        .await?;
    let (status, body) = get(
        &format!("{entry}/api/v1/rooms/{room}/messages"),
        Some(&alice.token),
    )
    .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "unavailable");
    let (status, mine) = get(&format!("{entry}/api/v1/rooms"), Some(&alice.token)).await?;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert_eq!(mine["rooms"][0]["room_id"], Value::String(room), "{mine}");
    stack.stop().await
}

#[tokio::test]
async fn a_request_through_the_gateway_spends_the_clients_budget_once() -> TestResult {
    // Shared limits: were the gateway to count a forwarded request as well
    // as the service that answers it, each would cost two.
    let Some(redis) = unhidra_testkit::redis_url().await else {
        return Ok(());
    };
    let base = Config {
        redis_url: Some(redis.into()),
        limit_http_ip: unhidra_core::rate::Rate::new(50, std::time::Duration::from_secs(60)),
        ..unhidra_testkit::config()
    };
    let Some(stack) = Scaled::start_configured(base, false, 1, 1).await? else {
        return Ok(());
    };
    let url = format!("{}/.well-known/jwks.json", stack.gateway.http());
    let mut left = Vec::new();
    for _ in 0..3 {
        let response = http().get(&url).send().await?;
        assert_eq!(response.status(), StatusCode::OK);
        let remaining = response
            .headers()
            .get("x-ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or("no X-RateLimit-Remaining")?;
        left.push(remaining);
    }
    assert_eq!(left, vec![left[0], left[0] - 1, left[0] - 2], "{left:?}");
    stack.stop().await
}
