//! Registration: `POST /api/v1/auth/register`.

use axum::{Json, extract::State, http::StatusCode};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::UserId,
    users::SystemRole,
};
use unhidra_runtime::{ApiError, ApiJson, Throttle};

use crate::{
    AuthState,
    accounts::NewUser,
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
