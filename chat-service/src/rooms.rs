//! Rooms over HTTP: create one (the creator becomes its owner), join a public
//! one, list your own.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use unhidra_authn::CurrentUser;
use unhidra_core::{
    ApiError,
    error::ApiJson,
    events::{AuditEvent, AuditKind},
    ids::RoomId,
};
use unhidra_store::now_millis;

use crate::{
    ChatState,
    membership::{Refusal, Role, announce_join, role_of},
};

const MAX_ROOM_NAME_CHARS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Anyone may join.
    Public,
    /// Members only.
    Private,
}

impl Visibility {
    fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Private => "private",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "public" {
            Self::Public
        } else {
            Self::Private
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRoom {
    name: String,
    visibility: Visibility,
}

#[derive(Serialize)]
pub struct RoomView {
    room_id: RoomId,
    name: String,
    visibility: Visibility,
    role: Role,
}

#[derive(Serialize)]
pub struct RoomList {
    rooms: Vec<RoomView>,
}

fn parse_room(raw: &str) -> Result<RoomId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound("no such room".into()))
}

pub async fn create(
    State(state): State<ChatState>,
    CurrentUser(me): CurrentUser,
    ApiJson(request): ApiJson<CreateRoom>,
) -> Result<(StatusCode, Json<RoomView>), ApiError> {
    let name = request.name.trim().to_owned();
    let length = name.chars().count();
    if length == 0 || length > MAX_ROOM_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ApiError::Invalid(format!(
            "name must be 1 to {MAX_ROOM_NAME_CHARS} printable characters"
        )));
    }
    let room = RoomId::new();
    let now = now_millis();
    let mut tx = state.db.pool.begin().await.map_err(anyhow::Error::from)?;
    sqlx::query(
        "INSERT INTO rooms (id, name, visibility, created_by, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(room.to_string())
    .bind(&name)
    .bind(request.visibility.as_str())
    .bind(me.user.to_string())
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(anyhow::Error::from)?;
    sqlx::query(
        "INSERT INTO room_members (room_id, user_id, role, joined_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(room.to_string())
    .bind(me.user.to_string())
    .bind(Role::Owner.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(anyhow::Error::from)?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    tracing::info!(room_id = %room, user_id = %me.user, "room created");
    announce_join(&state, room, me.user).await;
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::RoomCreated,
            Some(me.user),
            Some(room.to_string()),
        ))
        .await;
    Ok((
        StatusCode::CREATED,
        Json(RoomView {
            room_id: room,
            name,
            visibility: request.visibility,
            role: Role::Owner,
        }),
    ))
}

pub async fn join(
    State(state): State<ChatState>,
    CurrentUser(me): CurrentUser,
    Path(room): Path<String>,
) -> Result<Json<RoomView>, ApiError> {
    let room = parse_room(&room)?;
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT name, visibility FROM rooms WHERE id = $1")
            .bind(room.to_string())
            .fetch_optional(&state.db.pool)
            .await
            .map_err(anyhow::Error::from)?;
    let (name, visibility) = row.ok_or_else(|| ApiError::NotFound("no such room".into()))?;
    let visibility = Visibility::parse(&visibility);
    let existing = role_of(&state.db, room, me.user).await?;
    if let Ok(role) = existing {
        return Ok(Json(RoomView {
            room_id: room,
            name,
            visibility,
            role,
        }));
    }
    if existing == Err(Refusal::NotAMember) && visibility == Visibility::Private {
        return Err(ApiError::Forbidden("this room is private".into()));
    }
    sqlx::query(
        "INSERT INTO room_members (room_id, user_id, role, joined_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(room.to_string())
    .bind(me.user.to_string())
    .bind(Role::Member.as_str())
    .bind(now_millis())
    .execute(&state.db.pool)
    .await
    .map_err(anyhow::Error::from)?;
    tracing::info!(room_id = %room, user_id = %me.user, "room joined");
    announce_join(&state, room, me.user).await;
    Ok(Json(RoomView {
        room_id: room,
        name,
        visibility,
        role: Role::Member,
    }))
}

pub async fn mine(
    State(state): State<ChatState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<RoomList>, ApiError> {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT r.id, r.name, r.visibility, m.role FROM rooms r
         JOIN room_members m ON m.room_id = r.id WHERE m.user_id = $1 ORDER BY r.id",
    )
    .bind(me.user.to_string())
    .fetch_all(&state.db.pool)
    .await
    .map_err(anyhow::Error::from)?;
    let rooms = rows
        .into_iter()
        .filter_map(|(id, name, visibility, role)| {
            Some(RoomView {
                room_id: id.parse().ok()?,
                name,
                visibility: Visibility::parse(&visibility),
                role: Role::parse(&role),
            })
        })
        .collect();
    Ok(Json(RoomList { rooms }))
}
