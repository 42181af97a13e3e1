//! Accounts as their owners use them: `POST /api/v1/auth/register`, and
//! `GET`/`PATCH /api/v1/users/me` with `POST /api/v1/users/me/deletion` (a
//! request that an admin carries out).

use axum::{Json, extract::State, http::StatusCode};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::UserId,
    users::SystemRole,
};
use unhidra_runtime::{ApiError, ApiJson, CurrentUser, Throttle};

use crate::{
    AuthState,
    accounts::{NewUser, Profile},
    passwords::{check_length, check_policy},
};
const MAX_DISPLAY_NAME_CHARS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    email: String,
    password: SecretString,
    display_name: Option<String>,
}

#[derive(Serialize)]
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
    let name = match requested {
        Some(name) => name.trim().to_owned(),
        None => email.split('@').next().unwrap_or_default().to_owned(),
    };
    let length = name.chars().count();
    if length == 0 || length > MAX_DISPLAY_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ApiError::Invalid(format!(
            "display_name must be 1 to {MAX_DISPLAY_NAME_CHARS} printable characters"
        )));
    }
    Ok(name)
}

pub async fn register(
    State(state): State<AuthState>,
    throttle: Throttle,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
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
    let taken = || ApiError::Conflict {
        code: "email_taken",
        message: "an account with this email exists".into(),
    };
    let accounts = &state.service.accounts;
    // Checked before hashing so a taken email costs no argon2 work; the unique
    // index still decides races.
    if accounts.email_taken(&email).await? {
        return Err(taken());
    }
    let hash = state.service.passwords.hash(request.password).await?;
    let user_id = UserId::new();
    let created = accounts
        .create_user(&NewUser {
            id: user_id,
            email: &email,
            display_name: &display_name,
            password_hash: &hash,
            role: SystemRole::Member,
        })
        .await?;
    if !created {
        return Err(taken());
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
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            user_id,
            email,
            display_name,
        }),
    ))
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
#[derive(Serialize)]
pub struct ProfileView {
    user_id: UserId,
    email: String,
    display_name: String,
    role: SystemRole,
    created_at: chrono::DateTime<chrono::Utc>,
    disabled: bool,
    deletion_requested_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn time(millis: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(millis).unwrap_or_default()
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

pub async fn me(
    State(state): State<AuthState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<ProfileView>, ApiError> {
    let profile = state.service.accounts.profile(me.user).await?;
    Ok(Json(profile.ok_or_else(no_account)?.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileChange {
    display_name: String,
}

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

#[derive(Serialize)]
pub struct DeletionRequested {
    deletion_requested_at: chrono::DateTime<chrono::Utc>,
}

pub async fn request_deletion(
    State(state): State<AuthState>,
    CurrentUser(me): CurrentUser,
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
