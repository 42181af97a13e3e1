//! A user's own sessions: `POST /api/v1/auth/logout` ends the current one,
//! `GET /api/v1/auth/sessions` lists the live ones (each with the `sid` its
//! access tokens carry), `DELETE /api/v1/auth/sessions/{id}` revokes one and
//! `DELETE /api/v1/auth/sessions` all of them. Every revocation is
//! announced on the bus ([`announce`]) and answered to late starters by the
//! `auth.revocations` responder ([`recent`]).

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use unhidra_core::error::ErrorBody;
use unhidra_core::{
    events::{AuditEvent, AuditKind, SCHEMA_VERSION, SessionsRevoked},
    ids::{SessionId, UserId},
    rpc::RpcError,
};
use unhidra_runtime::{ApiError, SessionUser};

use crate::{AuthState, fields::time};

/// Clock skew the verifiers allow past `exp`.
const LEEWAY_SECS: i64 = 30;

#[derive(Serialize, utoipa::ToSchema)]
pub struct SessionView {
    session_id: SessionId,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    /// The session of the token this request was made with.
    current: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SessionList {
    sessions: Vec<SessionView>,
}

#[utoipa::path(get, path = "/api/v1/auth/sessions", tag = "sessions", security(("bearer" = [])), responses(
    (status = 200, description = "Your live sessions, newest first", body = SessionList)))]
pub async fn list(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
) -> Result<Json<SessionList>, ApiError> {
    let sessions = state
        .service
        .sessions
        .live(me.user)
        .await?
        .into_iter()
        .map(|s| SessionView {
            session_id: s.id,
            created_at: time(s.created_at),
            expires_at: time(s.expires_at),
            last_used_at: s.last_used_at.map(time),
            current: s.id == me.session,
        })
        .collect();
    Ok(Json(SessionList { sessions }))
}

#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "sessions", security(("bearer" = [])), responses(
    (status = 204, description = "The session of the token used is ended")))]
pub async fn logout(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
) -> Result<StatusCode, ApiError> {
    revoke_own(&state, me.user, me.session).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/auth/sessions/{session_id}", tag = "sessions", security(("bearer" = [])), params(("session_id" = String, Path, description = "A session id (the `sid` of its tokens)")), responses(
    (status = 204, description = "Revoked; its sockets close with 4003")))]
pub async fn revoke(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    Path(session): Path<String>,
) -> Result<StatusCode, ApiError> {
    let no_such_session = || ApiError::NotFound("no such session".into());
    let session: SessionId = session.parse().map_err(|_| no_such_session())?;
    if !revoke_own(&state, me.user, session).await? {
        return Err(no_such_session());
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/auth/sessions", tag = "sessions", security(("bearer" = [])), responses(
    (status = 204, description = "Every session of yours is revoked")))]
pub async fn revoke_all(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
) -> Result<StatusCode, ApiError> {
    let revoked = state.service.sessions.revoke_all(me.user).await?;
    tracing::info!(user_id = %me.user, count = revoked.len(), "all sessions revoked");
    audit(&state, me.user, &revoked).await;
    announce(&state, me.user, revoked).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes one of `user`'s sessions; false when it is not a live one of theirs.
async fn revoke_own(state: &AuthState, user: UserId, session: SessionId) -> Result<bool, ApiError> {
    if !state.service.sessions.revoke(user, session).await? {
        return Ok(false);
    }
    tracing::info!(user_id = %user, session_id = %session, "session revoked");
    audit(state, user, &[session]).await;
    announce(state, user, vec![session]).await;
    Ok(true)
}

async fn audit(state: &AuthState, user: UserId, sessions: &[SessionId]) {
    let detail = serde_json::json!({ "sessions": sessions });
    state
        .ctx
        .audit(AuditEvent::new(AuditKind::SessionsRevoked, Some(user), None).with_detail(detail))
        .await;
}

/// Until when the access tokens of a session revoked now may still verify.
fn tokens_outlive(state: &AuthState, revoked_at_secs: i64) -> i64 {
    let ttl = i64::try_from(state.ctx.config.access_token_ttl_secs).unwrap_or(i64::MAX);
    revoked_at_secs
        .saturating_add(ttl)
        .saturating_add(LEEWAY_SECS)
}

/// Tells every process on the bus that these sessions are revoked: their
/// tokens are refused from now on and gateways close their sockets. A lost
/// announcement is logged; processes that start later ask [`recent`].
pub async fn announce(state: &AuthState, user: UserId, sessions: Vec<SessionId>) {
    if sessions.is_empty() {
        return;
    }
    let revoked = SessionsRevoked {
        v: SCHEMA_VERSION,
        user,
        sessions,
        until: tokens_outlive(state, Utc::now().timestamp()),
    };
    let ctx = &state.ctx;
    // Refused here at once, whatever the bus does.
    ctx.verifier.revoke(&revoked);
    let subject = ctx.subjects.sessions_revoked();
    if let Err(e) = ctx.announce(&subject, &revoked).await {
        tracing::error!(error = %e, user_id = %user, "revocation not announced; gateways learn it when they resync");
    }
}

/// The `auth.revocations` answer: every session revoked recently enough that
/// a token of it may still be unexpired.
pub async fn recent(state: &AuthState) -> Result<Vec<SessionsRevoked>, RpcError> {
    let now = Utc::now().timestamp();
    let window_secs = tokens_outlive(state, 0);
    let since_ms = now.saturating_sub(window_secs).saturating_mul(1000);
    let revoked = state
        .service
        .sessions
        .revoked_since(since_ms)
        .await
        .map_err(|e| {
            tracing::error!(error = ?e, "revocations unreadable");
            RpcError::new(
                unhidra_core::rpc::RpcCode::Unavailable,
                "revocations unavailable",
            )
        })?;
    Ok(revoked
        .into_iter()
        .map(|(session, user, at_ms)| SessionsRevoked {
            v: SCHEMA_VERSION,
            user,
            sessions: vec![session],
            until: tokens_outlive(state, at_ms / 1000),
        })
        .collect())
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    #[schema(value_type = String)]
    current_password: secrecy::SecretString,
    #[schema(value_type = String)]
    new_password: secrecy::SecretString,
}

/// `POST /api/v1/auth/password`: a new password for the caller, who proves
/// the current one; every other session of theirs ends.
#[utoipa::path(post, path = "/api/v1/auth/password", tag = "auth", security(("bearer" = [])), request_body = PasswordChange, responses(
    (status = 204, description = "Changed; every other session ended"),
    (status = 401, description = "`invalid_credentials`: the current password is wrong", body = ErrorBody),
    (status = 422, description = "`invalid_input`, `password_too_short`, `password_too_long` or `password_too_common`", body = ErrorBody)))]
pub async fn change_password(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    throttle: unhidra_runtime::Throttle,
    unhidra_runtime::ApiJson(change): unhidra_runtime::ApiJson<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    // Guessing the current password here is guessing a login.
    let limits = &state.service.limits;
    throttle
        .limit(limits.login_account.as_ref(), &me.user.to_string())
        .await?;
    crate::passwords::check_length(&change.current_password)?;
    crate::passwords::check_length(&change.new_password)?;
    let (email, hash) = state
        .service
        .accounts
        .password_of(me.user)
        .await?
        .ok_or_else(|| ApiError::unauthenticated("no such account"))?;
    let passwords = &state.service.passwords;
    if !passwords
        .verify(change.current_password, Some(hash))
        .await?
    {
        tracing::warn!(user_id = %me.user, client_ip = %throttle.ip, "password change refused: wrong current password");
        state.ctx.limits.strike(&throttle.ip).await;
        return Err(ApiError::Unauthenticated {
            code: "invalid_credentials",
            message: "the current password is wrong".into(),
        });
    }
    crate::passwords::check_policy(&change.new_password, &email)?;
    let new_hash = passwords.hash(change.new_password).await?;
    state
        .service
        .accounts
        .set_password(me.user, &new_hash)
        .await?;
    let others = state
        .service
        .sessions
        .revoke_all_but(me.user, Some(me.session))
        .await?;
    tracing::info!(user_id = %me.user, ended = others.len(), "password changed");
    state
        .ctx
        .audit(
            AuditEvent::new(AuditKind::PasswordChanged, Some(me.user), None)
                .with_detail(serde_json::json!({ "sessions_ended": others.len() })),
        )
        .await;
    announce(&state, me.user, others).await;
    Ok(StatusCode::NO_CONTENT)
}
