//! Invites for `UNHIDRA_REGISTRATION=invite`: an admin creates a code
//! (`POST /api/v1/admin/invites`, shown once, stored hashed) and a
//! registration uses it up.

use std::time::Duration;

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::UserId,
};
use unhidra_runtime::{AdminUser, ApiError, ApiJson};
use unhidra_store::{Database, now_millis};

use crate::{
    AuthState,
    fields::time,
    one_time_tokens::{hash_token, new_token},
};

const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_TTL_SECS: u64 = 90 * 24 * 3600;

#[derive(Clone, Debug)]
pub struct InviteRepo {
    db: Database,
}

impl InviteRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn create(&self, code_hash: &str, by: UserId, ttl: Duration) -> anyhow::Result<i64> {
        let now = now_millis();
        let expires_at = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        sqlx::query(
            "INSERT INTO invites (code_hash, created_by, created_at, expires_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(code_hash)
        .bind(by.to_string())
        .bind(now)
        .bind(expires_at)
        .execute(&self.db.pool)
        .await?;
        Ok(expires_at)
    }

    /// Whether the code is live and unused (without using it).
    pub async fn valid(&self, code_hash: &str) -> anyhow::Result<bool> {
        let found: Option<String> = sqlx::query_scalar(
            "SELECT code_hash FROM invites WHERE code_hash = $1 AND used_at IS NULL AND expires_at > $2",
        )
        .bind(code_hash)
        .bind(now_millis())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(found.is_some())
    }

    /// Uses the code up for `user`; false if it was not live and unused.
    pub async fn redeem(&self, code_hash: &str, user: UserId) -> anyhow::Result<bool> {
        let used = sqlx::query(
            "UPDATE invites SET used_at = $1, used_by = $2
             WHERE code_hash = $3 AND used_at IS NULL AND expires_at > $1",
        )
        .bind(now_millis())
        .bind(user.to_string())
        .bind(code_hash)
        .execute(&self.db.pool)
        .await?;
        Ok(used.rows_affected() == 1)
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    expires_in_secs: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Invite {
    /// Shown this once; only its hash is kept.
    code: String,
    expires_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/api/v1/admin/invites", tag = "admin", security(("bearer" = []), ("api_key" = [])), request_body = InviteRequest, responses(
    (status = 201, description = "An invite code, shown once", body = Invite)))]
pub async fn create(
    State(state): State<AuthState>,
    AdminUser(admin): AdminUser,
    ApiJson(request): ApiJson<InviteRequest>,
) -> Result<(StatusCode, Json<Invite>), ApiError> {
    let ttl = match request.expires_in_secs {
        None => DEFAULT_TTL,
        Some(secs) if (1..=MAX_TTL_SECS).contains(&secs) => Duration::from_secs(secs),
        Some(_) => {
            return Err(ApiError::Invalid(format!(
                "expires_in_secs must be 1 to {MAX_TTL_SECS}"
            )));
        }
    };
    let (code, code_hash) = new_token();
    let expires_at = state
        .service
        .invites
        .create(&code_hash, admin.user, ttl)
        .await?;
    tracing::info!(admin_id = %admin.user, "invite created");
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::InviteCreated,
            Some(admin.user),
            None,
        ))
        .await;
    Ok((
        StatusCode::CREATED,
        Json(Invite {
            code,
            expires_at: time(expires_at),
        }),
    ))
}

/// The hash an invite code is kept under.
pub fn hash_code(code: &str) -> String {
    hash_token(code)
}
