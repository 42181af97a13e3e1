//! The admin API (every call needs the admin role; changes are audited):
//! `GET /api/v1/admin/users` lists and searches accounts, `GET`, `PATCH` and
//! `DELETE /api/v1/admin/users/{id}` read, change (role, disabled) and
//! delete one; `POST /api/v1/admin/blocks`, `GET` and `DELETE
//! /api/v1/admin/blocks/{ip}` block and unblock client addresses on every
//! node; `POST /api/v1/admin/keys/rotate` rotates the token signing key.
//! Also the first admin: from the bootstrap settings at start, or from
//! `unhidra admin create`.

use std::{net::IpAddr, time::Duration};
use unhidra_core::error::ErrorBody;

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::StatusCode,
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::UserId,
    users::SystemRole,
};
use unhidra_runtime::{AdminUser, ApiError, ApiJson, ClientIp};

use crate::{
    AuthState,
    accounts::{AccountRepo, NewUser},
    passwords::{Passwords, check_length, check_policy},
    users::{ProfileView, normalize_email},
};

/// The longest block an admin may set: a year.
const MAX_BLOCK_SECS: u64 = 365 * 24 * 3600;
const MAX_REASON_CHARS: usize = 200;

const MAX_PAGE: u32 = 200;
const DEFAULT_PAGE: u32 = 50;
const MAX_SEARCH_CHARS: usize = 100;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UserQuery {
    search: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UserPage {
    users: Vec<ProfileView>,
    /// Pass as `after` for the next page; null on the last one.
    next: Option<UserId>,
}

#[utoipa::path(get, path = "/api/v1/admin/users", tag = "admin", security(("bearer" = []), ("api_key" = [])), params(UserQuery), responses(
    (status = 200, description = "Accounts matching `search`, by id", body = UserPage)))]
pub async fn list_users(
    State(state): State<AuthState>,
    AdminUser(_admin): AdminUser,
    query: Result<Query<UserQuery>, QueryRejection>,
) -> Result<Json<UserPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid(format!("limit must be 1 to {MAX_PAGE}")));
    }
    let search = query.search.unwrap_or_default();
    if search.chars().count() > MAX_SEARCH_CHARS {
        return Err(ApiError::Invalid(format!(
            "search has at most {MAX_SEARCH_CHARS} characters"
        )));
    }
    let after = match query.after {
        Some(after) => Some(
            after
                .parse::<UserId>()
                .map_err(|_| ApiError::Invalid("after must be a user id".into()))?,
        ),
        None => None,
    };
    let users = state.service.accounts.list(&search, after, limit).await?;
    let next = (users.len() == limit as usize)
        .then(|| users.last().map(|u| u.id))
        .flatten();
    Ok(Json(UserPage {
        users: users.into_iter().map(ProfileView::from).collect(),
        next,
    }))
}

#[utoipa::path(get, path = "/api/v1/admin/users/{user_id}", tag = "admin", security(("bearer" = []), ("api_key" = [])), params(("user_id" = String, Path, description = "A user id")), responses(
    (status = 200, description = "The account", body = crate::users::ProfileView)))]
pub async fn show_user(
    State(state): State<AuthState>,
    AdminUser(_admin): AdminUser,
    Path(user): Path<String>,
) -> Result<Json<ProfileView>, ApiError> {
    let no_such_user = || ApiError::NotFound("no such user".into());
    let user: UserId = user.parse().map_err(|_| no_such_user())?;
    let profile = state.service.accounts.profile(user).await?;
    Ok(Json(profile.ok_or_else(no_such_user)?.into()))
}

#[utoipa::path(delete, path = "/api/v1/admin/users/{user_id}", tag = "admin", security(("bearer" = []), ("api_key" = [])), params(("user_id" = String, Path, description = "A user id")), responses(
    (status = 204, description = "Deleted: erased, sessions and keys revoked, rooms left"),
    (status = 409, description = "`own_account`: admins cannot delete themselves", body = ErrorBody)))]
pub async fn delete_user(
    State(state): State<AuthState>,
    AdminUser(admin): AdminUser,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    let no_such_user = || ApiError::NotFound("no such user".into());
    let user: UserId = user.parse().map_err(|_| no_such_user())?;
    if user == admin.user {
        return Err(ApiError::Conflict {
            code: "own_account",
            message: "admins cannot delete themselves".into(),
        });
    }
    if !state.service.accounts.delete(user).await? {
        return Err(no_such_user());
    }
    revoke_everything(&state, user).await?;
    tracing::warn!(admin_id = %admin.user, user_id = %user, "account deleted");
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::UserDeleted,
            Some(admin.user),
            Some(user.to_string()),
        ))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserChange {
    role: Option<SystemRole>,
    disabled: Option<bool>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UserStanding {
    user_id: UserId,
    role: SystemRole,
    disabled: bool,
}

#[utoipa::path(patch, path = "/api/v1/admin/users/{user_id}", tag = "admin", security(("bearer" = []), ("api_key" = [])), params(("user_id" = String, Path, description = "A user id")), request_body = UserChange, responses(
    (status = 200, description = "The account's role and state now", body = UserStanding),
    (status = 409, description = "`own_account`: admins cannot demote or disable themselves", body = ErrorBody)))]
pub async fn change_user(
    State(state): State<AuthState>,
    AdminUser(admin): AdminUser,
    Path(user): Path<String>,
    ApiJson(change): ApiJson<UserChange>,
) -> Result<Json<UserStanding>, ApiError> {
    let no_such_user = || ApiError::NotFound("no such user".into());
    let user: UserId = user.parse().map_err(|_| no_such_user())?;
    let demotes_self = change.role.is_some_and(|r| r != SystemRole::Admin);
    if user == admin.user && (demotes_self || change.disabled == Some(true)) {
        return Err(ApiError::Conflict {
            code: "own_account",
            message: "admins cannot demote or disable themselves".into(),
        });
    }
    let accounts = &state.service.accounts;
    if let Some(role) = change.role {
        if !accounts.set_role(user, role).await? {
            return Err(no_such_user());
        }
    }
    if let Some(disabled) = change.disabled {
        if !accounts.set_disabled(user, disabled).await? {
            return Err(no_such_user());
        }
        if disabled {
            // Its tokens and keys stop working now, its sockets close.
            revoke_everything(&state, user).await?;
        }
    }
    let standing = accounts.standing(user).await?.ok_or_else(no_such_user)?;
    tracing::info!(admin_id = %admin.user, user_id = %user, role = %standing.role, disabled = standing.disabled, "account changed");
    let detail = json!({"role": standing.role, "disabled": standing.disabled});
    state
        .ctx
        .audit(
            AuditEvent::new(
                AuditKind::UserChanged,
                Some(admin.user),
                Some(user.to_string()),
            )
            .with_detail(detail),
        )
        .await;
    Ok(Json(UserStanding {
        user_id: user,
        role: standing.role,
        disabled: standing.disabled,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockRequest {
    ip: String,
    seconds: u64,
    reason: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BlockView {
    ip: String,
    blocked: bool,
    /// Seconds until the block ends, when blocked.
    retry_after_secs: Option<u64>,
}

fn address(raw: &str) -> Result<ClientIp, ApiError> {
    raw.trim().parse::<IpAddr>().map(ClientIp).map_err(|_| {
        ApiError::Invalid(format!(
            "`{}` is not an IP address",
            raw.chars().take(64).collect::<String>()
        ))
    })
}

#[utoipa::path(post, path = "/api/v1/admin/blocks", tag = "admin", security(("bearer" = []), ("api_key" = [])), request_body = BlockRequest, responses(
    (status = 201, description = "Blocked on every node", body = BlockView)))]
pub async fn block(
    State(state): State<AuthState>,
    AdminUser(admin): AdminUser,
    ApiJson(request): ApiJson<BlockRequest>,
) -> Result<(StatusCode, Json<BlockView>), ApiError> {
    let ip = address(&request.ip)?;
    if !(1..=MAX_BLOCK_SECS).contains(&request.seconds) {
        return Err(ApiError::Invalid(format!(
            "seconds must be 1 to {MAX_BLOCK_SECS}"
        )));
    }
    let reason = request.reason.unwrap_or_default();
    if reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
        return Err(ApiError::Invalid(format!(
            "reason must be at most {MAX_REASON_CHARS} printable characters"
        )));
    }
    state
        .ctx
        .limits
        .block(&ip, Duration::from_secs(request.seconds))
        .await;
    tracing::warn!(admin_id = %admin.user, client_ip = %ip, seconds = request.seconds, "address blocked by an admin");
    let detail = json!({
        "message": format!("{ip} blocked by an admin for {} s", request.seconds),
        "ip": ip.to_string(),
        "block_secs": request.seconds,
        "reason": reason,
    });
    state
        .ctx
        .audit(
            AuditEvent::new(AuditKind::IpBlocked, Some(admin.user), Some(ip.key()))
                .with_detail(detail),
        )
        .await;
    Ok((StatusCode::CREATED, Json(block_view(&state, ip).await)))
}

#[utoipa::path(get, path = "/api/v1/admin/blocks/{ip}", tag = "admin", security(("bearer" = []), ("api_key" = [])), params(("ip" = String, Path, description = "An IPv4 or IPv6 address")), responses(
    (status = 200, description = "Whether the address is blocked, and for how long", body = BlockView)))]
pub async fn show_block(
    State(state): State<AuthState>,
    AdminUser(_admin): AdminUser,
    Path(ip): Path<String>,
) -> Result<Json<BlockView>, ApiError> {
    Ok(Json(block_view(&state, address(&ip)?).await))
}

#[utoipa::path(delete, path = "/api/v1/admin/blocks/{ip}", tag = "admin", security(("bearer" = []), ("api_key" = [])), params(("ip" = String, Path, description = "An IPv4 or IPv6 address")), responses(
    (status = 204, description = "The block is lifted")))]
pub async fn unblock(
    State(state): State<AuthState>,
    AdminUser(admin): AdminUser,
    Path(ip): Path<String>,
) -> Result<StatusCode, ApiError> {
    let ip = address(&ip)?;
    state.ctx.limits.unblock(&ip).await;
    tracing::info!(admin_id = %admin.user, client_ip = %ip, "address unblocked by an admin");
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::IpUnblocked,
            Some(admin.user),
            Some(ip.key()),
        ))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RotatedKeys {
    /// The key new access tokens are signed with.
    kid: String,
    /// Every key in the JWKS, oldest first.
    published: Vec<String>,
    /// How long a replaced key stays published (its last tokens expire).
    replaced_published_for_secs: u64,
}

/// `POST /api/v1/admin/keys/rotate`: a new signing key signs from now on
/// (on other replicas within their next reload).
#[utoipa::path(post, path = "/api/v1/admin/keys/rotate", tag = "admin", security(("bearer" = []), ("api_key" = [])), responses(
    (status = 200, description = "A new signing key signs from now on", body = RotatedKeys)))]
pub async fn rotate_keys(
    State(state): State<AuthState>,
    AdminUser(admin): AdminUser,
) -> Result<Json<RotatedKeys>, ApiError> {
    let keys = &state.service.keys;
    let kid = keys.rotate().await?;
    crate::signing_keys::announce(&state.ctx, keys).await;
    tracing::info!(admin_id = %admin.user, kid, "signing key rotated by an admin");
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::SigningKeyRotated,
            Some(admin.user),
            Some(kid.clone()),
        ))
        .await;
    Ok(Json(RotatedKeys {
        kid,
        published: keys.jwks().keys.into_iter().map(|k| k.kid).collect(),
        replaced_published_for_secs: keys.keep_for().as_secs(),
    }))
}

/// Revokes every session and API key of `user`, everywhere.
async fn revoke_everything(state: &AuthState, user: UserId) -> anyhow::Result<()> {
    let mut revoked = state.service.sessions.revoke_all(user).await?;
    revoked.extend(crate::api_keys::revoke_all(state, user).await?);
    crate::sessions::manage::announce(state, user, revoked).await;
    Ok(())
}

async fn block_view(state: &AuthState, ip: ClientIp) -> BlockView {
    let left = state.ctx.limits.blocked(&ip).await;
    BlockView {
        ip: ip.key(),
        blocked: left.is_some(),
        retry_after_secs: left.map(|d| d.as_secs().max(1)),
    }
}

/// Makes the account with `email` an admin, creating it with `password` if
/// there is none (an existing account keeps its password). Idempotent, and
/// safe when several auth-api replicas run it at once.
pub async fn ensure_admin(
    accounts: &AccountRepo,
    passwords: &Passwords,
    email: &str,
    password: SecretString,
) -> anyhow::Result<UserId> {
    let email = normalize_email(email)
        .ok_or_else(|| anyhow::anyhow!("the admin email `{email}` is not a valid address"))?;
    if let Some(existing) = accounts.promote(&email).await? {
        return Ok(existing);
    }
    check_length(&password).map_err(|e| anyhow::anyhow!("admin password: {e}"))?;
    check_policy(&password, &email).map_err(|e| anyhow::anyhow!("admin password: {e}"))?;
    let hash = passwords
        .hash(password)
        .await
        .map_err(|e| anyhow::anyhow!("hashing the admin password: {e}"))?;
    let id = UserId::new();
    let display_name = email.split('@').next().unwrap_or("admin");
    let created = accounts
        .create_user(&NewUser {
            id,
            email: &email,
            display_name,
            password_hash: &hash,
            role: SystemRole::Admin,
            unverified: false,
        })
        .await?;
    if created {
        return Ok(id);
    }
    // Another replica created it meanwhile.
    accounts
        .promote(&email)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the admin account vanished while being created"))
}
