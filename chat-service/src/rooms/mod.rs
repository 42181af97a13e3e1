//! Rooms over HTTP: create one (the creator becomes its owner), join a public
//! one, list your own.

mod repo;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use unhidra_core::error::ErrorBody;
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::RoomId,
    rooms::{Role, Visibility},
};
use unhidra_runtime::{ApiError, ApiJson, CurrentUser};

pub use self::repo::{Caps, Full, Refusal, Room, RoomRepo};
use crate::{ChatState, membership::announce};

const MAX_ROOM_NAME_CHARS: usize = 100;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoom {
    name: String,
    visibility: Visibility,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RoomView {
    room_id: RoomId,
    name: String,
    visibility: Visibility,
    role: Role,
}

impl RoomView {
    fn of(room: Room, role: Role) -> Self {
        Self {
            room_id: room.id,
            name: room.name,
            visibility: room.visibility,
            role,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RoomList {
    rooms: Vec<RoomView>,
}

fn no_such_room() -> ApiError {
    ApiError::NotFound("no such room".into())
}

impl From<Full> for ApiError {
    fn from(full: Full) -> Self {
        let code = match full {
            Full::UserRooms(_) => "too_many_rooms",
            Full::RoomMembers(_) => "room_full",
        };
        ApiError::Conflict {
            code,
            message: full.to_string(),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/rooms", tag = "rooms", security(("bearer" = []), ("api_key" = [])), request_body = CreateRoom, responses(
    (status = 201, description = "The room; its creator is the owner", body = RoomView),
    (status = 403, description = "`forbidden`: guests create no rooms", body = ErrorBody),
    (status = 409, description = "`too_many_rooms`", body = ErrorBody)))]
pub async fn create(
    State(state): State<ChatState>,
    CurrentUser(me): CurrentUser,
    ApiJson(request): ApiJson<CreateRoom>,
) -> Result<(StatusCode, Json<RoomView>), ApiError> {
    if !me.role.creates_rooms() {
        return Err(ApiError::Forbidden("guests cannot create rooms".into()));
    }
    let name = request.name.trim().to_owned();
    let length = name.chars().count();
    if length == 0 || length > MAX_ROOM_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ApiError::Invalid(format!(
            "name must be 1 to {MAX_ROOM_NAME_CHARS} printable characters"
        )));
    }
    let room = Room {
        id: RoomId::new(),
        name,
        visibility: request.visibility,
    };
    state.service.rooms.create(&room, me.user).await??;
    tracing::info!(room_id = %room.id, user_id = %me.user, "room created");
    announce(&state, room.id, me.user, Some(0)).await;
    state
        .ctx
        .audit(AuditEvent::new(
            AuditKind::RoomCreated,
            Some(me.user),
            Some(room.id.to_string()),
        ))
        .await;
    Ok((StatusCode::CREATED, Json(RoomView::of(room, Role::Owner))))
}

#[utoipa::path(post, path = "/api/v1/rooms/{room_id}/join", tag = "rooms", security(("bearer" = []), ("api_key" = [])), params(("room_id" = String, Path, description = "A room id")), responses(
    (status = 200, description = "A member now (or already)", body = RoomView),
    (status = 403, description = "`forbidden`: the room is private", body = ErrorBody),
    (status = 409, description = "`too_many_rooms` or `room_full`", body = ErrorBody)))]
pub async fn join(
    State(state): State<ChatState>,
    CurrentUser(me): CurrentUser,
    Path(room): Path<String>,
) -> Result<Json<RoomView>, ApiError> {
    let id: RoomId = room.parse().map_err(|_| no_such_room())?;
    let rooms = &state.service.rooms;
    let room = rooms.get(id).await?.ok_or_else(no_such_room)?;
    match rooms.role_of(id, me.user).await? {
        Ok(role) => return Ok(Json(RoomView::of(room, role))),
        Err(Refusal::NoSuchRoom) => return Err(no_such_room()),
        Err(Refusal::NotAMember) if room.visibility == Visibility::Private => {
            return Err(ApiError::Forbidden("this room is private".into()));
        }
        Err(Refusal::NotAMember) => {}
    }
    // Read before the join, so no message after it is missed.
    let before = rooms.last_seq(id).await?;
    rooms.add_member(id, me.user, Role::Member).await??;
    tracing::info!(room_id = %id, user_id = %me.user, "room joined");
    announce(&state, id, me.user, Some(before)).await;
    Ok(Json(RoomView::of(room, Role::Member)))
}

#[utoipa::path(get, path = "/api/v1/rooms", tag = "rooms", security(("bearer" = []), ("api_key" = [])), responses(
    (status = 200, description = "The rooms you belong to, with your role", body = RoomList)))]
pub async fn mine(
    State(state): State<ChatState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<RoomList>, ApiError> {
    let rooms = state
        .service
        .rooms
        .of_member(me.user)
        .await?
        .into_iter()
        .map(|(room, role)| RoomView::of(room, role))
        .collect();
    Ok(Json(RoomList { rooms }))
}
