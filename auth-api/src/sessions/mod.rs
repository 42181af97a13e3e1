//! Login and token refresh: `POST /api/v1/auth/login` opens a session and
//! returns an access token (EdDSA JWT) with a refresh token; `POST
//! /api/v1/auth/refresh` rotates the refresh token of a live session, and
//! revokes the session when a refresh token comes back a second time. A
//! user's own sessions are managed in [`manage`]; every revocation is
//! announced on the bus so that every process refuses the session's tokens
//! and gateways close its sockets.

pub mod manage;
mod repo;

use axum::{Json, extract::State};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use unhidra_core::error::ErrorBody;
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::{DeviceId, SessionId, UserId},
    token::AccessClaims,
    users::SystemRole,
};
use unhidra_runtime::{ApiError, ApiJson, ClientIp, Throttle};

pub use self::repo::{Rotation, SessionRepo};
use crate::{AuthState, passwords::check_length, users::normalize_email};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    email: String,
    #[schema(value_type = String)]
    password: SecretString,
    /// One of the user's registered devices, to bind the session to.
    device_id: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    #[schema(value_type = String)]
    refresh_token: SecretString,
}

#[derive(Serialize, utoipa::ToSchema)]
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

/// A fresh refresh token and the hash that is stored instead of it (also
/// the form of password-reset tokens).
pub fn new_refresh_token() -> (String, String) {
    let mut bytes = [0_u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_refresh_token(&token);
    (token, hash)
}

pub fn hash_refresh_token(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

fn access_token(
    state: &AuthState,
    user: UserId,
    session: SessionId,
    role: SystemRole,
    device: Option<DeviceId>,
) -> Result<String, ApiError> {
    let now = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(state.ctx.config.access_token_ttl_secs).unwrap_or(i64::MAX);
    let claims = AccessClaims {
        sub: user.to_string(),
        sid: session.to_string(),
        role,
        did: device.map(|d| d.to_string()),
        jti: uuid::Uuid::now_v7().to_string(),
        iat: now,
        exp: now.saturating_add(ttl),
        iss: state.ctx.config.token_issuer.clone(),
        aud: state.ctx.config.token_audience.clone(),
    };
    let token = state.service.keys.sign(&claims)?;
    state.service.metrics.tokens_issued.inc();
    Ok(token)
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest, responses(
    (status = 200, description = "Tokens, or with two-factor authentication in force a challenge for `POST /api/v1/auth/login/mfa`", body = LoginAnswer),
    (status = 401, description = "`invalid_credentials`", body = ErrorBody),
    (status = 403, description = "`email_not_verified` or `account_disabled`, or `ip_blocked`", body = ErrorBody),
    (status = 423, description = "`account_locked`: too many failed logins in a row (`Retry-After`)", body = ErrorBody),
    (status = 422, description = "`invalid_input` or `unknown_device`", body = ErrorBody)))]
pub async fn login(
    State(state): State<AuthState>,
    throttle: Throttle,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<Json<LoginAnswer>, ApiError> {
    let limits = &state.service.limits;
    throttle.limit_ip(limits.login_ip.as_ref()).await?;
    check_length(&request.password)?;
    let email = normalize_email(&request.email);
    if let Some(email) = &email {
        throttle.limit(limits.login_account.as_ref(), email).await?;
    }
    let credentials = match &email {
        Some(email) => state.service.accounts.credentials(email).await?,
        None => None,
    };
    let now_ms = state.ctx.clock.now_millis();
    // A locked account is refused before its password is looked at, so
    // guessing goes on neither here nor on another replica.
    if let Some(credentials) = &credentials {
        if let Some(retry_after) = credentials.locked_for(now_ms) {
            tracing::info!(user_id = %credentials.user, "login refused: account locked");
            return Err(ApiError::Locked { retry_after });
        }
    }
    let user_id = credentials.as_ref().map(|c| c.user);
    let standing = credentials.as_ref().map(|c| c.standing);
    let matched = state
        .service
        .passwords
        .verify(request.password, credentials.map(|c| c.password_hash))
        .await?;
    let (Some(user_id), Some(standing)) = (user_id.filter(|_| matched), standing) else {
        let subject = email.unwrap_or_else(|| request.email.chars().take(254).collect());
        return Err(failed_login(&state, &throttle.ip, user_id, subject, now_ms).await);
    };
    state.service.accounts.record_success(user_id).await?;
    // Told only to whoever knows the password.
    if standing.disabled {
        tracing::info!(%user_id, "login refused: account disabled");
        return Err(account_disabled());
    }
    if standing.unverified {
        return Err(ApiError::Denied {
            code: "email_not_verified",
            message: "confirm your email with the link mailed to it first".into(),
        });
    }
    let device = own_device(&state, user_id, request.device_id.as_deref()).await?;
    if state
        .service
        .mfa
        .totp(user_id)
        .await?
        .is_some_and(|t| t.confirmed)
    {
        let challenge = crate::mfa::challenge(&state, user_id).await?;
        return Ok(Json(LoginAnswer::MfaRequired(challenge)));
    }
    let tokens = open_session(&state, user_id, standing.role, device).await?;
    Ok(Json(LoginAnswer::Tokens(tokens)))
}

/// What a right password gets.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum LoginAnswer {
    Tokens(Tokens),
    /// Two-factor authentication is in force: the second step comes next.
    MfaRequired(crate::mfa::MfaChallenge),
}

/// The device a login names, if it is a live one of `user`'s.
pub async fn own_device(
    state: &AuthState,
    user: UserId,
    device: Option<&str>,
) -> Result<Option<DeviceId>, ApiError> {
    let Some(device) = device else {
        return Ok(None);
    };
    let unknown = || ApiError::Unacceptable {
        code: "unknown_device",
        message: "device_id names no registered device of this account".into(),
    };
    let device: DeviceId = device.parse().map_err(|_| unknown())?;
    if !state.service.devices.owns(user, device).await? {
        return Err(unknown());
    }
    Ok(Some(device))
}

/// Opens a session for `user` (whose credentials were checked) and issues
/// its tokens.
pub async fn open_session(
    state: &AuthState,
    user_id: UserId,
    role: SystemRole,
    device: Option<DeviceId>,
) -> Result<Tokens, ApiError> {
    let session = SessionId::new();
    let (refresh_token, refresh_hash) = new_refresh_token();
    let refresh_ttl_ms = i64::try_from(state.ctx.config.refresh_token_ttl_secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    state
        .service
        .sessions
        .open(session, user_id, device, &refresh_hash, refresh_ttl_ms)
        .await?;
    let access_token = access_token(state, user_id, session, role, device)?;
    state
        .service
        .metrics
        .logins
        .with_label_values(&["success"])
        .inc();
    tracing::info!(%user_id, session_id = %session, "login");
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::LoginSucceeded,
            Some(user_id),
            None,
        ))
        .await;
    Ok(Tokens {
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.ctx.config.access_token_ttl_secs,
        user_id,
    })
}

fn account_disabled() -> ApiError {
    ApiError::Denied {
        code: "account_disabled",
        message: "this account is disabled".into(),
    }
}

/// A wrong password or unknown email: counted against the account (which
/// may lock) and the address (which may be blocked on every node), audited,
/// and answered like every other failed login.
pub async fn failed_login(
    state: &AuthState,
    ip: &ClientIp,
    user: Option<UserId>,
    subject: String,
    now_ms: i64,
) -> ApiError {
    state
        .service
        .metrics
        .logins
        .with_label_values(&["failure"])
        .inc();
    tracing::warn!(user_id = ?user, client_ip = %ip, reason = "bad credentials", "login refused");
    let ctx = &state.ctx;
    let audit =
        |kind, detail| AuditEvent::new(kind, user, Some(subject.clone())).with_detail(detail);
    ctx.audit(audit(
        AuditKind::LoginFailed,
        serde_json::json!({"ip": ip.to_string()}),
    ))
    .await;
    if let Some(user) = user {
        let policy = state.service.lockout;
        match state
            .service
            .accounts
            .record_failure(user, policy, now_ms)
            .await
        {
            Ok(Some(until)) => {
                let seconds = (until - now_ms) / 1000;
                tracing::warn!(user_id = %user, lock_secs = seconds, "account locked");
                state.service.metrics.lockouts.inc();
                let detail = serde_json::json!({
                    "message": format!("{} failed logins in a row; locked for {seconds} s", policy.failures),
                    "ip": ip.to_string(),
                    "locked_until_ms": until,
                });
                ctx.audit(audit(AuditKind::AccountLocked, detail)).await;
            }
            Ok(None) => {}
            Err(e) => return ApiError::Unexpected(e),
        }
    }
    if let Some(blocked) = ctx.limits.strike(ip).await {
        let detail = serde_json::json!({
            "message": format!("{} invalid login attempts from {ip}", blocked.failures),
            "ip": ip.to_string(),
            "window_secs": blocked.window.as_secs(),
            "block_secs": blocked.block.as_secs(),
        });
        ctx.audit(audit(AuditKind::IpBlocked, detail)).await;
    }
    invalid_credentials()
}

#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest, responses(
    (status = 200, description = "New tokens; the refresh token used is spent", body = Tokens),
    (status = 401, description = "`invalid_refresh_token` (a reused one also revokes its session)", body = ErrorBody),
    (status = 403, description = "`account_disabled`", body = ErrorBody)))]
pub async fn refresh(
    State(state): State<AuthState>,
    throttle: Throttle,
    ApiJson(request): ApiJson<RefreshRequest>,
) -> Result<Json<Tokens>, ApiError> {
    let limits = &state.service.limits;
    throttle.limit_ip(limits.refresh_ip.as_ref()).await?;
    let old_hash = hash_refresh_token(request.refresh_token.expose_secret());
    let (refresh_token, new_hash) = new_refresh_token();
    let refused = || ApiError::Unauthenticated {
        code: "invalid_refresh_token",
        message: "refresh token is unknown, used, revoked or expired".into(),
    };
    let sessions = &state.service.sessions;
    // Counted against its user before it is used up: a refused refresh
    // keeps its token. The new access token carries the user's role now.
    let Some((owner, standing)) = sessions.owner(&old_hash).await? else {
        // Not a current token: if it is a retired one, it was used before.
        if let Rotation::Reused { session, user } = sessions.rotate(&old_hash, &new_hash).await? {
            reused(&state, &throttle.ip, session, user).await;
        }
        return Err(refused());
    };
    throttle
        .limit(limits.refresh_account.as_ref(), &owner.to_string())
        .await?;
    if standing.disabled {
        return Err(account_disabled());
    }
    let (session, user) = match sessions.rotate(&old_hash, &new_hash).await? {
        Rotation::Rotated { session, user } => (session, user),
        Rotation::Reused { session, user } => {
            reused(&state, &throttle.ip, session, user).await;
            return Err(refused());
        }
        Rotation::Refused => return Err(refused()),
    };
    let device = sessions.device_of(session).await?;
    let access_token = access_token(&state, user, session, standing.role, device)?;
    Ok(Json(Tokens {
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.ctx.config.access_token_ttl_secs,
        user_id: user,
    }))
}

/// A refresh token came back after it had been used: its session is
/// revoked (whoever holds the newer token loses it too), announced and
/// audited.
async fn reused(state: &AuthState, ip: &ClientIp, session: SessionId, user: UserId) {
    tracing::warn!(user_id = %user, session_id = %session, client_ip = %ip, "refresh token reused: session revoked");
    manage::announce(state, user, vec![session]).await;
    let detail = serde_json::json!({
        "message": "a refresh token was used twice; its session is revoked",
        "session_id": session,
        "ip": ip.to_string(),
    });
    state
        .ctx
        .audit(
            AuditEvent::new(
                AuditKind::RefreshTokenReused,
                Some(user),
                Some(session.to_string()),
            )
            .with_detail(detail),
        )
        .await;
}
