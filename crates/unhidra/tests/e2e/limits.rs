//! The limits layer as a client meets it: 429 with `Retry-After` and the
//! `X-RateLimit-*` headers on every limited route, client addresses from
//! trusted proxies only, limits shared through Redis by two processes, body
//! limits that refuse before reading, a bounded password-hashing queue, and
//! a header timeout that cuts slow clients off.

use std::time::Duration;

use reqwest::{StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use unhidra_core::{Config, rate::Rate};

use crate::harness::*;

fn per_minute(count: u32) -> Rate {
    Rate::new(count, Duration::from_secs(60))
}

/// Status, rate-limit headers and body of a login attempt from `forwarded_for`
/// (if any).
async fn login(
    base: &str,
    email: &str,
    forwarded_for: Option<&str>,
) -> Result<(StatusCode, HeaderMap, Value), Error> {
    let mut request = http()
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": email, "password": "not the password"}));
    if let Some(ip) = forwarded_for {
        request = request.header("x-forwarded-for", ip);
    }
    let response = request.send().await?;
    let (status, headers) = (response.status(), response.headers().clone());
    Ok((
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    ))
}

async fn register(base: &str, n: u32) -> Result<(StatusCode, Value), Error> {
    let email = format!("r{n}-{}@example.com", uuid::Uuid::new_v4().simple());
    post(
        &format!("{base}/api/v1/auth/register"),
        None,
        json!({"email": email, "password": "correct horse battery"}),
    )
    .await
}

fn header(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

#[tokio::test]
async fn login_and_register_are_limited_per_ip_with_headers() -> TestResult {
    let stack = Embedded::start_with(Config {
        limit_login_ip: per_minute(5),
        limit_register_ip: per_minute(3),
        ..unhidra_testkit::config()
    })
    .await?;
    let base = stack.app.http();
    for attempt in 0..5_u64 {
        let email = format!("nobody{attempt}@example.com");
        let (status, headers, _) = login(&base, &email, None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
        assert_eq!(header(&headers, "x-ratelimit-limit"), Some(5));
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(4 - attempt));
        assert!(header(&headers, "x-ratelimit-reset").is_some_and(|s| s <= 60));
    }
    let (status, headers, body) = login(&base, "nobody@example.com", None).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(0));
    let retry = header(&headers, "retry-after").ok_or("Retry-After")?;
    assert!(
        (1..=12).contains(&retry),
        "one login back within 12 s: {retry}"
    );

    for n in 0..3 {
        assert_eq!(register(&base, n).await?.0, StatusCode::CREATED);
    }
    let (status, body) = register(&base, 3).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );

    let (_, metrics) = get_text(&format!("{base}/metrics")).await?;
    assert!(
        metrics.contains(
            r#"unhidra_rate_limit_decisions_total{limit="login_ip",outcome="limited"} 1"#
        ),
        "{metrics}"
    );
    let (_, ready) = get(&format!("{base}/readyz"), None).await?;
    assert_eq!(ready["checks"]["rate_limits"], "local");
    stack.app.stop().await
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() -> TestResult {
    let limited = |trusted: &str| -> Result<Config, Error> {
        Ok(Config {
            limit_login_ip: per_minute(1),
            trusted_proxies: vec![trusted.parse()?],
            ..unhidra_testkit::config()
        })
    };
    // The test client is 127.0.0.1: as a trusted proxy, it names clients.
    let behind_proxy = Embedded::start_with(limited("127.0.0.0/8")?).await?;
    let base = behind_proxy.app.http();
    for client in ["203.0.113.7", "203.0.113.8"] {
        let (status, ..) = login(&base, "a@example.com", Some(client)).await?;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{client} has its own budget"
        );
    }
    let (status, ..) = login(&base, "a@example.com", Some("203.0.113.7")).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    behind_proxy.app.stop().await?;

    // Not trusted: the header is the client's own claim and is ignored.
    let exposed = Embedded::start_with(limited("10.0.0.0/8")?).await?;
    let base = exposed.app.http();
    let (status, ..) = login(&base, "a@example.com", Some("203.0.113.7")).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, ..) = login(&base, "a@example.com", Some("203.0.113.8")).await?;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "one budget for 127.0.0.1"
    );
    exposed.app.stop().await
}

#[tokio::test]
async fn two_processes_sharing_redis_enforce_one_login_limit() -> TestResult {
    let Some(redis) = unhidra_testkit::redis_url().await else {
        return Ok(());
    };
    let config = Config {
        redis_url: Some(redis.into()),
        bus_prefix: unhidra_testkit::unique_prefix(),
        limit_login_ip: per_minute(5),
        ..unhidra_testkit::config()
    };
    let first = Embedded::start_with(config.clone()).await?;
    let second = Embedded::start_with(config).await?;
    let (a, b) = (first.app.http(), second.app.http());
    for attempt in 0..5 {
        let base = if attempt % 2 == 0 { &a } else { &b };
        let (status, ..) = login(base, "x@example.com", None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    for base in [&a, &b] {
        let (status, headers, _) = login(base, "x@example.com", None).await?;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "6th on {base}");
        assert!(headers.contains_key("retry-after"));
    }
    let (_, ready) = get(&format!("{a}/readyz"), None).await?;
    assert_eq!(ready["checks"]["rate_limits"], "redis");
    first.app.stop().await?;
    second.app.stop().await
}

#[tokio::test]
async fn authenticated_requests_have_a_per_user_budget() -> TestResult {
    let stack = Embedded::start_with(Config {
        limit_http_user: per_minute(3),
        ..unhidra_testkit::config()
    })
    .await?;
    let api = stack.api();
    let (alice, bob) = (api.user("alice").await?, api.user("bob").await?);
    let rooms = format!("{}/api/v1/rooms", stack.app.http());
    for _ in 0..3 {
        assert_eq!(get(&rooms, Some(&alice.token)).await?.0, StatusCode::OK);
    }
    let (status, body) = get(&rooms, Some(&alice.token)).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    assert_eq!(
        get(&rooms, Some(&bob.token)).await?.0,
        StatusCode::OK,
        "bob has his own"
    );
    stack.app.stop().await
}

#[tokio::test]
async fn websocket_handshakes_are_limited_per_ip() -> TestResult {
    let stack = Embedded::start_with(Config {
        limit_ws_connect_ip: per_minute(2),
        ..unhidra_testkit::config()
    })
    .await?;
    let alice = stack.api().user("alice").await?;
    let _first = connect(&stack.app.ws(), &alice.token).await?;
    let _second = connect(&stack.app.ws(), &alice.token).await?;
    let (status, body) = refused(handshake(&stack.app.ws(), &alice.token)?).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    stack.app.stop().await
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_they_are_read() -> TestResult {
    let stack = Embedded::start().await?;
    let address = stack.app.address;
    // A declared 10 MiB body: 413 comes back although none of it was sent.
    let mut tcp = tokio::net::TcpStream::connect(address).await?;
    tcp.write_all(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n",
    )
    .await?;
    let mut head = vec![0_u8; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut head)).await??;
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains(r#""error":"too_large""#), "{head}");

    // A streamed body with no length stops being read at the auth limit.
    let mut tcp = tokio::net::TcpStream::connect(address).await?;
    tcp.write_all(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await?;
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    for _ in 0..64 {
        if tcp.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut head = vec![0_u8; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut head)).await??;
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains(r#""error":"too_large""#), "{head}");
    stack.app.stop().await
}

#[tokio::test]
async fn a_login_flood_is_refused_early_and_health_keeps_answering() -> TestResult {
    // The binary in its own process, so its resident memory is its own.
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut process = std::process::Command::new(env!("CARGO_BIN_EXE_unhidra"))
        .env("UNHIDRA_BIND", format!("127.0.0.1:{port}"))
        .env("UNHIDRA_DATA_DIR", dir.path())
        .env("UNHIDRA_PASSWORD_HASH_CONCURRENCY", "1")
        .env("UNHIDRA_PASSWORD_HASH_QUEUE", "2")
        .env("UNHIDRA_LIMIT_LOGIN_IP", "off")
        .env("UNHIDRA_LIMIT_LOGIN_ACCOUNT", "off")
        .env("UNHIDRA_LIMIT_HTTP_IP", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let outcome = login_flood(&format!("http://127.0.0.1:{port}"), process.id()).await;
    process.kill()?;
    process.wait()?;
    outcome
}

async fn login_flood(base: &str, pid: u32) -> TestResult {
    wait_ready(base).await?;
    let idle = resident_bytes(pid)?;

    // 300 concurrent logins with 1 MiB passwords: refused by the body limit
    // before the body is read, while /healthz keeps answering.
    let huge = json!({"email": "a@example.com", "password": "p".repeat(1024 * 1024)}).to_string();
    let floods = (0..300).map(|_| {
        let (base, huge) = (base.to_owned(), huge.clone());
        tokio::spawn(async move {
            let response = http()
                .post(format!("{base}/api/v1/auth/login"))
                .header("content-type", "application/json")
                .body(huge)
                .send()
                .await;
            match response {
                Ok(response) => Some(response.status()),
                // Refused before the body was read: the server may close
                // while the client still writes it.
                Err(e) if e.is_request() || e.is_body() => None,
                Err(e) => panic!("login flood: {e}"),
            }
        })
    });
    let health = {
        let base = base.to_owned();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for _ in 0..20 {
                let started = std::time::Instant::now();
                let answered = tokio::time::timeout(
                    Duration::from_secs(2),
                    get(&format!("{base}/healthz"), None),
                )
                .await;
                if !matches!(answered, Ok(Ok((StatusCode::OK, _)))) {
                    return None;
                }
                slowest = slowest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(slowest)
        })
    };
    let mut refused = 0;
    for flood in futures::future::join_all(floods).await {
        match flood? {
            Some(status) => {
                assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
                refused += 1;
            }
            None => refused += 1,
        }
    }
    assert_eq!(refused, 300);
    let slowest = health.await?.ok_or("/healthz did not answer throughout")?;
    // A figure for the issue and docs, not an assertion: this machine is shared.
    eprintln!("slowest /healthz during the flood: {slowest:?}");
    let grown = resident_bytes(pid)?.saturating_sub(idle);
    assert!(
        grown < 50 * 1024 * 1024,
        "resident memory grew by {grown} bytes"
    );

    // Passwords of a valid size beyond the hashing queue: 503 at once.
    let logins = (0..20).map(|_| {
        let base = base.to_owned();
        tokio::spawn(async move {
            let response = http()
                .post(format!("{base}/api/v1/auth/login"))
                .json(&json!({"email": "nobody@example.com", "password": "wrong password"}))
                .send()
                .await?;
            let retry = response.headers().get("retry-after").cloned();
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            Ok::<_, Error>((status, body["error"].clone(), retry))
        })
    });
    let mut overloaded = 0;
    for login in futures::future::join_all(logins).await {
        let (status, error, retry) = login??;
        match status {
            StatusCode::UNAUTHORIZED => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                overloaded += 1;
                assert_eq!(error, "overloaded");
                assert!(retry.is_some(), "503 says when to retry");
            }
            other => return Err(format!("unexpected {other}").into()),
        }
    }
    assert!(
        overloaded > 0,
        "some of 20 concurrent logins found the queue full"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_sending_headers_slowly_is_cut_off() -> TestResult {
    let stack = Embedded::start_with(Config {
        http_header_timeout_secs: 1,
        ..unhidra_testkit::config()
    })
    .await?;
    let mut tcp = tokio::net::TcpStream::connect(stack.app.address).await?;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\n").await?;
    // One header byte every 300 ms, never finishing: the server must end
    // the connection (answering 408 or not) instead of waiting forever.
    let trickle = async {
        loop {
            if tcp.write_all(b"a").await.is_err() {
                return;
            }
            let mut buf = [0_u8; 256];
            match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(n)) => {
                    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
                    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
                    return;
                }
                Err(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, trickle)
        .await
        .map_err(|_| "a client trickling headers was still connected after 10 s")?;
    stack.app.stop().await
}

/// A process's resident memory.
fn resident_bytes(pid: u32) -> Result<u64, Error> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or("statm")?;
    Ok(pages * 4096)
}

async fn get_text(url: &str) -> Result<(StatusCode, String), Error> {
    let response = http().get(url).send().await?;
    Ok((response.status(), response.text().await?))
}

#[tokio::test]
async fn a_websocket_flood_gets_error_frames_then_1008_while_the_room_keeps_flowing() -> TestResult
{
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

    let stack = Embedded::start_with(Config {
        limit_ws_frames: Rate::new(10, Duration::from_secs(1)),
        ..unhidra_testkit::config()
    })
    .await?;
    let api = stack.api();
    let (alice, bob, mallory) = (
        api.user("alice").await?,
        api.user("bob").await?,
        api.user("mallory").await?,
    );
    let room = api.create_room(&alice, "public").await?;
    for user in [&bob, &mallory] {
        assert_eq!(api.join(user, &room).await?.0, StatusCode::OK);
    }
    let mut flood = connect(&stack.app.ws(), &mallory.token).await?;
    let mut talker = connect(&stack.app.ws(), &alice.token).await?;
    let mut listener = connect(&stack.app.ws(), &bob.token).await?;

    // Over the limit: error frames that say when to retry.
    for i in 0..15 {
        send(&mut flood, json!({"type": "ping", "id": format!("p{i}")})).await?;
    }
    let mut pongs = 0;
    let mut limited = Vec::new();
    for _ in 0..15 {
        let frame = next_frame(&mut flood).await?;
        match frame["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => limited.push(frame),
            _ => return Err(format!("unexpected {frame}").into()),
        }
    }
    assert!(pongs >= 10, "the burst was answered: {pongs}");
    assert!(!limited.is_empty(), "frames past the burst were refused");
    for e in &limited {
        assert_eq!(e["code"], "rate_limited");
        assert!(
            e["retry_after_ms"]
                .as_u64()
                .is_some_and(|ms| (1..=1000).contains(&ms)),
            "{e}"
        );
    }
    // Still usable once the client waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&mut flood, json!({"type": "ping", "id": "after"})).await?;
    assert_eq!(next_of(&mut flood, "pong").await?["id"], "after");

    // Keeping on far past the limit: closed with 1008, while the room flows.
    let (mut flood_sink, mut flood_stream) = flood.split();
    let flooding = tokio::spawn(async move {
        for i in 0..500 {
            let ping = json!({"type": "ping", "id": format!("f{i}")}).to_string();
            if flood_sink.send(Message::text(ping)).await.is_err() {
                break;
            }
        }
    });
    send(
        &mut talker,
        json!({"type": "send", "id": "m1", "room": room, "body": "still here"}),
    )
    .await?;
    let delivered = next_of(&mut listener, "message").await?;
    assert_eq!(delivered["body"], "still here");
    let close = loop {
        match tokio::time::timeout(WAIT, flood_stream.next()).await? {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => return Err(format!("no close frame: {other:?}").into()),
        }
    };
    let _ = flooding.await;
    let close = close.ok_or("close frame without a code")?;
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "rate limit exceeded");
    stack.app.stop().await
}

#[tokio::test]
async fn open_connections_per_user_are_capped() -> TestResult {
    let stack = Embedded::start_with(Config {
        ws_connections_per_user: 2,
        ..unhidra_testkit::config()
    })
    .await?;
    let alice = stack.api().user("alice").await?;
    let first = connect(&stack.app.ws(), &alice.token).await?;
    let _second = connect(&stack.app.ws(), &alice.token).await?;
    let alice_handshake = || handshake(&stack.app.ws(), &alice.token);
    let (status, body) = refused(alice_handshake()?).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    // A closed connection gives its place back.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio_tungstenite::connect_async(alice_handshake()?).await {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("the place never came back: {e}").into()),
        }
    }
    stack.app.stop().await
}

/// A clock the test moves, starting now.
fn manual_clock() -> std::sync::Arc<unhidra_core::clock::ManualClock> {
    use unhidra_core::clock::{Clock, ManualClock, SystemClock};
    std::sync::Arc::new(ManualClock::starting_at(SystemClock.now()))
}

/// A login with `password`, from the test client.
async fn login_with(
    base: &str,
    email: &str,
    password: &str,
) -> Result<(StatusCode, HeaderMap, Value), Error> {
    let response = http()
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await?;
    let (status, headers) = (response.status(), response.headers().clone());
    Ok((
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    ))
}

#[tokio::test]
async fn failed_logins_lock_the_account_with_growing_times() -> TestResult {
    on_each_store(failed_logins_lock_the_account_with_growing_times_on).await
}

async fn failed_logins_lock_the_account_with_growing_times_on(store: Store) -> TestResult {
    let clock = manual_clock();
    let stack = Embedded::start_on_clock(
        on(
            &store,
            Config {
                lockout_failures: 3,
                lockout_secs: 60,
                lockout_max_secs: 3600,
                ..unhidra_testkit::config()
            },
        ),
        clock.clone(),
    )
    .await?;
    let base = stack.app.http();
    let email = format!("ann-{}@example.com", uuid::Uuid::new_v4().simple());
    let password = "correct horse battery";
    let (status, _) = post(
        &format!("{base}/api/v1/auth/register"),
        None,
        json!({"email": email, "password": password}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED);

    for _ in 0..3 {
        let (status, ..) = login_with(&base, &email, "wrong password").await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Locked: even the right password is refused, with when to come back.
    let (status, headers, body) = login_with(&base, &email, password).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::LOCKED, Some("account_locked"))
    );
    assert_eq!(header(&headers, "retry-after"), Some(60));

    clock.advance(Duration::from_secs(61));
    for _ in 0..3 {
        let (status, ..) = login_with(&base, &email, "wrong again").await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, headers, _) = login_with(&base, &email, password).await?;
    assert_eq!(status, StatusCode::LOCKED);
    assert_eq!(
        header(&headers, "retry-after"),
        Some(120),
        "the second lock is twice as long"
    );

    clock.advance(Duration::from_secs(121));
    let (status, ..) = login_with(&base, &email, password).await?;
    assert_eq!(status, StatusCode::OK, "the lock expired");

    let (_, metrics) = get_text(&format!("{base}/metrics")).await?;
    assert!(
        metrics.contains("unhidra_account_lockouts_total 2"),
        "{metrics}"
    );
    let audit = wait_for_audit(&stack, "account_locked", 2).await?;
    assert!(
        audit[0]["detail"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("3 failed logins in a row")),
        "{audit:?}"
    );
    stack.app.stop().await
}

#[tokio::test]
async fn failed_logins_block_the_address_in_stages() -> TestResult {
    let clock = manual_clock();
    let stack = Embedded::start_on_clock(
        Config {
            ip_block_failures: 5,
            ip_block_window_secs: 900,
            ip_block_secs: 900,
            ip_block_long_failures: 10,
            ip_block_long_window_secs: 86_400,
            ip_block_long_secs: 86_400,
            ..unhidra_testkit::config()
        },
        clock.clone(),
    )
    .await?;
    let base = stack.app.http();
    let alice = stack.api().user("alice").await?;
    for attempt in 0..5 {
        let (status, ..) = login(&base, &format!("guess{attempt}@example.com"), None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    // Blocked on every route, the WebSocket handshake included.
    let (status, headers, body) = login(&base, "guess@example.com", None).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("ip_blocked"))
    );
    assert_eq!(header(&headers, "retry-after"), Some(900));
    let rooms = format!("{base}/api/v1/rooms");
    assert_eq!(
        get(&rooms, Some(&alice.token)).await?.0,
        StatusCode::FORBIDDEN
    );
    let (status, body) = refused(handshake(&stack.app.ws(), &alice.token)?).await?;
    assert_eq!((status, body["error"].as_str()), (403, Some("ip_blocked")));
    // Health and metrics stay reachable for the operator.
    assert_eq!(
        get(&format!("{base}/healthz"), None).await?.0,
        StatusCode::OK
    );

    // The block ends; five more failures within the day: the long block.
    clock.advance(Duration::from_secs(901));
    assert_eq!(get(&rooms, Some(&alice.token)).await?.0, StatusCode::OK);
    for _ in 0..5 {
        let (status, ..) = login(&base, "guess@example.com", None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, headers, _) = login(&base, "guess@example.com", None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(header(&headers, "retry-after"), Some(86_400));
    clock.advance(Duration::from_secs(86_401));
    assert_eq!(get(&rooms, Some(&alice.token)).await?.0, StatusCode::OK);

    let audit = wait_for_audit(&stack, "ip_blocked", 2).await?;
    let messages: Vec<&str> = audit
        .iter()
        .filter_map(|e| e["detail"]["message"].as_str())
        .collect();
    assert!(
        messages.contains(&"5 invalid login attempts from 127.0.0.1"),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"10 invalid login attempts from 127.0.0.1"),
        "{messages:?}"
    );
    stack.app.stop().await
}

/// The audit events of `kind` in the embedded stack's audit database, once
/// there are `count` of them (oldest first).
#[tokio::test]
async fn a_users_messages_are_limited_across_two_gateways_sharing_redis() -> TestResult {
    let Some(redis) = unhidra_testkit::redis_url().await else {
        return Ok(());
    };
    let base = Config {
        redis_url: Some(redis.into()),
        limit_messages_user: per_minute(5),
        ..unhidra_testkit::config()
    };
    let Some(stack) = Scaled::start_configured(base, false, 1, 2).await? else {
        return Ok(());
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "public").await?;
    let gateways = stack.gateway_urls();
    let mut a = connect(&gateways[0], &alice.token).await?;
    let mut b = connect(&gateways[1], &alice.token).await?;
    for n in 0..5 {
        let socket = if n % 2 == 0 { &mut a } else { &mut b };
        send(
            socket,
            json!({"type": "send", "id": format!("m{n}"), "room": room, "body": "hi"}),
        )
        .await?;
        let ack = next_of(socket, "ack").await?;
        assert_eq!(ack["id"], format!("m{n}"));
    }
    for (name, socket) in [("a", &mut a), ("b", &mut b)] {
        send(
            socket,
            json!({"type": "send", "id": "over", "room": room, "body": "one more"}),
        )
        .await?;
        let refused = next_of(socket, "error").await?;
        assert_eq!(
            (refused["code"].as_str(), refused["id"].as_str()),
            (Some("rate_limited"), Some("over")),
            "the 6th message on gateway {name}"
        );
        assert!(refused["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));
    }
    stack.stop().await
}

#[tokio::test]
async fn rooms_per_user_and_members_per_room_are_capped_over_http() -> TestResult {
    let stack = Embedded::start_with(Config {
        max_rooms_per_user: 1,
        max_members_per_room: 1,
        ..unhidra_testkit::config()
    })
    .await?;
    let api = stack.api();
    let (alice, bob) = (api.user("alice").await?, api.user("bob").await?);
    let room = api.create_room(&alice, "public").await?;
    let (status, body) = post(
        &format!("{}/api/v1/rooms", stack.app.http()),
        Some(&alice.token),
        json!({"name": "second", "visibility": "public"}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("too_many_rooms"))
    );
    let (status, body) = api.join(&bob, &room).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("room_full"))
    );
    stack.app.stop().await
}

#[tokio::test]
async fn a_redis_outage_falls_back_to_local_limits_and_sharing_resumes() -> TestResult {
    let Some(redis) = unhidra_testkit::redis_url().await else {
        return Ok(());
    };
    let proxy = unhidra_testkit::Proxy::start(&unhidra_testkit::host_port(&redis)).await?;
    let shared = Config {
        bus_prefix: unhidra_testkit::unique_prefix(),
        limit_login_ip: Rate::new(3, Duration::from_secs(3600)),
        limit_http_ip: Rate::new(10_000, Duration::from_secs(60)),
        ..unhidra_testkit::config()
    };
    let a = Embedded::start_with(Config {
        redis_url: Some(format!("redis://{}", proxy.address).into()),
        ..shared.clone()
    })
    .await?;
    let b = Embedded::start_with(Config {
        redis_url: Some(redis.into()),
        ..shared
    })
    .await?;
    let (base_a, base_b) = (a.app.http(), b.app.http());
    let rate_limits = |base: String| async move {
        let (_, ready) = get(&format!("{base}/readyz"), None).await?;
        Ok::<_, Error>(
            ready["checks"]["rate_limits"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };

    for _ in 0..2 {
        assert_eq!(
            login(&base_a, "x@example.com", None).await?.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(rate_limits(base_a.clone()).await?, "redis");

    proxy.cut();
    // Neither unlimited nor refusing everyone: a goes on with its own count.
    assert_eq!(
        login(&base_a, "x@example.com", None).await?.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        login(&base_a, "x@example.com", None).await?.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(rate_limits(base_a.clone()).await?, "fallback_local");
    let (_, metrics) = get_text(&format!("{base_a}/metrics")).await?;
    assert!(
        metrics.contains("unhidra_rate_limit_fallback 1"),
        "{metrics}"
    );

    proxy.restore();
    let deadline = tokio::time::Instant::now() + WAIT;
    while rate_limits(base_a.clone()).await? != "redis" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never shared its limits again"
        );
        // Any API request asks Redis (the per-IP budget) once it is due again.
        get(&format!("{base_a}/api/v1/rooms"), None).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Shared again: Redis holds a's two logins from before the outage, so b,
    // whose own count is empty, gets one and is refused the next.
    assert_eq!(
        login(&base_b, "x@example.com", None).await?.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        login(&base_b, "x@example.com", None).await?.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    a.app.stop().await?;
    b.app.stop().await
}

/// Status, rate-limit headers and body of an unauthenticated POST.
async fn post_full(url: String, body: Value) -> Result<(StatusCode, HeaderMap, Value), Error> {
    let request = http().post(url).json(&body);
    let response = request.send().await?;
    let (status, headers) = (response.status(), response.headers().clone());
    Ok((
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    ))
}

/// A refusal as every limited route gives it.
fn assert_limited(what: &str, status: StatusCode, headers: &HeaderMap, body: &Value) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{what}: {body}");
    assert_eq!(body["error"], "rate_limited", "{what}");
    assert_eq!(header(headers, "x-ratelimit-remaining"), Some(0), "{what}");
    assert!(
        header(headers, "retry-after").is_some_and(|s| s >= 1),
        "{what}"
    );
}

#[tokio::test]
async fn every_credential_limit_counts_per_account_and_per_address() -> TestResult {
    let clock = manual_clock();
    let stack = Embedded::start_on_clock(
        Config {
            limit_login_account: per_minute(2),
            limit_register_account: per_minute(2),
            limit_refresh_ip: per_minute(3),
            limit_refresh_account: per_minute(2),
            limit_http_ip: per_minute(1000),
            ..unhidra_testkit::config()
        },
        clock.clone(),
    )
    .await?;
    let base = stack.app.http();

    // Logins per account: the same email is refused, another is not.
    for _ in 0..2 {
        let (status, headers, _) = login(&base, "target@example.com", None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(header(&headers, "x-ratelimit-remaining").is_some());
    }
    let (status, headers, body) = login(&base, "target@example.com", None).await?;
    assert_limited("login per account", status, &headers, &body);
    assert_eq!(
        login(&base, "other@example.com", None).await?.0,
        StatusCode::UNAUTHORIZED
    );

    // Registrations per email: the second is a conflict, the third refused.
    let register = |email: &'static str| {
        post_full(
            format!("{}/api/v1/auth/register", stack.app.http()),
            json!({"email": email, "password": "correct horse battery"}),
        )
    };
    assert_eq!(register("ann@example.com").await?.0, StatusCode::CREATED);
    assert_eq!(register("ann@example.com").await?.0, StatusCode::CONFLICT);
    let (status, headers, body) = register("ann@example.com").await?;
    assert_limited("register per account", status, &headers, &body);

    // Refreshes per user: a refused refresh keeps its token.
    let (status, _, tokens) = post_full(
        format!("{base}/api/v1/auth/login"),
        json!({"email": "ann@example.com", "password": "correct horse battery"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let refresh = |token: String| {
        post_full(
            format!("{}/api/v1/auth/refresh", stack.app.http()),
            json!({"refresh_token": token}),
        )
    };
    let mut token = str_of(&tokens, "refresh_token")?;
    for _ in 0..2 {
        let (status, _, body) = refresh(token.clone()).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        token = str_of(&body, "refresh_token")?;
    }
    let (status, headers, body) = refresh(token.clone()).await?;
    assert_limited("refresh per account", status, &headers, &body);
    clock.advance(Duration::from_secs(61));
    let (status, _, body) = refresh(token).await?;
    assert_eq!(
        status,
        StatusCode::OK,
        "the refused token still works: {body}"
    );

    // Refreshes per address: unknown tokens count too (3/min, one used
    // since the clock moved).
    for _ in 0..2 {
        let (status, _, _) = refresh("forged".to_owned()).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, headers, body) = refresh("forged".to_owned()).await?;
    assert_limited("refresh per address", status, &headers, &body);

    // The general budget per address, on every API route.
    let stack_http = Embedded::start_with(Config {
        limit_http_ip: per_minute(3),
        ..unhidra_testkit::config()
    })
    .await?;
    let rooms = format!("{}/api/v1/rooms", stack_http.app.http());
    for remaining in (0..3).rev() {
        let response = http().get(&rooms).send().await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(response.headers(), "x-ratelimit-limit"), Some(3));
        assert_eq!(
            header(response.headers(), "x-ratelimit-remaining"),
            Some(remaining)
        );
    }
    let response = http().get(&rooms).send().await?;
    let (status, headers) = (response.status(), response.headers().clone());
    let body: Value = response.json().await?;
    assert_limited("requests per address", status, &headers, &body);
    let (status, _) = get(&format!("{}/healthz", stack_http.app.http()), None).await?;
    assert_eq!(status, StatusCode::OK, "health is not limited");
    stack_http.app.stop().await?;
    stack.app.stop().await
}
