//! Who belongs to which room, with which role; answered to the gateway (the
//! rooms of a user) and to history-service (a user's role in a room).

use serde::{Deserialize, Serialize};
use unhidra_bus::Headers;
use unhidra_core::{
    events::{MembershipChanged, MembershipRequest, RoomsOfRequest, RpcReply, SCHEMA_VERSION},
    ids::{RoomId, UserId},
};
use unhidra_store::Database;

use crate::ChatState;

/// A member's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "owner" {
            Self::Owner
        } else {
            Self::Member
        }
    }
}

/// Why a user may not act in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoSuchRoom,
    NotAMember,
}

impl Refusal {
    pub fn rpc<T>(self) -> RpcReply<T> {
        match self {
            Self::NoSuchRoom => RpcReply::err("not_found", "no such room"),
            Self::NotAMember => RpcReply::err("forbidden", "not a member of this room"),
        }
    }
}

/// The user's role in the room, or why there is none.
pub async fn role_of(
    db: &Database,
    room: RoomId,
    user: UserId,
) -> anyhow::Result<Result<Role, Refusal>> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT m.role FROM rooms r
         LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $2
         WHERE r.id = $1",
    )
    .bind(room.to_string())
    .bind(user.to_string())
    .fetch_optional(&db.pool)
    .await?;
    Ok(match row {
        None => Err(Refusal::NoSuchRoom),
        Some((None,)) => Err(Refusal::NotAMember),
        Some((Some(role),)) => Ok(Role::parse(&role)),
    })
}

/// Tells the gateways that `user` joined `room`.
pub async fn announce_join(state: &ChatState, room: RoomId, user: UserId) {
    let event = MembershipChanged {
        v: SCHEMA_VERSION,
        room,
        user,
        joined: true,
    };
    let published = match serde_json::to_vec(&event) {
        Ok(payload) => state
            .ctx
            .bus
            .publish(
                &state.ctx.subjects.room_members(room),
                Headers::new(),
                payload.into(),
            )
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = published {
        // Connections opened from now on still see the room.
        tracing::warn!(%room, %user, error = %e, "membership change not announced");
    }
}

pub async fn rooms_of(state: ChatState, request: RoomsOfRequest) -> RpcReply<Vec<RoomId>> {
    let rows: Result<Vec<(String,)>, _> =
        sqlx::query_as("SELECT room_id FROM room_members WHERE user_id = $1")
            .bind(request.user.to_string())
            .fetch_all(&state.db.pool)
            .await;
    match rows {
        Ok(rows) => RpcReply::Ok(
            rows.into_iter()
                .filter_map(|(id,)| id.parse().ok())
                .collect(),
        ),
        Err(e) => {
            tracing::error!(error = %e, "listing rooms failed");
            RpcReply::err("unavailable", "membership store unavailable")
        }
    }
}

pub async fn role(state: ChatState, request: MembershipRequest) -> RpcReply<Role> {
    match role_of(&state.db, request.room, request.user).await {
        Ok(Ok(role)) => RpcReply::Ok(role),
        Ok(Err(refusal)) => refusal.rpc(),
        Err(e) => {
            tracing::error!(error = %e, "membership lookup failed");
            RpcReply::err("unavailable", "membership store unavailable")
        }
    }
}
