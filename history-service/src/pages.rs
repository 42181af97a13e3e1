//! `GET /api/v1/rooms/{room_id}/messages?before=<seq>&limit=<n>`: a page of a
//! room's messages, newest first, for members only.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use unhidra_authn::CurrentUser;
use unhidra_core::{
    ApiError,
    events::{MembershipRequest, SCHEMA_VERSION},
    ids::{MessageId, RoomId, UserId},
};
use unhidra_runtime::rpc;

use crate::HistoryState;

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;

#[derive(Deserialize)]
pub struct PageQuery {
    /// Only messages with a smaller sequence number.
    before: Option<i64>,
    limit: Option<i64>,
}

#[derive(Serialize)]
pub struct StoredMessage {
    seq: u64,
    message_id: MessageId,
    sender: UserId,
    body: String,
    sent_at: DateTime<Utc>,
}

#[derive(Serialize)]
pub struct Page {
    messages: Vec<StoredMessage>,
}

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
    rpc::call::<_, serde_json::Value>(&state.ctx, &state.ctx.subjects.chat_membership(), &request)
        .await?;

    let rows: Vec<(i64, String, String, String, i64)> = sqlx::query_as(
        "SELECT seq, message_id, sender, body, sent_at FROM messages
         WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
    )
    .bind(room.to_string())
    .bind(before)
    .bind(limit)
    .fetch_all(&state.db.pool)
    .await
    .map_err(anyhow::Error::from)?;
    let messages = rows
        .into_iter()
        .map(|(seq, message_id, sender, body, sent_at)| {
            Ok(StoredMessage {
                seq: u64::try_from(seq)?,
                message_id: message_id.parse()?,
                sender: sender.parse()?,
                body,
                sent_at: DateTime::from_timestamp_millis(sent_at).unwrap_or_default(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Json(Page { messages }))
}
