//! `GET /api/v1/rooms/{room_id}/messages?before=<seq>&limit=<n>`: a page of a
//! room's messages, newest first, for members only; and `history.range` on
//! the bus, the messages a resuming connection missed.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
};
use serde::{Deserialize, Serialize};
use unhidra_core::error::ErrorBody;
use unhidra_core::{
    events::{RoomMessage, SCHEMA_VERSION},
    ids::RoomId,
    rpc::{HistoryRangeRequest, MAX_RANGE, Membership, MembershipRequest, RpcCode, RpcError},
};
use unhidra_runtime::{ApiError, CurrentUser};

use crate::{
    HistoryState,
    repo::{HistoryRepo, StoredMessage},
};

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Only messages with a smaller sequence number.
    before: Option<i64>,
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Page {
    messages: Vec<StoredMessage>,
}

#[utoipa::path(get, path = "/api/v1/rooms/{room_id}/messages", tag = "history", security(("bearer" = []), ("api_key" = [])), params(("room_id" = String, Path, description = "A room id"), PageQuery), responses(
    (status = 200, description = "Messages, newest first", body = Page),
    (status = 403, description = "`forbidden`: not a member of the room", body = ErrorBody)))]
pub async fn messages(
    State(state): State<HistoryState>,
    CurrentUser(me): CurrentUser,
    Path(room): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let room: RoomId = room
        .parse()
        .map_err(|_| ApiError::NotFound("no such room".into()))?;
    let Query(query) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::Invalid(format!("limit must be 1 to {MAX_LIMIT}")));
    }
    let before = query.before.unwrap_or(i64::MAX);
    if before < 1 {
        return Err(ApiError::Invalid(
            "before must be a positive sequence number".into(),
        ));
    }
    let request = MembershipRequest {
        v: SCHEMA_VERSION,
        room,
        user: me.user,
    };
    state.ctx.rpc.call::<Membership>(&request).await?;
    let messages = state.service.page(room, before, limit).await?;
    Ok(Json(Page { messages }))
}

/// `history.range`: the stored messages of the range (at most
/// [`MAX_RANGE`]), oldest first.
pub async fn range(
    history: &HistoryRepo,
    request: &HistoryRangeRequest,
) -> Result<Vec<RoomMessage>, RpcError> {
    let up_to = request.up_to.min(request.after.saturating_add(MAX_RANGE));
    let stored = history
        .range(request.room, request.after, up_to)
        .await
        .map_err(|e| {
            tracing::error!(error = ?e, "history range failed");
            RpcError::new(RpcCode::Unavailable, "history unavailable")
        })?;
    Ok(stored
        .into_iter()
        .map(|m| RoomMessage {
            v: SCHEMA_VERSION,
            room: request.room,
            seq: m.seq,
            message_id: m.message_id,
            sender: m.sender,
            body: m.body,
            sent_at: m.sent_at,
        })
        .collect())
}
