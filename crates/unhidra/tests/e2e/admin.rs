//! System roles as users meet them: the bootstrap admin, `unhidra admin
//! create`, admin-only endpoints, role changes and disabled accounts, and
//! address blocks an admin sets and lifts.

use reqwest::StatusCode;
use serde_json::{Value, json};
use unhidra_core::Config;

use crate::harness::*;

const ADMIN_EMAIL: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "admin password one";

async fn login_as(api: &Api, email: &str, password: &str) -> Result<(StatusCode, Value), Error> {
    post(
        &format!("{}/api/v1/auth/login", api.auth),
        None,
        json!({"email": email, "password": password}),
    )
    .await
}

async fn admin_token(api: &Api) -> Result<String, Error> {
    let (status, body) = login_as(api, ADMIN_EMAIL, ADMIN_PASSWORD).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    str_of(&body, "access_token")
}

/// A request from `client` (a trusted proxy, the test, names it).
async fn from(
    client: &str,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(StatusCode, Value), Error> {
    let mut request = http()
        .request(method, url)
        .header("x-forwarded-for", client);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn with_bootstrap_admin() -> Result<Config, Error> {
    Ok(Config {
        bootstrap_admin_email: Some(ADMIN_EMAIL.into()),
        bootstrap_admin_password: Some(ADMIN_PASSWORD.to_owned().into()),
        trusted_proxies: vec!["127.0.0.0/8".parse()?],
        ..unhidra_testkit::config()
    })
}

#[tokio::test]
async fn admins_block_and_unblock_addresses_everywhere() -> TestResult {
    let stack = Embedded::start_with(with_bootstrap_admin()?).await?;
    let api = stack.api();
    let base = stack.app.http();
    let admin = admin_token(&api).await?;
    let alice = api.user("alice").await?;
    let blocks = format!("{base}/api/v1/admin/blocks");
    let post_ = reqwest::Method::POST;

    // Only admins.
    let block = json!({"ip": "203.0.113.7", "seconds": 600, "reason": "spam"});
    let (status, _) = from(
        "198.51.100.1",
        post_.clone(),
        &blocks,
        None,
        Some(block.clone()),
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = from(
        "198.51.100.1",
        post_.clone(),
        &blocks,
        Some(&alice.token),
        Some(block.clone()),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );

    // Bad input gets a clear refusal.
    for bad in [
        json!({"ip": "not-an-ip", "seconds": 60}),
        json!({"ip": "203.0.113.7", "seconds": 0}),
        json!({"ip": "203.0.113.7", "seconds": 60, "reason": "x".repeat(300)}),
    ] {
        let (status, body) = from(
            "198.51.100.1",
            post_.clone(),
            &blocks,
            Some(&admin),
            Some(bad),
        )
        .await?;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input"))
        );
    }

    let (status, body) = from("198.51.100.1", post_, &blocks, Some(&admin), Some(block)).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        (body["ip"].as_str(), body["blocked"].as_bool()),
        (Some("203.0.113.7"), Some(true))
    );

    // The blocked address is refused on every route and at the handshake;
    // others are not.
    let rooms = format!("{base}/api/v1/rooms");
    let get_ = reqwest::Method::GET;
    let (status, body) = from(
        "203.0.113.7",
        get_.clone(),
        &rooms,
        Some(&alice.token),
        None,
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("ip_blocked"))
    );
    let mut handshake_request = handshake(&stack.app.ws(), &alice.token)?;
    handshake_request
        .headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse()?);
    let (status, body) = refused(handshake_request).await?;
    assert_eq!((status, body["error"].as_str()), (403, Some("ip_blocked")));
    let (status, _) = from(
        "198.51.100.1",
        get_.clone(),
        &rooms,
        Some(&alice.token),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);

    let one = format!("{blocks}/203.0.113.7");
    let (status, body) = from("198.51.100.1", get_.clone(), &one, Some(&admin), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body["retry_after_secs"]
            .as_u64()
            .is_some_and(|s| (1..=600).contains(&s)),
        "{body}"
    );
    let (status, _) = from(
        "198.51.100.1",
        reqwest::Method::DELETE,
        &one,
        Some(&admin),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = from("203.0.113.7", get_, &rooms, Some(&alice.token), None).await?;
    assert_eq!(status, StatusCode::OK, "unblocked");
    stack.app.stop().await
}

#[tokio::test]
async fn admins_change_roles_and_disable_accounts() -> TestResult {
    on_each_store(admins_change_roles_and_disable_accounts_on).await
}

async fn admins_change_roles_and_disable_accounts_on(store: Store) -> TestResult {
    let stack = Embedded::start_with(on(&store, with_bootstrap_admin()?)).await?;
    let api = stack.api();
    let base = stack.app.http();
    let admin = admin_token(&api).await?;
    let user_url = |id: &str| format!("{base}/api/v1/admin/users/{id}");
    let patch = reqwest::Method::PATCH;
    let here = "198.51.100.1";

    // A guest creates no rooms, from the next token on.
    let email = format!("gus-{}@example.com", uuid::Uuid::new_v4().simple());
    let (status, registered) = post(
        &format!("{base}/api/v1/auth/register"),
        None,
        json!({"email": email, "password": "correct horse battery"}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED);
    let gus = str_of(&registered, "user_id")?;
    let (status, body) = from(
        here,
        patch.clone(),
        &user_url(&gus),
        Some(&admin),
        Some(json!({"role": "guest"})),
    )
    .await?;
    assert_eq!(
        (status, body["role"].as_str()),
        (StatusCode::OK, Some("guest")),
        "{body}"
    );
    let (_, tokens) = login_as(&api, &email, "correct horse battery").await?;
    let guest = str_of(&tokens, "access_token")?;
    let (status, body) = post(
        &format!("{base}/api/v1/rooms"),
        Some(&guest),
        json!({"name": "mine", "visibility": "public"}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );

    // Disabled: no login, no refresh, no token of before.
    let (status, body) = from(
        here,
        patch.clone(),
        &user_url(&gus),
        Some(&admin),
        Some(json!({"disabled": true})),
    )
    .await?;
    assert_eq!(
        (status, body["disabled"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let (status, body) = login_as(&api, &email, "correct horse battery").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("account_disabled"))
    );
    // Disabling revoked its sessions: the refresh token and the access token
    // it already had stop working at once.
    let (status, body) = post(
        &format!("{base}/api/v1/auth/refresh"),
        None,
        json!({"refresh_token": str_of(&tokens, "refresh_token")?}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_refresh_token"))
    );
    let (status, body) = get(&format!("{base}/api/v1/rooms"), Some(&guest)).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("session_revoked"))
    );
    // A wrong password still says only that.
    let (status, body) = login_as(&api, &email, "wrong password").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
    );
    let (status, _) = from(
        here,
        patch.clone(),
        &user_url(&gus),
        Some(&admin),
        Some(json!({"disabled": false})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        login_as(&api, &email, "correct horse battery").await?.0,
        StatusCode::OK
    );

    // Admins do not lock themselves out; unknown users and roles are refused.
    let (_, me) = login_as(&api, ADMIN_EMAIL, ADMIN_PASSWORD).await?;
    let admin_id = str_of(&me, "user_id")?;
    let (status, body) = from(
        here,
        patch.clone(),
        &user_url(&admin_id),
        Some(&admin),
        Some(json!({"role": "member"})),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("own_account"))
    );
    let (status, _) = from(
        here,
        patch.clone(),
        &user_url(&uuid::Uuid::now_v7().to_string()),
        Some(&admin),
        Some(json!({"role": "guest"})),
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = from(
        here,
        patch.clone(),
        &user_url("'; DROP TABLE users; --"),
        Some(&admin),
        Some(json!({"role": "guest"})),
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = from(
        here,
        patch,
        &user_url(&gus),
        Some(&admin),
        Some(json!({"role": "root"})),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input"))
    );
    stack.app.stop().await
}

#[tokio::test]
async fn the_first_admin_comes_from_the_cli_or_the_bootstrap_settings_idempotently() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..unhidra_testkit::config()
    };
    // `unhidra admin create`, with the password on standard input.
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_unhidra"))
        .args(["admin", "create", ADMIN_EMAIL])
        .env("UNHIDRA_DATA_DIR", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    if let Some(stdin) = cli.stdin.as_mut() {
        use std::io::Write;
        writeln!(stdin, "{ADMIN_PASSWORD}")?;
    }
    let output = cli.wait_with_output()?;
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("is an admin"));

    // Run again, and with bootstrap settings naming another password: the
    // same account, its first password kept.
    let first =
        auth_api::create_admin(&config, ADMIN_EMAIL, ADMIN_PASSWORD.to_owned().into()).await?;
    let again =
        auth_api::create_admin(&config, ADMIN_EMAIL, "another password".to_owned().into()).await?;
    assert_eq!(first, again);
    let app = Running::start(
        Config {
            bootstrap_admin_email: Some(ADMIN_EMAIL.into()),
            bootstrap_admin_password: Some("another password".to_owned().into()),
            ..config
        },
        unhidra::run,
    )
    .await?;
    wait_ready(&app.http()).await?;
    let api = Api {
        auth: app.http(),
        chat: app.http(),
        history: app.http(),
    };
    let (status, body) = login_as(&api, ADMIN_EMAIL, ADMIN_PASSWORD).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], first.to_string());
    assert_eq!(
        login_as(&api, ADMIN_EMAIL, "another password").await?.0,
        StatusCode::UNAUTHORIZED
    );
    let token = str_of(&body, "access_token")?;
    let (status, _) = get(
        &format!("{}/api/v1/admin/blocks/192.0.2.1", app.http()),
        Some(&token),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "an admin");

    // A bad invocation says how to use it.
    let usage = std::process::Command::new(env!("CARGO_BIN_EXE_unhidra"))
        .args(["admin", "promote"])
        .output()?;
    assert!(!usage.status.success());
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage: unhidra admin create"));
    app.stop().await
}

#[tokio::test]
async fn users_manage_their_profile_and_admins_find_and_delete_accounts() -> TestResult {
    on_each_store(users_manage_their_profile_and_admins_find_and_delete_accounts_on).await
}

async fn users_manage_their_profile_and_admins_find_and_delete_accounts_on(
    store: Store,
) -> TestResult {
    let stack = Embedded::start_with(on(
        &store,
        Config {
            max_members_per_room: 2,
            ..with_bootstrap_admin()?
        },
    ))
    .await?;
    let api = stack.api();
    let base = stack.app.http();
    let admin = admin_token(&api).await?;
    let me_url = format!("{base}/api/v1/users/me");

    let email = format!("zoe-{}@example.com", uuid::Uuid::new_v4().simple());
    let (status, _) = post(
        &format!("{base}/api/v1/auth/register"),
        None,
        json!({"email": email, "password": "correct horse battery"}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED);
    let (_, tokens) = login_as(&api, &email, "correct horse battery").await?;
    let zoe = str_of(&tokens, "access_token")?;
    let zoe_id = str_of(&tokens, "user_id")?;

    let (status, profile) = get(&me_url, Some(&zoe)).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (profile["email"].as_str(), profile["role"].as_str()),
        (Some(email.as_str()), Some("member"))
    );
    let here = "198.51.100.1";
    let patch = reqwest::Method::PATCH;
    let (status, profile) = from(
        here,
        patch.clone(),
        &me_url,
        Some(&zoe),
        Some(json!({"display_name": "Zoë 100%"})),
    )
    .await?;
    assert_eq!(
        (status, profile["display_name"].as_str()),
        (StatusCode::OK, Some("Zoë 100%"))
    );
    let (status, body) = from(
        here,
        patch.clone(),
        &me_url,
        Some(&zoe),
        Some(json!({"display_name": "  "})),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input"))
    );
    let (status, body) = from(
        here,
        patch,
        &me_url,
        Some(&zoe),
        Some(json!({"role": "admin"})),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input")),
        "no promoting oneself"
    );
    let (status, asked) = post(&format!("{me_url}/deletion"), Some(&zoe), json!({})).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(asked["deletion_requested_at"].is_string());

    // Admins search (wildcards are literal), page, read, and delete.
    let users = format!("{base}/api/v1/admin/users");
    let (status, body) = get(&users, Some(&zoe)).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (status, page) = get(&format!("{users}?search=ZOË%20100%25"), Some(&admin)).await?;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["users"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["users"][0]["user_id"], zoe_id.as_str());
    assert!(page["users"][0]["deletion_requested_at"].is_string());
    let (_, first) = get(&format!("{users}?limit=1"), Some(&admin)).await?;
    let next = first["next"].as_str().ok_or("a next page")?.to_owned();
    let (_, second) = get(&format!("{users}?limit=1&after={next}"), Some(&admin)).await?;
    assert_ne!(first["users"][0]["user_id"], second["users"][0]["user_id"]);
    for bad in ["limit=0", "limit=500", "after=nope", "unknown=1"] {
        let (status, body) = get(&format!("{users}?{bad}"), Some(&admin)).await?;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_input")),
            "{bad}"
        );
    }
    // Zoe fills the last place of a room.
    let (status, room) = post(
        &format!("{base}/api/v1/rooms"),
        Some(&admin),
        json!({"name": "two seats", "visibility": "public"}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{room}");
    let join = format!("{base}/api/v1/rooms/{}/join", str_of(&room, "room_id")?);
    assert_eq!(post(&join, Some(&zoe), json!({})).await?.0, StatusCode::OK);
    let yan = api.user("yan").await?;
    let (status, full) = post(&join, Some(&yan.token), json!({})).await?;
    assert_eq!(
        (status, full["error"].as_str()),
        (StatusCode::CONFLICT, Some("room_full"))
    );

    let one = format!("{users}/{zoe_id}");
    let (status, shown) = get(&one, Some(&admin)).await?;
    assert_eq!(
        (status, shown["email"].as_str()),
        (StatusCode::OK, Some(email.as_str()))
    );

    let status = http()
        .delete(&one)
        .bearer_auth(&admin)
        .send()
        .await?
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = get(&me_url, Some(&zoe)).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("session_revoked"))
    );
    assert_eq!(
        login_as(&api, &email, "correct horse battery").await?.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(&one, Some(&admin)).await?.0, StatusCode::NOT_FOUND);
    assert_eq!(
        http()
            .delete(&one)
            .bearer_auth(&admin)
            .send()
            .await?
            .status(),
        StatusCode::NOT_FOUND
    );
    // The email is free again.
    let (status, _) = post(
        &format!("{base}/api/v1/auth/register"),
        None,
        json!({"email": email, "password": "correct horse battery"}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED);
    let (_, me) = login_as(&api, ADMIN_EMAIL, ADMIN_PASSWORD).await?;
    let admin_id = str_of(&me, "user_id")?;
    let status = http()
        .delete(format!("{users}/{admin_id}"))
        .bearer_auth(&admin)
        .send()
        .await?
        .status();
    assert_eq!(status, StatusCode::CONFLICT);

    // The deleted account left its room (chat-service follows deletions
    // durably): its place is free.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = post(&join, Some(&yan.token), json!({})).await?;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "zoe's place never freed: {status} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stack.app.stop().await
}

#[tokio::test]
async fn registration_can_be_closed_or_by_invite() -> TestResult {
    on_each_store(registration_can_be_closed_or_by_invite_on).await
}

async fn registration_can_be_closed_or_by_invite_on(store: Store) -> TestResult {
    let register = |base: String, body: Value| async move {
        post(&format!("{base}/api/v1/auth/register"), None, body).await
    };
    let closed = Embedded::start_with(on(
        &store,
        Config {
            registration: unhidra_core::config::Registration::Closed,
            ..unhidra_testkit::config()
        },
    ))
    .await?;
    let (status, body) = register(
        closed.app.http(),
        json!({"email": "a@example.com", "password": "correct horse battery"}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("registration_closed"))
    );
    closed.app.stop().await?;

    let stack = Embedded::start_with(on(
        &store,
        Config {
            registration: unhidra_core::config::Registration::Invite,
            ..with_bootstrap_admin()?
        },
    ))
    .await?;
    let base = stack.app.http();
    let admin = admin_token(&stack.api()).await?;
    let newcomer = json!({"email": "new@example.com", "password": "correct horse battery"});
    let (status, body) = register(base.clone(), newcomer.clone()).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("invite_required"))
    );
    let mut with_code = newcomer.clone();
    with_code["invite"] = json!("made-up");
    let (status, body) = register(base.clone(), with_code.clone()).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("invalid_invite"))
    );

    let (status, invite) = post(
        &format!("{base}/api/v1/admin/invites"),
        Some(&admin),
        json!({}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{invite}");
    with_code["invite"] = invite["code"].clone();
    assert_eq!(
        register(base.clone(), with_code.clone()).await?.0,
        StatusCode::CREATED
    );
    with_code["email"] = json!("second@example.com");
    let (status, body) = register(base.clone(), with_code).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("invalid_invite")),
        "used once"
    );
    stack.app.stop().await
}

/// The bodies of the mails in the embedded outbox to `email`, once there
/// are `count`.
async fn mails_to(
    outbox: &std::path::Path,
    email: &str,
    count: usize,
) -> Result<Vec<String>, Error> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mails: Vec<String> = std::fs::read_dir(outbox)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter(|m| m.contains(&format!("To: {email}")))
                    .collect()
            })
            .unwrap_or_default();
        if mails.len() >= count {
            return Ok(mails);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{} of {count} mails to {email}", mails.len()).into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_email_verification_registration_is_no_enumeration_oracle() -> TestResult {
    let stack = Embedded::start_with(Config {
        email_verification: true,
        ..unhidra_testkit::config()
    })
    .await?;
    let api = stack.api();
    let base = stack.app.http();
    let email = format!("vera-{}@example.com", uuid::Uuid::new_v4().simple());
    let body = json!({"email": email, "password": "correct horse battery"});
    let (first_status, first) =
        post(&format!("{base}/api/v1/auth/register"), None, body.clone()).await?;
    let (again_status, again) = post(&format!("{base}/api/v1/auth/register"), None, body).await?;
    assert_eq!(
        (first_status, again_status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_eq!(first, again, "a taken email answers like a new one");

    let mails = mails_to(&stack.data_dir.join("outbox"), &email, 2).await?;
    assert!(
        mails.iter().any(|m| m.contains("already has one")),
        "the owner is told"
    );
    let confirm = mails
        .iter()
        .find(|m| m.contains("Confirm your email"))
        .ok_or("no confirmation mail")?;
    let token = confirm
        .lines()
        .skip_while(|l| !l.contains("with this token"))
        .nth(1)
        .map(str::trim)
        .ok_or("no token")?
        .to_owned();

    let (status, body) = login_as(&api, &email, "correct horse battery").await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("email_not_verified"))
    );
    let (status, _) = post(
        &format!("{base}/api/v1/auth/verify"),
        None,
        json!({"token": token}),
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        login_as(&api, &email, "correct horse battery").await?.0,
        StatusCode::OK
    );
    let (status, body) = post(
        &format!("{base}/api/v1/auth/verify"),
        None,
        json!({"token": token}),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_verification_token"))
    );
    stack.app.stop().await
}
