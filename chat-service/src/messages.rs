//! Accepting messages. A send is checked (membership, size), then one
//! transaction takes the room's next sequence number and queues the event in
//! the outbox; the event is published to the rooms stream and only then removed
//! from the outbox. If publishing fails the relay retries it, and JetStream's
//! duplicate window plus history-service's idempotency absorb repeats.

use std::time::Duration;

use chrono::Utc;
use unhidra_bus::Headers;
use unhidra_core::{
    events::{RoomMessage, RpcReply, SCHEMA_VERSION, SendAccepted, SendRequest},
    ids::MessageId,
};
use unhidra_store::now_millis;
use unhidra_telemetry::metrics;

use crate::{ChatState, membership::role_of};

/// How often the relay looks for unpublished messages.
const RELAY_INTERVAL: Duration = Duration::from_secs(1);
/// Outbox rows younger than this are left to the request that wrote them.
const RELAY_GRACE_MS: i64 = 2_000;
const RELAY_BATCH: i64 = 500;

pub async fn send(state: ChatState, request: SendRequest) -> RpcReply<SendAccepted> {
    if request.body.is_empty() {
        return RpcReply::err("invalid_input", "body must not be empty");
    }
    if request.body.len() > state.ctx.config.max_frame_bytes {
        return RpcReply::err("invalid_input", "body is too large");
    }
    match role_of(&state.db, request.room, request.user).await {
        Ok(Ok(_)) => {}
        Ok(Err(refusal)) => return refusal.rpc(),
        Err(e) => {
            tracing::error!(error = %e, "membership lookup failed");
            return RpcReply::err("unavailable", "chat store unavailable");
        }
    }
    match accept(&state, request).await {
        Ok(accepted) => RpcReply::Ok(accepted),
        Err(e) => {
            tracing::error!(error = ?e, "message not accepted");
            RpcReply::err("unavailable", "chat store unavailable")
        }
    }
}

async fn accept(state: &ChatState, request: SendRequest) -> anyhow::Result<SendAccepted> {
    let message_id = MessageId::new();
    let mut tx = state.db.pool.begin().await?;
    let seq: i64 = sqlx::query_scalar(
        "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
    )
    .bind(request.room.to_string())
    .fetch_one(&mut *tx)
    .await?;
    let event = RoomMessage {
        v: SCHEMA_VERSION,
        room: request.room,
        seq: u64::try_from(seq)?,
        message_id,
        sender: request.user,
        body: request.body,
        sent_at: Utc::now(),
    };
    let payload = serde_json::to_string(&event)?;
    sqlx::query(
        "INSERT INTO outbox (message_id, room_id, payload, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(message_id.to_string())
    .bind(request.room.to_string())
    .bind(&payload)
    .bind(now_millis())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::debug!(room_id = %event.room, seq = event.seq, %message_id, "message accepted");
    metrics::MESSAGES_ACCEPTED.inc();

    publish(
        state,
        &message_id.to_string(),
        &event.room.to_string(),
        payload,
    )
    .await;
    Ok(SendAccepted {
        seq: event.seq,
        message_id,
    })
}

/// Publishes one outbox row and deletes it; on failure it stays for the relay.
async fn publish(state: &ChatState, message_id: &str, room: &str, payload: String) {
    let Ok(room) = room.parse() else {
        tracing::error!(%message_id, "outbox row with a malformed room id");
        return;
    };
    let subject = state.ctx.subjects.room_messages(room);
    let published = state
        .ctx
        .bus
        .publish_durable(&subject, message_id, Headers::new(), payload.into())
        .await;
    match published {
        Ok(()) => {
            metrics::MESSAGES_PUBLISHED.inc();
            let deleted = sqlx::query("DELETE FROM outbox WHERE message_id = $1")
                .bind(message_id)
                .execute(&state.db.pool)
                .await;
            if let Err(e) = deleted {
                // Harmless: the relay republishes it and it is deduplicated.
                tracing::warn!(%message_id, error = %e, "outbox row not deleted");
            }
        }
        Err(e) => tracing::warn!(%message_id, error = %e, "publish failed; the relay will retry"),
    }
}

/// Republishes messages whose publish failed (or whose process died before
/// publishing), oldest first, until shutdown.
pub async fn relay_outbox(state: ChatState) {
    let shutdown = state.ctx.shutdown.clone();
    loop {
        let rows: Result<Vec<(String, String, String)>, _> = sqlx::query_as(
            "SELECT message_id, room_id, payload FROM outbox WHERE created_at < $1
             ORDER BY created_at LIMIT $2",
        )
        .bind(now_millis() - RELAY_GRACE_MS)
        .bind(RELAY_BATCH)
        .fetch_all(&state.db.pool)
        .await;
        match rows {
            Ok(rows) => {
                if !rows.is_empty() {
                    tracing::info!(count = rows.len(), "relaying unpublished messages");
                }
                for (message_id, room, payload) in rows {
                    publish(&state, &message_id, &room, payload).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "outbox scan failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(RELAY_INTERVAL) => {}
        }
    }
}
