//! Sessions as users meet them: logout, listing and revoking their own
//! sessions, refresh-token reuse revoking the session, and every revocation
//! reaching the gateways (sockets closed with 4003, handshakes refused),
//! embedded and across processes.

use std::time::Instant;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

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
async fn delete(url: &str, token: &str) -> Result<StatusCode, Error> {
    Ok(http().delete(url).bearer_auth(token).send().await?.status())
}

#[tokio::test]
async fn logout_and_revoked_sessions_close_their_sockets_only() -> TestResult {
    on_each_store(logout_and_revoked_sessions_close_their_sockets_only_on).await
}

async fn logout_and_revoked_sessions_close_their_sockets_only_on(store: Store) -> TestResult {
    let stack = Embedded::start_with(on(&store, unhidra_testkit::config())).await?;
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
    on_each_store(a_reused_refresh_token_revokes_its_session_on).await
}

async fn a_reused_refresh_token_revokes_its_session_on(store: Store) -> TestResult {
    let stack = Embedded::start_with(on(&store, unhidra_testkit::config())).await?;
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
    on_each_store(a_password_change_ends_every_other_session_on).await
}

async fn a_password_change_ends_every_other_session_on(store: Store) -> TestResult {
    let stack = Embedded::start_with(on(&store, unhidra_testkit::config())).await?;
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

/// The token of the newest mail in the embedded outbox to `email`.
async fn mailed_token(outbox: &std::path::Path, email: &str) -> Result<String, Error> {
    mailed_token_other_than(outbox, email, None).await
}

/// The token of a mail to `email` in the outbox, other than `seen`.
async fn mailed_token_other_than(
    outbox: &std::path::Path,
    email: &str,
    seen: Option<&str>,
) -> Result<String, Error> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(entries) = std::fs::read_dir(outbox) {
            for entry in entries.flatten() {
                let mail = std::fs::read_to_string(entry.path())?;
                if !mail.contains(email) {
                    continue;
                }
                let token = mail
                    .lines()
                    .skip_while(|l| !l.contains("with this token"))
                    .nth(1)
                    .map(str::trim)
                    .filter(|t| !t.is_empty() && Some(*t) != seen);
                if let Some(token) = token {
                    return Ok(token.to_owned());
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no mail to {email} in {}", outbox.display()).into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_mailed_reset_token_sets_a_new_password_once() -> TestResult {
    on_each_store(a_mailed_reset_token_sets_a_new_password_once_on).await
}

async fn a_mailed_reset_token_sets_a_new_password_once_on(store: Store) -> TestResult {
    let clock = std::sync::Arc::new(unhidra_core::clock::ManualClock::starting_at(
        std::time::Duration::from_secs(1_800_000_000),
    ));
    let stack =
        Embedded::start_on_clock(on(&store, unhidra_testkit::config()), clock.clone()).await?;
    let api = stack.api();
    let base = stack.app.http();
    let email = register(&api, "ann").await?;
    let before = login(&api, &email).await?;

    // The same answer for an account and for none.
    let ask = |email: String| {
        let url = format!("{}/api/v1/auth/password/reset", stack.app.http());
        async move { post(&url, None, json!({"email": email})).await }
    };
    let (status, known) = ask(email.clone()).await?;
    let (unknown_status, unknown) = ask("nobody@example.com".to_owned()).await?;
    assert_eq!(
        (status, unknown_status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_eq!(known, unknown);
    let token = mailed_token(&stack.data_dir.join("outbox"), &email).await?;
    let token_used = token.clone();

    let confirm = |token: &str, password: &str| {
        let url = format!("{}/api/v1/auth/password/reset/confirm", stack.app.http());
        let body = json!({"token": token, "new_password": password});
        async move { post(&url, None, body).await }
    };
    // A refused password keeps the token.
    let (status, body) = confirm(&token, "qwertyuiop").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("password_too_common")
        )
    );
    let (status, _) = confirm(&token, "a fresh start again").await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = confirm(&token, "and once more please").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_reset_token"))
    );
    let (status, _) = confirm("made-up", "and once more please").await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Every session ended; the new password works, the old does not.
    let (status, body) = get(&format!("{base}/api/v1/rooms"), Some(&before.access)).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("session_revoked"))
    );
    let login_with = |password: &'static str| {
        let url = format!("{}/api/v1/auth/login", stack.app.http());
        let body = json!({"email": email.clone(), "password": password});
        async move { post(&url, None, body).await }
    };
    assert_eq!(
        login_with("correct horse battery").await?.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(login_with("a fresh start again").await?.0, StatusCode::OK);

    // A token is good for 15 minutes.
    ask(email.clone()).await?;
    let outbox = stack.data_dir.join("outbox");
    let late = mailed_token_other_than(&outbox, &email, Some(&token_used)).await?;
    clock.advance(std::time::Duration::from_secs(15 * 60 + 1));
    let (status, body) = confirm(&late, "too late for this one").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_reset_token"))
    );
    assert_eq!(login_with("a fresh start again").await?.0, StatusCode::OK);
    stack.app.stop().await
}

/// A minimal SMTP peer on loopback: accepts every mail and hands over its
/// DATA (the peer a real mail server would be; Unhidra's client is real).
async fn smtp_sink() -> Result<(u16, tokio::sync::mpsc::Receiver<String>), Error> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (mails, received) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let mails = mails.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                let mut data: Option<String> = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(body) = data.as_mut() {
                        if line == "." {
                            let _ = mails.send(std::mem::take(body)).await;
                            data = None;
                            let _ = write.write_all(b"250 queued\r\n").await;
                        } else {
                            body.push_str(&line);
                            body.push('\n');
                        }
                        continue;
                    }
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink\r\n",
                        "DATA" => {
                            data = Some(String::new());
                            b"354 go on\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    let _ = write.write_all(reply).await;
                }
            });
        }
    });
    Ok((port, received))
}

#[tokio::test]
async fn reset_mail_goes_out_over_smtp_when_configured() -> TestResult {
    let (port, mut mails) = smtp_sink().await?;
    let stack = Embedded::start_with(unhidra_core::Config {
        smtp_url: Some(format!("smtp://127.0.0.1:{port}").into()),
        mail_from: "Chat <chat@example.com>".into(),
        public_url: "https://chat.example.com".into(),
        ..unhidra_testkit::config()
    })
    .await?;
    let api = stack.api();
    let email = register(&api, "ann").await?;
    let (status, _) = post(
        &format!("{}/api/v1/auth/password/reset", api.auth),
        None,
        json!({"email": email}),
    )
    .await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mail = tokio::time::timeout(WAIT, mails.recv())
        .await?
        .ok_or("no mail")?;
    assert!(mail.contains(&format!("To: {email}")), "{mail}");
    assert!(mail.contains("From: Chat <chat@example.com>"), "{mail}");
    assert!(
        mail.contains("https://chat.example.com/reset-password?token="),
        "{mail}"
    );
    assert!(
        !stack.data_dir.join("outbox").exists(),
        "nothing in the file outbox"
    );
    stack.app.stop().await
}

/// RFC 6238 TOTP, written here independently of the server's.
fn totp(secret_base32: &str, now: std::time::Duration) -> Result<String, Error> {
    let secret = data_encoding::BASE32_NOPAD.decode(secret_base32.as_bytes())?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &secret);
    let mac = ring::hmac::sign(&key, &(now.as_secs() / 30).to_be_bytes());
    let mac = mac.as_ref();
    let at = usize::from(mac[19] & 0x0f);
    let value = u32::from_be_bytes([mac[at] & 0x7f, mac[at + 1], mac[at + 2], mac[at + 3]]);
    Ok(format!("{:06}", value % 1_000_000))
}

#[tokio::test]
async fn totp_makes_login_two_steps_with_codes_and_recovery_codes_used_once() -> TestResult {
    on_each_store(totp_makes_login_two_steps_with_codes_and_recovery_codes_used_once_on).await
}

async fn totp_makes_login_two_steps_with_codes_and_recovery_codes_used_once_on(
    store: Store,
) -> TestResult {
    use unhidra_core::clock::{Clock, ManualClock, SystemClock};
    let clock = std::sync::Arc::new(ManualClock::starting_at(SystemClock.now()));
    let stack =
        Embedded::start_on_clock(on(&store, unhidra_testkit::config()), clock.clone()).await?;
    let api = stack.api();
    let base = stack.app.http();
    let email = register(&api, "ann").await?;
    let ann = login(&api, &email).await?;
    let totp_url = format!("{base}/api/v1/auth/mfa/totp");

    let (status, enrolment) = post(&totp_url, Some(&ann.access), json!({})).await?;
    assert_eq!(status, StatusCode::CREATED);
    let secret = str_of(&enrolment, "secret")?;
    assert!(str_of(&enrolment, "otpauth_uri")?.starts_with("otpauth://totp/unhidra:"));
    assert!(str_of(&enrolment, "qr_svg")?.contains("<svg"));
    let confirm = format!("{totp_url}/confirm");
    let (status, body) = post(&confirm, Some(&ann.access), json!({"code": "000000"})).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_mfa_code"))
    );
    let first_code = totp(&secret, clock.now())?;
    let (status, codes) = post(&confirm, Some(&ann.access), json!({"code": first_code})).await?;
    assert_eq!(status, StatusCode::OK, "{codes}");
    let recovery: Vec<String> = codes["recovery_codes"]
        .as_array()
        .ok_or("recovery codes")?
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    assert_eq!(recovery.len(), 10);
    let (status, body) = post(&totp_url, Some(&ann.access), json!({})).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("mfa_enabled"))
    );

    // The password alone gives an MFA token, not a session.
    let first_step = |email: String| {
        let url = format!("{}/api/v1/auth/login", stack.app.http());
        async move {
            let (status, body) = post(
                &url,
                None,
                json!({"email": email, "password": "correct horse battery"}),
            )
            .await?;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["mfa_required"], true);
            assert!(body["access_token"].is_null());
            str_of(&body, "mfa_token")
        }
    };
    let second_step = |body: Value| {
        let url = format!("{}/api/v1/auth/login/mfa", stack.app.http());
        async move { post(&url, None, body).await }
    };
    // The code that confirmed enrolment is used up.
    let token = first_step(email.clone()).await?;
    let (status, body) = second_step(json!({"mfa_token": token, "code": first_code})).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_mfa_code"))
    );
    let (status, body) = second_step(json!({"mfa_token": token, "code": first_code})).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_mfa_token")),
        "one guess per password"
    );

    clock.advance(std::time::Duration::from_secs(30));
    let token = first_step(email.clone()).await?;
    let (status, tokens) =
        second_step(json!({"mfa_token": token, "code": totp(&secret, clock.now())?})).await?;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert!(tokens["access_token"].is_string());

    let token = first_step(email.clone()).await?;
    let (status, _) =
        second_step(json!({"mfa_token": token, "recovery_code": recovery[0]})).await?;
    assert_eq!(status, StatusCode::OK);
    let token = first_step(email.clone()).await?;
    let (status, _) =
        second_step(json!({"mfa_token": token, "recovery_code": recovery[0]})).await?;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a recovery code works once"
    );

    // Turning it off needs the password and a code again.
    let disable = format!("{totp_url}/disable");
    clock.advance(std::time::Duration::from_secs(30));
    let code = totp(&secret, clock.now())?;
    let (status, _) = post(
        &disable,
        Some(&ann.access),
        json!({"password": "wrong password", "code": code}),
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = post(
        &disable,
        Some(&ann.access),
        json!({"password": "correct horse battery", "code": code}),
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let plain = login(&api, &email).await?;
    assert!(!plain.access.is_empty(), "one step again");
    stack.app.stop().await
}

#[tokio::test]
async fn revoking_a_device_ends_the_sessions_opened_on_it() -> TestResult {
    on_each_store(revoking_a_device_ends_the_sessions_opened_on_it_on).await
}

async fn revoking_a_device_ends_the_sessions_opened_on_it_on(store: Store) -> TestResult {
    let stack = Embedded::start_with(on(&store, unhidra_testkit::config())).await?;
    let api = stack.api();
    let base = stack.app.http();
    let email = register(&api, "ann").await?;
    let laptop = login(&api, &email).await?;
    let devices = format!("{base}/api/v1/devices");

    for bad in [
        json!({"name": "", "platform": "ios"}),
        json!({"name": "phone", "platform": "ios", "identity_key": "not base64!"}),
        json!({"name": "phone", "platform": "ios", "owner": "bob"}),
    ] {
        let (status, body) = post(&devices, Some(&laptop.access), bad.clone()).await?;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input")),
            "{bad}"
        );
    }
    let (status, phone) = post(
        &devices,
        Some(&laptop.access),
        json!({"name": "Ann's phone", "platform": "ios", "identity_key": "bW9jayBwdWJsaWMga2V5"}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{phone}");
    let phone_id = str_of(&phone, "device_id")?;

    // A login on the phone: its session belongs to the device.
    let login_on = |device: String| {
        let url = format!("{}/api/v1/auth/login", stack.app.http());
        let body = json!({"email": email.clone(), "password": "correct horse battery", "device_id": device});
        async move { post(&url, None, body).await }
    };
    let (status, on_phone) = login_on(phone_id.clone()).await?;
    assert_eq!(status, StatusCode::OK, "{on_phone}");
    let phone_access = str_of(&on_phone, "access_token")?;
    let (status, body) = login_on(uuid::Uuid::now_v7().to_string()).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_device"))
    );
    let mut phone_ws = connect(&stack.app.ws(), &phone_access).await?;
    let mut laptop_ws = connect(&stack.app.ws(), &laptop.access).await?;

    let one = format!("{devices}/{phone_id}");
    let status = http()
        .patch(&one)
        .bearer_auth(&laptop.access)
        .json(&json!({"name": "Old phone"}))
        .send()
        .await?
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list) = get(&devices, Some(&laptop.access)).await?;
    assert_eq!(list["devices"][0]["name"], "Old phone");
    assert_eq!(list["devices"][0]["identity_key"], "bW9jayBwdWJsaWMga2V5");

    let started = Instant::now();
    let status = http()
        .delete(&one)
        .bearer_auth(&laptop.access)
        .send()
        .await?
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        closed(&mut phone_ws, started).await?.0,
        CloseCode::Library(4003)
    );
    let (status, _) = get(&format!("{base}/api/v1/rooms"), Some(&phone_access)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    send(&mut laptop_ws, json!({"type": "ping", "id": "still"})).await?;
    assert_eq!(next_of(&mut laptop_ws, "pong").await?["id"], "still");
    let (_, list) = get(&devices, Some(&laptop.access)).await?;
    assert_eq!(list["devices"], json!([]));
    let (status, _) = login_on(phone_id.clone()).await?;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a revoked device takes no logins"
    );
    assert_eq!(
        http()
            .delete(&one)
            .bearer_auth(&laptop.access)
            .send()
            .await?
            .status(),
        StatusCode::NOT_FOUND
    );
    let registered = wait_for_audit(&stack, "device_registered", 1).await?;
    assert_eq!(registered[0]["subject"], phone_id.as_str());
    let revoked = wait_for_audit(&stack, "device_revoked", 1).await?;
    assert_eq!(revoked[0]["subject"], phone_id.as_str());
    stack.app.stop().await
}
