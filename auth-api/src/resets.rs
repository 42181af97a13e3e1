//! Password reset by mail: `POST /api/v1/auth/password/reset` mails a
//! one-time token (stored hashed, valid 15 minutes) to the account's email,
//! answering the same whether or not the account exists; `POST
//! /api/v1/auth/password/reset/confirm` sets the new password with it, ends
//! every session and lifts a lockout.

use axum::{Json, extract::State, http::StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use unhidra_core::error::ErrorBody;
use unhidra_core::events::{AuditEvent, AuditKind};
use unhidra_runtime::{ApiError, ApiJson, Throttle};

use crate::{
    AuthState,
    one_time_tokens::{hash_token, new_token},
    passwords::{check_length, check_policy},
    users::normalize_email,
};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    email: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ResetRequested {
    status: &'static str,
}

#[utoipa::path(post, path = "/api/v1/auth/password/reset", tag = "auth", request_body = ResetRequest, responses(
    (status = 202, description = "The same for every email: a reset mail goes out if it has an account", body = ResetRequested)))]
pub async fn request(
    State(state): State<AuthState>,
    throttle: Throttle,
    ApiJson(request): ApiJson<ResetRequest>,
) -> Result<(StatusCode, Json<ResetRequested>), ApiError> {
    let limits = &state.service.limits;
    throttle.limit_ip(limits.reset_ip.as_ref()).await?;
    let email = normalize_email(&request.email)
        .ok_or_else(|| ApiError::Invalid("email is not a valid address".into()))?;
    throttle
        .limit(limits.reset_account.as_ref(), &email)
        .await?;
    // The same answer, at once, whether the account exists or not: the work
    // happens after the response.
    let worker = state.clone();
    state.ctx.in_flight.spawn(async move {
        if let Err(e) = send_reset(&worker, &email).await {
            tracing::error!(error = ?e, "password reset mail not sent");
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(ResetRequested {
            status: "if an account has this email, a reset link is on its way",
        }),
    ))
}

async fn send_reset(state: &AuthState, email: &str) -> anyhow::Result<()> {
    let Some(account) = state.service.accounts.credentials(email).await? else {
        tracing::info!("password reset asked for an unknown email");
        return Ok(());
    };
    if account.standing.disabled {
        tracing::info!(user_id = %account.user, "password reset refused: account disabled");
        return Ok(());
    }
    let (token, token_hash) = new_token();
    state
        .service
        .resets
        .create(account.user, &token_hash)
        .await?;
    let link = format!(
        "{}/reset-password?token={token}",
        state.ctx.config.public_url.trim_end_matches('/')
    );
    let body = format!(
        "Someone asked to reset the password of your Unhidra account.\n\n\
         To choose a new one, open\n{link}\n\n\
         or send POST /api/v1/auth/password/reset/confirm with this token:\n{token}\n\n\
         It works once, for 15 minutes. If you did not ask, ignore this mail: \
         your password stays as it is.\n"
    );
    state
        .service
        .mailer
        .send(email, "Reset your Unhidra password", body)
        .await?;
    tracing::info!(user_id = %account.user, "password reset mailed");
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirm {
    #[schema(value_type = String)]
    token: SecretString,
    #[schema(value_type = String)]
    new_password: SecretString,
}

#[utoipa::path(post, path = "/api/v1/auth/password/reset/confirm", tag = "auth", request_body = ResetConfirm, responses(
    (status = 204, description = "The password is set; every session ended"),
    (status = 401, description = "`invalid_reset_token`: unknown, used or expired", body = ErrorBody),
    (status = 422, description = "`invalid_input`, `password_too_short`, `password_too_long` or `password_too_common`", body = ErrorBody)))]
pub async fn confirm(
    State(state): State<AuthState>,
    throttle: Throttle,
    ApiJson(confirm): ApiJson<ResetConfirm>,
) -> Result<StatusCode, ApiError> {
    throttle
        .limit_ip(state.service.limits.reset_ip.as_ref())
        .await?;
    check_length(&confirm.new_password)?;
    let refused = || ApiError::Unauthenticated {
        code: "invalid_reset_token",
        message: "the reset token is unknown, used or expired".into(),
    };
    let token_hash = hash_token(confirm.token.expose_secret());
    let resets = &state.service.resets;
    let user = resets.peek(&token_hash).await?.ok_or_else(refused)?;
    let accounts = &state.service.accounts;
    let (email, _) = accounts.password_of(user).await?.ok_or_else(refused)?;
    // Checked before the token is used up: a refused password keeps it.
    check_policy(&confirm.new_password, &email)?;
    let hash = state.service.passwords.hash(confirm.new_password).await?;
    if resets.redeem(&token_hash).await? != Some(user) {
        return Err(refused());
    }
    accounts.set_password(user, &hash).await?;
    accounts.record_success(user).await?;
    let ended = state.service.sessions.revoke_all(user).await?;
    tracing::info!(user_id = %user, sessions_ended = ended.len(), "password reset");
    state
        .ctx
        .audit(
            AuditEvent::new(AuditKind::PasswordReset, Some(user), None).with_detail(
                serde_json::json!({ "sessions_ended": ended.len(), "ip": throttle.ip.to_string() }),
            ),
        )
        .await;
    crate::sessions::manage::announce(&state, user, ended).await;
    Ok(StatusCode::NO_CONTENT)
}
