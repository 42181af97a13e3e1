//! Token signing keys as relying parties meet them: access tokens verified
//! by an independent JWT implementation (jwt-compact, not the jsonwebtoken
//! crate that signs) against the published JWKS, before and after a rotation
//! by an admin or by `unhidra keys rotate`; the OpenID provider metadata and
//! userinfo.

use jwt_compact::{
    Algorithm, AlgorithmExt, Claims, TimeOptions, UntrustedToken, alg::Ed25519, jwk::JsonWebKey,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use unhidra_core::Config;

use crate::harness::*;

const ADMIN_EMAIL: &str = "keys-admin@example.com";
const ADMIN_PASSWORD: &str = "admin password two";

/// Verifies `token` the way an outside service would: the key its `kid`
/// names in `jwks`, the EdDSA signature, the expiry; its claims.
fn verify_independently(token: &str, jwks: &Value) -> Result<Value, Error> {
    let untrusted = UntrustedToken::new(token)?;
    assert_eq!(untrusted.algorithm(), "EdDSA");
    let kid = untrusted
        .header()
        .key_id
        .clone()
        .ok_or("the token names no key")?;
    let jwk = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|key| key["kid"] == kid.as_str())
        .ok_or_else(|| format!("key {kid} is not published"))?;
    assert_eq!((&jwk["alg"], &jwk["use"]), (&json!("EdDSA"), &json!("sig")));
    let jwk: JsonWebKey<'_> = serde_json::from_value(jwk.clone())?;
    let key = <Ed25519 as Algorithm>::VerifyingKey::try_from(&jwk)?;
    let verified = Ed25519.validator::<Value>(&key).validate(&untrusted)?;
    let claims: &Claims<Value> = verified.claims();
    claims.validate_expiration(&TimeOptions::default())?;
    Ok(claims.custom.clone())
}

fn kid_of(token: &str) -> Result<String, Error> {
    Ok(UntrustedToken::new(token)?
        .header()
        .key_id
        .clone()
        .ok_or("the token names no key")?)
}

#[tokio::test]
async fn tokens_verify_independently_before_and_after_an_admin_rotates_the_key() -> TestResult {
    on_each_store(tokens_verify_independently_before_and_after_an_admin_rotates_the_key_on).await
}

async fn tokens_verify_independently_before_and_after_an_admin_rotates_the_key_on(
    store: Store,
) -> TestResult {
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
    let jwks_url = format!("{base}/.well-known/jwks.json");

    // Discovery names the keys and userinfo.
    let (status, metadata) = get(&format!("{base}/.well-known/openid-configuration"), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(metadata["issuer"], unhidra_testkit::config().token_issuer);
    let public = unhidra_testkit::config().public_url;
    assert_eq!(
        metadata["jwks_uri"],
        format!("{public}/.well-known/jwks.json")
    );
    assert_eq!(
        metadata["userinfo_endpoint"],
        format!("{public}/api/v1/auth/userinfo")
    );
    assert_eq!(
        metadata["id_token_signing_alg_values_supported"],
        json!(["EdDSA"])
    );

    let alice = api.user("alice").await?;
    let (status, before) = get(&jwks_url, None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(before["keys"].as_array().map(Vec::len), Some(1), "{before}");
    let claims = verify_independently(&alice.token, &before)?;
    assert_eq!(claims["sub"], alice.id.as_str());
    assert_eq!(claims["iss"], unhidra_testkit::config().token_issuer);
    assert_eq!(claims["role"], "member");

    let (status, info) = get(&format!("{base}/api/v1/auth/userinfo"), Some(&alice.token)).await?;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["sub"], alice.id.as_str());
    assert_eq!(info["name"], "alice");
    assert!(
        info["email"]
            .as_str()
            .is_some_and(|e| e.starts_with("alice-"))
    );
    assert_eq!(
        get(&format!("{base}/api/v1/auth/userinfo"), None).await?.0,
        StatusCode::UNAUTHORIZED
    );

    // Members may not rotate; admins may.
    let rotate = format!("{base}/api/v1/admin/keys/rotate");
    let (status, body) = post(&rotate, Some(&alice.token), json!({})).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, login) = post(
        &format!("{base}/api/v1/auth/login"),
        None,
        json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{login}");
    let admin = str_of(&login, "access_token")?;
    let old_kid = kid_of(&alice.token)?;
    let response = http()
        .post(&rotate)
        .bearer_auth(&admin)
        .header("user-agent", "ops-console/2.1")
        .header("x-request-id", "rotate-42")
        .json(&json!({}))
        .send()
        .await?;
    let status = response.status();
    let rotated: Value = response.json().await?;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_kid = str_of(&rotated, "kid")?;
    assert_ne!(new_kid, old_kid);
    assert_eq!(rotated["published"], json!([old_kid, new_kid]));
    assert!(
        rotated["replaced_published_for_secs"]
            .as_u64()
            .is_some_and(|s| s > unhidra_testkit::config().access_token_ttl_secs),
        "{rotated}"
    );

    // New tokens carry the new key; tokens of the old one still verify.
    let bob = api.user("bob").await?;
    assert_eq!(kid_of(&bob.token)?, new_kid);
    let (_, after) = get(&jwks_url, None).await?;
    assert_eq!(after["keys"].as_array().map(Vec::len), Some(2), "{after}");
    assert_eq!(
        verify_independently(&bob.token, &after)?["sub"],
        bob.id.as_str()
    );
    assert_eq!(
        verify_independently(&alice.token, &after)?["sub"],
        alice.id.as_str()
    );

    // The gateway accepts both (it fetches the key it does not know yet).
    let room = api.create_room(&alice, "public").await?;
    assert_eq!(api.join(&bob, &room).await?.0, StatusCode::OK);
    let ws = stack.app.ws();
    let mut old = connect(&ws, &alice.token).await?;
    let mut new = connect(&ws, &bob.token).await?;
    send(
        &mut new,
        json!({"type": "send", "id": "k-1", "room": room, "body": "after rotation"}),
    )
    .await?;
    assert_eq!(
        next_of(&mut old, "message").await?["body"],
        "after rotation"
    );

    // Audited with the admin, the new key and where the request came from.
    let events = wait_for_audit(&stack, "signing_key_rotated", 1).await?;
    let admin_id = str_of(&login, "user_id")?;
    assert_eq!(
        events[0],
        json!({
            "detail": null,
            "subject": new_kid,
            "actor": admin_id,
            "client_ip": "127.0.0.1",
            "user_agent": "ops-console/2.1",
            "request_id": "rotate-42",
        })
    );
    stack.app.stop().await
}

#[tokio::test]
async fn unhidra_keys_rotate_adds_the_key_new_tokens_carry() -> TestResult {
    let dir = tempfile::tempdir()?;
    let rotate = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_unhidra"))
            .args(["keys", "rotate"])
            .env("UNHIDRA_DATA_DIR", dir.path())
            .output()
    };
    let first = rotate()?;
    assert!(first.status.success(), "{first:?}");
    let second = rotate()?;
    assert!(second.status.success(), "{second:?}");
    let kid = |output: &std::process::Output| {
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .skip_while(|word| *word != "key")
            .nth(1)
            .map(str::to_owned)
    };
    let newest = kid(&second).ok_or("no kid printed")?;
    assert_ne!(kid(&first), Some(newest.clone()));

    let usage = std::process::Command::new(env!("CARGO_BIN_EXE_unhidra"))
        .args(["keys", "shred"])
        .output()?;
    assert!(!usage.status.success());
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage: unhidra keys rotate"));

    let app = Running::start(
        Config {
            data_dir: dir.path().to_path_buf(),
            ..unhidra_testkit::config()
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
    let carol = api.user("carol").await?;
    assert_eq!(kid_of(&carol.token)?, newest);
    let (_, jwks) = get(&format!("{}/.well-known/jwks.json", app.http()), None).await?;
    // The key made when the first run found none, and one per rotation.
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(3), "{jwks}");
    verify_independently(&carol.token, &jwks)?;
    app.stop().await
}
