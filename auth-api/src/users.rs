//! Accounts as their owners use them: `POST /api/v1/auth/register`, and
//! `GET`/`PATCH /api/v1/users/me` with `POST /api/v1/users/me/deletion` (a
//! request that an admin carries out).

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use unhidra_core::error::ErrorBody;
use unhidra_core::{
    config::Registration,
    events::{AuditEvent, AuditKind},
    ids::UserId,
    users::SystemRole,
};
use unhidra_runtime::{ApiError, ApiJson, CurrentUser, SessionUser, Throttle};

use crate::{
    AuthState,
    accounts::{NewUser, Profile},
    fields::{printable, time},
    invites,
    one_time_tokens::{hash_token, new_token},
    passwords::{check_length, check_policy},
};
const MAX_DISPLAY_NAME_CHARS: usize = 64;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    email: String,
    #[schema(value_type = String)]
    password: SecretString,
    display_name: Option<String>,
    /// With `UNHIDRA_REGISTRATION=invite`: the code an admin gave.
    #[schema(value_type = Option<String>)]
    invite: Option<SecretString>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Registered {
    user_id: UserId,
    email: String,
    display_name: String,
}

/// Lower-cased, trimmed, and plausibly an address; `None` otherwise.
pub fn normalize_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_lowercase();
    let (local, domain) = email.split_once('@')?;
    let plausible = (3..=254).contains(&email.len())
        && !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    plausible.then_some(email)
}

fn display_name(requested: Option<String>, email: &str) -> Result<String, ApiError> {
    let name = match &requested {
        Some(name) => name.as_str(),
        None => email.split('@').next().unwrap_or_default(),
    };
    printable("display_name", name, MAX_DISPLAY_NAME_CHARS)
}

/// What registering answered when email verification is on: the same for
/// a new and a taken email.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VerificationSent {
    status: &'static str,
}

#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterRequest, responses(
    (status = 201, description = "Registered (email verification off)", body = Registered),
    (status = 202, description = "With email verification on: the same answer for a new and a taken email; the owner is mailed", body = VerificationSent),
    (status = 403, description = "`registration_closed`, `invite_required` or `invalid_invite`", body = ErrorBody),
    (status = 409, description = "`email_taken` (email verification off)", body = ErrorBody),
    (status = 422, description = "`invalid_input`, `password_too_short`, `password_too_long` or `password_too_common`", body = ErrorBody)))]
pub async fn register(
    State(state): State<AuthState>,
    throttle: Throttle,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<Response, ApiError> {
    let config = &state.ctx.config;
    if config.registration == Registration::Closed {
        return Err(ApiError::Denied {
            code: "registration_closed",
            message: "registration is closed; an admin creates accounts".into(),
        });
    }
    let limits = &state.service.limits;
    throttle.limit_ip(limits.register_ip.as_ref()).await?;
    check_length(&request.password)?;
    let email = normalize_email(&request.email)
        .ok_or_else(|| ApiError::Invalid("email is not a valid address".into()))?;
    throttle
        .limit(limits.register_account.as_ref(), &email)
        .await?;
    check_policy(&request.password, &email)?;
    let display_name = display_name(request.display_name, &email)?;
    let invite = match (config.registration, request.invite) {
        (Registration::Invite, None) => {
            return Err(ApiError::Denied {
                code: "invite_required",
                message: "registration needs an invite".into(),
            });
        }
        (Registration::Invite, Some(code)) => {
            let code_hash = invites::hash_code(code.expose_secret());
            if !state.service.invites.valid(&code_hash).await? {
                return Err(invalid_invite());
            }
            Some(code_hash)
        }
        _ => None,
    };
    let account = NewAccount {
        email,
        display_name,
        password: request.password,
        invite,
    };
    if !config.email_verification {
        let registered = create(&state, account, false).await?;
        return Ok((StatusCode::CREATED, Json(registered)).into_response());
    }
    // The same answer, at once, for a new and a taken email; the work (and
    // its time) happens after the response.
    let worker = state.clone();
    state.ctx.in_flight.spawn(async move {
        if let Err(e) = register_and_mail(&worker, account).await {
            tracing::error!(error = ?e, "registration with verification failed");
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(VerificationSent {
            status: "check your email to finish registering",
        }),
    )
        .into_response())
}

fn invalid_invite() -> ApiError {
    ApiError::Denied {
        code: "invalid_invite",
        message: "the invite is unknown, used or expired".into(),
    }
}

/// A registration that passed every check that does not depend on whether
/// the email is taken.
struct NewAccount {
    email: String,
    display_name: String,
    password: SecretString,
    invite: Option<String>,
}

/// Creates the account (using its invite up); 409 when the email is taken.
async fn create(
    state: &AuthState,
    account: NewAccount,
    unverified: bool,
) -> Result<Registered, ApiError> {
    let taken = || ApiError::Conflict {
        code: "email_taken",
        message: "an account with this email exists".into(),
    };
    let accounts = &state.service.accounts;
    // Checked before hashing so a taken email costs no argon2 work; the unique
    // index still decides races.
    if accounts.email_taken(&account.email).await? {
        return Err(taken());
    }
    let hash = state.service.passwords.hash(account.password).await?;
    let user_id = UserId::new();
    let created = accounts
        .create_user(&NewUser {
            id: user_id,
            email: &account.email,
            display_name: &account.display_name,
            password_hash: &hash,
            role: SystemRole::Member,
            unverified,
        })
        .await?;
    if !created {
        return Err(taken());
    }
    if let Some(code_hash) = &account.invite {
        if !state.service.invites.redeem(code_hash, user_id).await? {
            // Used by a racing registration meanwhile: this one goes too.
            accounts.delete(user_id).await?;
            return Err(invalid_invite());
        }
    }
    tracing::info!(%user_id, "user registered");
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::UserRegistered,
            Some(user_id),
            None,
        ))
        .await;
    Ok(Registered {
        user_id,
        email: account.email,
        display_name: account.display_name,
    })
}

/// With verification on: a new email gets its account and a link; a taken
/// one gets a warning to its owner instead.
async fn register_and_mail(state: &AuthState, account: NewAccount) -> anyhow::Result<()> {
    let email = account.email.clone();
    let mailer = &state.service.mailer;
    match create(state, account, true).await {
        Ok(registered) => {
            let (token, token_hash) = new_token();
            state
                .service
                .verifications
                .create(registered.user_id, &token_hash)
                .await?;
            let link = format!(
                "{}/verify-email?token={token}",
                state.ctx.config.public_url.trim_end_matches('/')
            );
            let body = format!(
                "Welcome to Unhidra. To confirm this email address and finish \
                 registering, open\n{link}\n\n\
                 or send POST /api/v1/auth/verify with this token:\n{token}\n\n\
                 It works once, for a day.\n"
            );
            mailer
                .send(&email, "Confirm your email for Unhidra", body)
                .await
        }
        Err(ApiError::Conflict { .. }) => {
            let body = "Someone tried to register a new Unhidra account with this email \
                        address, which already has one. If it was you, log in, or reset \
                        your password. If not, you can ignore this mail.\n"
                .to_owned();
            mailer
                .send(&email, "Your Unhidra account already exists", body)
                .await
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    #[schema(value_type = String)]
    token: SecretString,
}

/// `POST /api/v1/auth/verify`: confirms an email with its mailed token.
#[utoipa::path(post, path = "/api/v1/auth/verify", tag = "auth", request_body = VerifyRequest, responses(
    (status = 204, description = "The email is confirmed"),
    (status = 401, description = "`invalid_verification_token`", body = ErrorBody)))]
pub async fn verify(
    State(state): State<AuthState>,
    throttle: Throttle,
    ApiJson(request): ApiJson<VerifyRequest>,
) -> Result<StatusCode, ApiError> {
    throttle
        .limit_ip(state.service.limits.register_ip.as_ref())
        .await?;
    let token_hash = hash_token(request.token.expose_secret());
    let user = state
        .service
        .verifications
        .redeem(&token_hash)
        .await?
        .ok_or_else(|| ApiError::Unauthenticated {
            code: "invalid_verification_token",
            message: "the verification token is unknown, used or expired".into(),
        })?;
    state.service.accounts.verify_email(user).await?;
    tracing::info!(user_id = %user, "email verified");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::normalize_email;

    #[test]
    fn emails_are_normalised_or_refused() {
        assert_eq!(
            normalize_email("  Ann@Example.COM "),
            Some("ann@example.com".into())
        );
        for bad in [
            "",
            "ann",
            "@example.com",
            "ann@",
            "a b@example.com",
            "a@b@c",
            "a@\u{7}b",
        ] {
            assert_eq!(normalize_email(bad), None, "{bad:?}");
        }
    }
}

/// An account as its owner and admins see it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ProfileView {
    user_id: UserId,
    email: String,
    display_name: String,
    role: SystemRole,
    created_at: chrono::DateTime<chrono::Utc>,
    disabled: bool,
    deletion_requested_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<Profile> for ProfileView {
    fn from(p: Profile) -> Self {
        Self {
            user_id: p.id,
            email: p.email,
            display_name: p.display_name,
            role: p.role,
            created_at: time(p.created_at),
            disabled: p.disabled_at.is_some(),
            deletion_requested_at: p.deletion_requested_at.map(time),
        }
    }
}

fn no_account() -> ApiError {
    ApiError::NotFound("no such account".into())
}

#[utoipa::path(get, path = "/api/v1/users/me", tag = "account", security(("bearer" = []), ("api_key" = [])), responses(
    (status = 200, description = "Your account", body = ProfileView),
    (status = 404, description = "`not_found`: the account is gone", body = ErrorBody)))]
pub async fn me(
    State(state): State<AuthState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<ProfileView>, ApiError> {
    let profile = state.service.accounts.profile(me.user).await?;
    Ok(Json(profile.ok_or_else(no_account)?.into()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileChange {
    display_name: String,
}

#[utoipa::path(patch, path = "/api/v1/users/me", tag = "account", security(("bearer" = []), ("api_key" = [])), request_body = ProfileChange, responses(
    (status = 200, description = "The updated account", body = ProfileView),
    (status = 404, description = "`not_found`: the account is gone", body = ErrorBody)))]
pub async fn update_me(
    State(state): State<AuthState>,
    CurrentUser(me): CurrentUser,
    ApiJson(change): ApiJson<ProfileChange>,
) -> Result<Json<ProfileView>, ApiError> {
    let accounts = &state.service.accounts;
    let profile = accounts.profile(me.user).await?.ok_or_else(no_account)?;
    let name = display_name(Some(change.display_name), &profile.email)?;
    accounts.set_display_name(me.user, &name).await?;
    let profile = accounts.profile(me.user).await?.ok_or_else(no_account)?;
    Ok(Json(profile.into()))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DeletionRequested {
    deletion_requested_at: chrono::DateTime<chrono::Utc>,
}

#[utoipa::path(post, path = "/api/v1/users/me/deletion", tag = "account", security(("bearer" = [])), responses(
    (status = 202, description = "Deletion requested (an admin carries it out)", body = DeletionRequested),
    (status = 404, description = "`not_found`: the account is gone", body = ErrorBody)))]
pub async fn request_deletion(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
) -> Result<(StatusCode, Json<DeletionRequested>), ApiError> {
    let at = state
        .service
        .accounts
        .request_deletion(me.user)
        .await?
        .ok_or_else(no_account)?;
    tracing::info!(user_id = %me.user, "account deletion requested");
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::DeletionRequested,
            Some(me.user),
            None,
        ))
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(DeletionRequested {
            deletion_requested_at: time(at),
        }),
    ))
}
