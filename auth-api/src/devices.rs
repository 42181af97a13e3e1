//! A user's devices: `POST /api/v1/devices` registers one (name, platform,
//! an optional public identity key for end-to-end encryption), `GET` lists
//! them, `PATCH /api/v1/devices/{id}` renames one, `DELETE` revokes it and
//! with it every session opened on it (their sockets close). A login may
//! name one of the user's devices (`device_id`): its tokens then carry it as
//! `did`.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::{DeviceId, UserId},
};
use unhidra_runtime::{ApiError, ApiJson, SessionUser};
use unhidra_store::{Database, now_millis};

use crate::{
    AuthState,
    fields::{printable, time},
};

const MAX_NAME_CHARS: usize = 64;
const MAX_PLATFORM_CHARS: usize = 32;
const MAX_IDENTITY_KEY_CHARS: usize = 512;

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Device {
    device_id: DeviceId,
    name: String,
    platform: String,
    identity_key: Option<String>,
    created_at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct DeviceRepo {
    db: Database,
}

type DeviceRow = (String, String, String, Option<String>, i64);

fn device((id, name, platform, identity_key, created_at): DeviceRow) -> anyhow::Result<Device> {
    Ok(Device {
        device_id: id.parse()?,
        name,
        platform,
        identity_key,
        created_at: time(created_at),
    })
}

impl DeviceRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn add(
        &self,
        user: UserId,
        name: &str,
        platform: &str,
        identity_key: Option<&str>,
    ) -> anyhow::Result<Device> {
        let id = DeviceId::new();
        let now = now_millis();
        sqlx::query(
            "INSERT INTO devices (id, user_id, name, platform, identity_key, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.to_string())
        .bind(user.to_string())
        .bind(name)
        .bind(platform)
        .bind(identity_key)
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        device((
            id.to_string(),
            name.to_owned(),
            platform.to_owned(),
            identity_key.map(str::to_owned),
            now,
        ))
    }

    /// `user`'s live devices, oldest first.
    pub async fn of(&self, user: UserId) -> anyhow::Result<Vec<Device>> {
        let rows: Vec<DeviceRow> = sqlx::query_as(
            "SELECT id, name, platform, identity_key, created_at FROM devices
             WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at, id",
        )
        .bind(user.to_string())
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter().map(device).collect()
    }

    /// Whether `id` is a live device of `user`.
    pub async fn owns(&self, user: UserId, id: DeviceId) -> anyhow::Result<bool> {
        let found: Option<String> = sqlx::query_scalar(
            "SELECT id FROM devices WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(id.to_string())
        .bind(user.to_string())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(found.is_some())
    }

    pub async fn rename(&self, user: UserId, id: DeviceId, name: &str) -> anyhow::Result<bool> {
        let renamed = sqlx::query(
            "UPDATE devices SET name = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
        )
        .bind(name)
        .bind(id.to_string())
        .bind(user.to_string())
        .execute(&self.db.pool)
        .await?;
        Ok(renamed.rows_affected() == 1)
    }

    pub async fn revoke(&self, user: UserId, id: DeviceId) -> anyhow::Result<bool> {
        let revoked = sqlx::query(
            "UPDATE devices SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
        )
        .bind(now_millis())
        .bind(id.to_string())
        .bind(user.to_string())
        .execute(&self.db.pool)
        .await?;
        Ok(revoked.rows_affected() == 1)
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    name: String,
    platform: String,
    /// The device's public identity key for end-to-end encryption (base64).
    identity_key: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", security(("bearer" = [])), request_body = NewDevice, responses(
    (status = 201, description = "The device", body = Device)))]
pub async fn register(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    ApiJson(request): ApiJson<NewDevice>,
) -> Result<(StatusCode, Json<Device>), ApiError> {
    let name = printable("name", &request.name, MAX_NAME_CHARS)?;
    let platform = printable("platform", &request.platform, MAX_PLATFORM_CHARS)?;
    let identity_key = match request.identity_key {
        Some(key) => {
            let base64 = key.len() <= MAX_IDENTITY_KEY_CHARS
                && !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '-' | '_'));
            if !base64 {
                return Err(ApiError::Invalid(format!(
                    "identity_key must be base64, at most {MAX_IDENTITY_KEY_CHARS} characters"
                )));
            }
            Some(key)
        }
        None => None,
    };
    let device = state
        .service
        .devices
        .add(me.user, &name, &platform, identity_key.as_deref())
        .await?;
    tracing::info!(user_id = %me.user, device_id = %device.device_id, "device registered");
    let event = AuditEvent::new(
        AuditKind::DeviceRegistered,
        Some(me.user),
        Some(device.device_id.to_string()),
    );
    state.ctx.audit(event).await;
    Ok((StatusCode::CREATED, Json(device)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DeviceList {
    devices: Vec<Device>,
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", security(("bearer" = [])), responses(
    (status = 200, description = "Your devices, oldest first", body = DeviceList)))]
pub async fn list(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
) -> Result<Json<DeviceList>, ApiError> {
    let devices = state.service.devices.of(me.user).await?;
    Ok(Json(DeviceList { devices }))
}

fn no_such_device() -> ApiError {
    ApiError::NotFound("no such device".into())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    name: String,
}

#[utoipa::path(patch, path = "/api/v1/devices/{device_id}", tag = "devices", security(("bearer" = [])), params(("device_id" = String, Path, description = "A device id")), request_body = Rename, responses(
    (status = 204, description = "Renamed")))]
pub async fn rename(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<Rename>,
) -> Result<StatusCode, ApiError> {
    let id: DeviceId = id.parse().map_err(|_| no_such_device())?;
    let name = printable("name", &request.name, MAX_NAME_CHARS)?;
    if !state.service.devices.rename(me.user, id, &name).await? {
        return Err(no_such_device());
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/devices/{device_id}", tag = "devices", security(("bearer" = [])), params(("device_id" = String, Path, description = "A device id")), responses(
    (status = 204, description = "Revoked; its sessions end and their sockets close with 4003")))]
pub async fn revoke(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: DeviceId = id.parse().map_err(|_| no_such_device())?;
    if !state.service.devices.revoke(me.user, id).await? {
        return Err(no_such_device());
    }
    let ended = state.service.sessions.revoke_device(me.user, id).await?;
    tracing::info!(user_id = %me.user, device_id = %id, sessions_ended = ended.len(), "device revoked");
    crate::sessions::manage::announce(&state, me.user, ended).await;
    let event = AuditEvent::new(
        AuditKind::DeviceRevoked,
        Some(me.user),
        Some(id.to_string()),
    );
    state.ctx.audit(event).await;
    Ok(StatusCode::NO_CONTENT)
}
