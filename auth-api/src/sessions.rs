//! Login and token refresh: `POST /api/v1/auth/login` opens a session and
//! returns an access token (EdDSA JWT) with a refresh token; `POST
//! /api/v1/auth/refresh` rotates the refresh token of a live session.

use axum::{Json, extract::State};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use unhidra_core::{
    ApiError,
    error::ApiJson,
    events::{AuditEvent, AuditKind},
    ids::{SessionId, UserId},
    token::AccessClaims,
};
use unhidra_store::now_millis;
use unhidra_telemetry::metrics;

use crate::{AuthState, users::normalize_email};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    email: String,
    password: SecretString,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    refresh_token: SecretString,
}

#[derive(Serialize)]
pub struct Tokens {
    access_token: String,
    refresh_token: String,
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
    user_id: UserId,
}

fn invalid_credentials() -> ApiError {
    ApiError::Unauthenticated {
        code: "invalid_credentials",
        message: "email or password is wrong".into(),
    }
}

/// A fresh refresh token and the hash that is stored instead of it.
fn new_refresh_token() -> (String, String) {
    let mut bytes = [0_u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_refresh_token(&token);
    (token, hash)
}

fn hash_refresh_token(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

fn access_token(state: &AuthState, user: UserId, session: SessionId) -> Result<String, ApiError> {
    let now = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(state.ctx.config.access_token_ttl_secs).unwrap_or(i64::MAX);
    let claims = AccessClaims {
        sub: user.to_string(),
        sid: session.to_string(),
        jti: uuid::Uuid::now_v7().to_string(),
        iat: now,
        exp: now.saturating_add(ttl),
        iss: state.ctx.config.token_issuer.clone(),
        aud: state.ctx.config.token_audience.clone(),
    };
    let token = state.keys.sign(&claims)?;
    metrics::TOKENS_ISSUED.inc();
    Ok(token)
}

pub async fn login(
    State(state): State<AuthState>,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<Json<Tokens>, ApiError> {
    let email = normalize_email(&request.email);
    let user: Option<(String, String)> = match &email {
        Some(email) => sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1")
            .bind(email)
            .fetch_optional(&state.db.pool)
            .await
            .map_err(anyhow::Error::from)?,
        None => None,
    };
    let user_id = user.as_ref().and_then(|(id, _)| id.parse::<UserId>().ok());
    let matched = state
        .passwords
        .verify(request.password, user.map(|(_, hash)| hash))
        .await?;
    let Some(user_id) = user_id.filter(|_| matched) else {
        metrics::LOGINS.with_label_values(&["failure"]).inc();
        tracing::warn!(user_id = ?user_id, reason = "bad credentials", "login refused");
        let subject = email.unwrap_or_else(|| request.email.chars().take(254).collect());
        state
            .ctx
            .audit(AuditEvent::new(
                AuditKind::LoginFailed,
                user_id,
                Some(subject),
            ))
            .await;
        return Err(invalid_credentials());
    };

    let session = SessionId::new();
    let (refresh_token, refresh_hash) = new_refresh_token();
    let now = now_millis();
    let refresh_ttl = i64::try_from(state.ctx.config.refresh_token_ttl_secs).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO sessions (id, user_id, refresh_token_hash, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(session.to_string())
    .bind(user_id.to_string())
    .bind(&refresh_hash)
    .bind(now)
    .bind(now.saturating_add(refresh_ttl.saturating_mul(1000)))
    .execute(&state.db.pool)
    .await
    .map_err(anyhow::Error::from)?;
    let access_token = access_token(&state, user_id, session)?;
    metrics::LOGINS.with_label_values(&["success"]).inc();
    tracing::info!(%user_id, session_id = %session, "login");
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::LoginSucceeded,
            Some(user_id),
            None,
        ))
        .await;
    Ok(Json(Tokens {
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.ctx.config.access_token_ttl_secs,
        user_id,
    }))
}

pub async fn refresh(
    State(state): State<AuthState>,
    ApiJson(request): ApiJson<RefreshRequest>,
) -> Result<Json<Tokens>, ApiError> {
    let old_hash = hash_refresh_token(request.refresh_token.expose_secret());
    let (refresh_token, new_hash) = new_refresh_token();
    // One statement rotates the token, so a refresh token works exactly once.
    let row: Option<(String, String)> = sqlx::query_as(
        "UPDATE sessions SET refresh_token_hash = $1
         WHERE refresh_token_hash = $2 AND revoked_at IS NULL AND expires_at > $3
         RETURNING id, user_id",
    )
    .bind(&new_hash)
    .bind(&old_hash)
    .bind(now_millis())
    .fetch_optional(&state.db.pool)
    .await
    .map_err(anyhow::Error::from)?;
    let refused = || ApiError::Unauthenticated {
        code: "invalid_refresh_token",
        message: "refresh token is unknown, used, revoked or expired".into(),
    };
    let (session, user) = row.ok_or_else(refused)?;
    let session: SessionId = session.parse().map_err(|_| refused())?;
    let user: UserId = user.parse().map_err(|_| refused())?;
    let access_token = access_token(&state, user, session)?;
    Ok(Json(Tokens {
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.ctx.config.access_token_ttl_secs,
        user_id: user,
    }))
}
