//! A token is verified by its signature once while the signing keys stay the
//! same; what must still hold at every later use: its expiry, its session's
//! revocation, and the keys it was signed with being installed.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::Ed25519KeyPair;
use unhidra_authn::{TokenError, TokenVerifier};
use unhidra_core::{
    Config,
    events::{SCHEMA_VERSION, SessionsRevoked},
    ids::SessionId,
    token::Jwks,
};

mod signing;

use signing::{SigningKey, verifier};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A signing key and a verifier that trusts it alone.
async fn trusting_one_key(
    config: &Config,
) -> Result<(SigningKey, TokenVerifier), Box<dyn std::error::Error>> {
    let key = SigningKey::generate("k1")?;
    let jwks = Jwks {
        keys: vec![key.jwk()],
    };
    let verifier = verifier(config, Arc::new(Mutex::new(jwks))).await?;
    Ok((key, verifier))
}

#[tokio::test]
async fn a_token_verified_before_is_refused_once_its_key_is_retired() -> TestResult {
    let config = Config::default();
    let (old, new) = (SigningKey::generate("k1")?, SigningKey::generate("k2")?);
    let published = Arc::new(Mutex::new(Jwks {
        keys: vec![old.jwk()],
    }));
    let verifier = verifier(&config, Arc::clone(&published)).await?;
    let token = old.token(&config, SessionId::new(), 600)?;
    verifier.verify(&token).await?;
    verifier.verify(&token).await?;

    // A rotation retires the old key: auth-api announces the new set.
    let rotated = Jwks {
        keys: vec![new.jwk()],
    };
    *published.lock().map_err(|_| "poisoned")? = rotated.clone();
    verifier.install_keys(&rotated);
    assert_eq!(
        verifier.verify(&token).await,
        Err(TokenError::Invalid("unknown signing key"))
    );
    verifier
        .verify(&new.token(&config, SessionId::new(), 600)?)
        .await?;

    // The same keys installed again (the periodic refresh) change nothing.
    let token = new.token(&config, SessionId::new(), 600)?;
    verifier.verify(&token).await?;
    verifier.install_keys(&rotated);
    verifier.verify(&token).await?;
    Ok(())
}

#[tokio::test]
async fn a_token_verified_before_is_refused_once_its_session_is_revoked() -> TestResult {
    let config = Config::default();
    let (key, verifier) = trusting_one_key(&config).await?;
    let (session, other) = (SessionId::new(), SessionId::new());
    let (token, other_token) = (
        key.token(&config, session, 600)?,
        key.token(&config, other, 600)?,
    );
    let me = verifier.verify(&token).await?;
    assert_eq!(me.session, session);
    verifier.verify(&other_token).await?;

    verifier.revoke(&SessionsRevoked {
        v: SCHEMA_VERSION,
        user: me.user,
        sessions: vec![session],
        until: chrono::Utc::now().timestamp() + 600,
    });
    assert_eq!(verifier.verify(&token).await, Err(TokenError::Revoked));
    assert_eq!(verifier.verify(&other_token).await?.session, other);
    Ok(())
}

#[tokio::test]
async fn a_token_verified_before_is_refused_once_it_expires() -> TestResult {
    let config = Config::default();
    let (key, verifier) = trusting_one_key(&config).await?;
    // Past its expiry by 29 of the 30 seconds of leeway: accepted now, not
    // two seconds later.
    let token = key.token(&config, SessionId::new(), -29)?;
    verifier.verify(&token).await?;
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(verifier.verify(&token).await, Err(TokenError::Expired));

    // A token accepted before, its claims signed again by another key: a
    // different token, checked in full and refused.
    let token = key.token(&config, SessionId::new(), 600)?;
    verifier.verify(&token).await?;
    let signed = token
        .rsplit_once('.')
        .map(|(signed, _)| signed)
        .unwrap_or_default();
    let stranger = Ed25519KeyPair::from_pkcs8(&SigningKey::generate("k1")?.pkcs8)
        .map_err(|_| "key generation failed")?;
    let forged = format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(stranger.sign(signed.as_bytes()).as_ref())
    );
    assert_eq!(
        verifier.verify(&forged).await,
        Err(TokenError::Invalid("token rejected"))
    );
    Ok(())
}
