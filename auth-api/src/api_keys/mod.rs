//! API keys for services and bots, managed by their owner with an access
//! token (never with a key): `POST /api/v1/api-keys` creates one (the key is
//! shown this once), `GET` lists them without secrets, `POST
//! /api/v1/api-keys/{id}/rotate` replaces one, `DELETE /api/v1/api-keys/{id}`
//! revokes one. Every service accepts a key in `X-API-Key` wherever it
//! accepts a bearer token, asking auth-api who it belongs to over the bus
//! (`auth.api_key`, answered by [`lookup`]). Revoking a key is announced like
//! a revoked session, so every process refuses it at once and gateways
//! close its sockets.

mod repo;

use std::time::Duration;
use unhidra_core::error::ErrorBody;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use unhidra_core::{
    api_keys::{self, ApiKeyIdentity, ApiScope, ApiScopes},
    events::{AuditEvent, AuditKind},
    ids::{ApiKeyId, SessionId, UserId},
    rpc::{ApiKeyLookup, RpcCode, RpcError},
};
use unhidra_runtime::{ApiError, ApiJson, SessionUser};

pub use self::repo::ApiKeyRepo;
use self::repo::{ApiKey, NewApiKey};
use crate::{
    AuthState,
    fields::{printable, time},
};

const MAX_NAME_CHARS: usize = 64;
/// Live keys one user may hold.
const MAX_KEYS_PER_USER: usize = 50;
const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
const MIN_LIFETIME_SECS: u64 = 60;
const MAX_LIFETIME_SECS: u64 = 2 * 365 * 24 * 3600;
/// The longest a rotated key may keep working beside its replacement.
const MAX_GRACE_SECS: u64 = 7 * 24 * 3600;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    name: String,
    #[schema(value_type = Vec<unhidra_core::api_keys::ApiScope>)]
    scopes: ApiScopes,
    expires_in_secs: Option<u64>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the replaced key keeps working (0, the default: not at all).
    #[serde(default)]
    grace_secs: u64,
    /// The new key's lifetime; the replaced key's by default.
    expires_in_secs: Option<u64>,
}

/// A key as listed: never its secret.
#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyView {
    id: ApiKeyId,
    name: String,
    prefix: String,
    #[schema(value_type = Vec<unhidra_core::api_keys::ApiScope>)]
    scopes: ApiScopes,
    created_at: chrono::DateTime<chrono::Utc>,
    expires_at: chrono::DateTime<chrono::Utc>,
    last_used_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<ApiKey> for KeyView {
    fn from(key: ApiKey) -> Self {
        Self {
            id: key.id,
            name: key.name,
            prefix: key.prefix,
            scopes: key.scopes,
            created_at: time(key.created_at),
            expires_at: time(key.expires_at),
            last_used_at: key.last_used_at.map(time),
        }
    }
}

/// A key just made: the only answer that holds its secret.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    view: KeyView,
    /// Send as `X-API-Key`; shown this once.
    key: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyList {
    api_keys: Vec<KeyView>,
}

fn lifetime(secs: Option<u64>, default: Duration) -> Result<Duration, ApiError> {
    match secs {
        None => Ok(default),
        Some(secs) if (MIN_LIFETIME_SECS..=MAX_LIFETIME_SECS).contains(&secs) => {
            Ok(Duration::from_secs(secs))
        }
        Some(_) => Err(ApiError::Invalid(format!(
            "expires_in_secs must be {MIN_LIFETIME_SECS} to {MAX_LIFETIME_SECS}"
        ))),
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn no_key() -> ApiError {
    ApiError::NotFound("no such API key".into())
}

async fn audit(state: &AuthState, kind: AuditKind, user: UserId, key: &str) {
    state
        .ctx
        .audit(AuditEvent::new(kind, Some(user), Some(key.to_owned())))
        .await;
}

#[utoipa::path(post, path = "/api/v1/api-keys", tag = "api keys", security(("bearer" = [])), request_body = NewKeyRequest, responses(
    (status = 201, description = "The key, with its secret shown this once", body = CreatedKey),
    (status = 409, description = "`too_many_api_keys`", body = ErrorBody)))]
pub async fn create(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    ApiJson(request): ApiJson<NewKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let name = printable("name", &request.name, MAX_NAME_CHARS)?;
    if request.scopes.is_empty() {
        return Err(ApiError::Invalid(
            "scopes must name at least one of read, write, admin".into(),
        ));
    }
    if request.scopes.contains(ApiScope::Admin) && !me.role.is_admin() {
        return Err(ApiError::Forbidden(
            "only admins may make keys with the admin scope".into(),
        ));
    }
    let ttl = lifetime(request.expires_in_secs, DEFAULT_LIFETIME)?;
    let now = state.ctx.clock.now_millis();
    if state.service.api_keys.live_of(me.user, now).await?.len() >= MAX_KEYS_PER_USER {
        return Err(ApiError::Conflict {
            code: "too_many_api_keys",
            message: format!("at most {MAX_KEYS_PER_USER} API keys per user; revoke one first"),
        });
    }
    let created = issue(&state, me.user, &name, request.scopes, now, ttl).await?;
    tracing::info!(user_id = %me.user, prefix = created.view.prefix, "API key created");
    audit(
        &state,
        AuditKind::ApiKeyCreated,
        me.user,
        &created.view.prefix,
    )
    .await;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/api/v1/api-keys", tag = "api keys", security(("bearer" = [])), responses(
    (status = 200, description = "Your live keys, without secrets", body = KeyList)))]
pub async fn list(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
) -> Result<Json<KeyList>, ApiError> {
    let keys = state
        .service
        .api_keys
        .live_of(me.user, state.ctx.clock.now_millis())
        .await?;
    Ok(Json(KeyList {
        api_keys: keys.into_iter().map(KeyView::from).collect(),
    }))
}

#[utoipa::path(post, path = "/api/v1/api-keys/{key_id}/rotate", tag = "api keys", security(("bearer" = [])), params(("key_id" = String, Path, description = "An API key id")), request_body = RotateRequest, responses(
    (status = 201, description = "The new key, shown this once", body = CreatedKey)))]
pub async fn rotate(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<RotateRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    if request.grace_secs > MAX_GRACE_SECS {
        return Err(ApiError::Invalid(format!(
            "grace_secs must be 0 to {MAX_GRACE_SECS}"
        )));
    }
    let id = id.parse::<ApiKeyId>().map_err(|_| no_key())?;
    let keys = &state.service.api_keys;
    let now = state.ctx.clock.now_millis();
    let old = keys.live(me.user, id, now).await?.ok_or_else(no_key)?;
    let lived = Duration::from_millis((old.expires_at - old.created_at).unsigned_abs());
    let ttl = lifetime(request.expires_in_secs, lived)?;
    let created = issue(&state, me.user, &old.name, old.scopes, now, ttl).await?;
    let until = now.saturating_add(millis(Duration::from_secs(request.grace_secs)));
    keys.end(me.user, id, now, until).await?;
    if request.grace_secs == 0 {
        announce(&state, me.user, id).await;
    }
    tracing::info!(user_id = %me.user, replaced = old.prefix, prefix = created.view.prefix, "API key rotated");
    audit(&state, AuditKind::ApiKeyRotated, me.user, &old.prefix).await;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(delete, path = "/api/v1/api-keys/{key_id}", tag = "api keys", security(("bearer" = [])), params(("key_id" = String, Path, description = "An API key id")), responses(
    (status = 204, description = "Revoked everywhere; its sockets close with 4003")))]
pub async fn revoke(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = id.parse::<ApiKeyId>().map_err(|_| no_key())?;
    let keys = &state.service.api_keys;
    let now = state.ctx.clock.now_millis();
    let key = keys.live(me.user, id, now).await?.ok_or_else(no_key)?;
    if !keys.end(me.user, id, now, now).await? {
        return Err(no_key());
    }
    announce(&state, me.user, id).await;
    tracing::info!(user_id = %me.user, prefix = key.prefix, "API key revoked");
    audit(&state, AuditKind::ApiKeyRevoked, me.user, &key.prefix).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes every key of `user` (a disabled or deleted account); their ids
/// as the sessions to announce.
pub async fn revoke_all(state: &AuthState, user: UserId) -> anyhow::Result<Vec<SessionId>> {
    let ids = state
        .service
        .api_keys
        .revoke_all(user, state.ctx.clock.now_millis())
        .await?;
    Ok(ids.into_iter().map(|id| SessionId(id.0)).collect())
}

/// Every process refuses the key from now on and gateways close its sockets.
async fn announce(state: &AuthState, user: UserId, key: ApiKeyId) {
    crate::sessions::manage::announce(state, user, vec![SessionId(key.0)]).await;
}

/// Makes and stores a key; the answer with its secret.
async fn issue(
    state: &AuthState,
    user: UserId,
    name: &str,
    scopes: ApiScopes,
    now: i64,
    ttl: Duration,
) -> Result<CreatedKey, ApiError> {
    let mut random = [0_u8; 37];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let (prefix_bytes, secret) = random.split_at(5);
    let prefix = data_encoding::BASE32_NOPAD
        .encode(prefix_bytes)
        .to_ascii_lowercase();
    let key = api_keys::assemble(&prefix, &URL_SAFE_NO_PAD.encode(secret));
    let key_hash = unhidra_authn::hash_api_key(&key);
    let new = NewApiKey {
        id: ApiKeyId::new(),
        user,
        name,
        prefix: &prefix,
        key_hash: &key_hash,
        scopes,
        created_at: now,
        expires_at: now.saturating_add(millis(ttl)),
    };
    state.service.api_keys.insert(&new).await?;
    let view = KeyView::from(ApiKey {
        id: new.id,
        user,
        name: name.to_owned(),
        prefix: prefix.clone(),
        scopes,
        created_at: new.created_at,
        expires_at: new.expires_at,
        last_used_at: None,
    });
    Ok(CreatedKey { view, key })
}

/// Compares two hashes in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |differ, (x, y)| differ | (x ^ y)) == 0
}

/// The `auth.api_key` answer: who the key belongs to, if it is live and its
/// owner may log in.
pub async fn lookup(
    state: &AuthState,
    request: &ApiKeyLookup,
) -> Result<Option<ApiKeyIdentity>, RpcError> {
    let unavailable = |e: anyhow::Error| {
        tracing::error!(error = %e, "API key lookup failed");
        RpcError::new(RpcCode::Unavailable, "API keys cannot be checked now")
    };
    let now = state.ctx.clock.now_millis();
    let Some((key, hash)) = state
        .service
        .api_keys
        .live_by_prefix(&request.prefix, now)
        .await
        .map_err(unavailable)?
    else {
        return Ok(None);
    };
    if !same(hash.as_bytes(), request.hash.as_bytes()) {
        tracing::warn!(
            prefix = key.prefix,
            "API key with a known prefix and a wrong secret"
        );
        return Ok(None);
    }
    let standing = state
        .service
        .accounts
        .standing(key.user)
        .await
        .map_err(unavailable)?;
    let Some(standing) = standing.filter(|s| !s.disabled && !s.unverified) else {
        return Ok(None);
    };
    // Marked used only once the secret matched and the owner may log in.
    state
        .service
        .api_keys
        .mark_used(key.id, now)
        .await
        .map_err(unavailable)?;
    Ok(Some(ApiKeyIdentity {
        key: key.id,
        user: key.user,
        role: standing.role,
        scopes: key.scopes,
        expires_at: key.expires_at / 1000,
    }))
}
