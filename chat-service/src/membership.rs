//! Who belongs to which room, answered over the bus: the rooms of a user (to
//! the gateway) and a user's role in a room (to history-service); and joins
//! announced to the gateways.

use unhidra_core::{
    events::{MembershipChanged, SCHEMA_VERSION},
    ids::{RoomId, UserId},
    rooms::Role,
    rpc::{
        MAX_USERS_PER_ROOMS_OF, MembershipRequest, RoomHeadReply, RoomsOfRequest, RpcCode,
        RpcError, UserRooms,
    },
};

use crate::{ChatState, rooms::Refusal};

impl Refusal {
    pub fn rpc_error(self) -> RpcError {
        match self {
            Self::NoSuchRoom => RpcError::new(RpcCode::NotFound, "no such room"),
            Self::NotAMember => RpcError::new(RpcCode::Forbidden, "not a member of this room"),
        }
    }
}

/// Logs a store failure; the caller gets a fixed `unavailable` refusal.
pub fn store_unavailable(error: &anyhow::Error) -> RpcError {
    tracing::error!(error = ?error, "chat store failed");
    RpcError::new(RpcCode::Unavailable, "chat store unavailable")
}

/// Tells the gateways that `user` joined (`Some` latest sequence before the
/// join) or left (`None`) `room`.
pub async fn announce(state: &ChatState, room: RoomId, user: UserId, joined_after: Option<u64>) {
    let event = MembershipChanged {
        v: SCHEMA_VERSION,
        room,
        user,
        joined: joined_after.is_some(),
        seq: joined_after.unwrap_or_default(),
    };
    let subject = state.ctx.subjects.room_members(room);
    if let Err(e) = state.ctx.announce(&subject, &event).await {
        // Connections opened from now on still see the room.
        tracing::warn!(%room, %user, error = %e, "membership change not announced");
    }
}

pub async fn rooms_of(
    state: ChatState,
    request: RoomsOfRequest,
) -> Result<Vec<UserRooms>, RpcError> {
    if request.users.len() > MAX_USERS_PER_ROOMS_OF {
        return Err(RpcError::new(
            RpcCode::InvalidInput,
            format!("at most {MAX_USERS_PER_ROOMS_OF} users per request"),
        ));
    }
    state
        .service
        .rooms
        .ids_of_members(&request.users)
        .await
        .map_err(|e| store_unavailable(&e))
}

/// `chat.room_members`: the members of a room, for a member.
pub async fn members(
    state: ChatState,
    request: MembershipRequest,
) -> Result<Vec<UserId>, RpcError> {
    state
        .service
        .rooms
        .members(request.room, request.user)
        .await
        .map_err(|e| store_unavailable(&e))?
        .map_err(Refusal::rpc_error)
}

/// `chat.room_head`: the room's latest sequence and epoch, for a member.
pub async fn head(state: ChatState, request: MembershipRequest) -> Result<RoomHeadReply, RpcError> {
    let (seq, epoch) = state
        .service
        .rooms
        .head(request.room, request.user)
        .await
        .map_err(|e| store_unavailable(&e))?
        .map_err(Refusal::rpc_error)?;
    Ok(RoomHeadReply { seq, epoch })
}

pub async fn role(state: ChatState, request: MembershipRequest) -> Result<Role, RpcError> {
    state
        .service
        .rooms
        .role_of(request.room, request.user)
        .await
        .map_err(|e| store_unavailable(&e))?
        .map_err(Refusal::rpc_error)
}
