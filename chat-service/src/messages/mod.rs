//! Accepting messages. A send is checked (membership, size), then the outbox
//! repository takes the room's next sequence number and queues the event in
//! one transaction; the event is published to the rooms stream and only then
//! removed from the outbox. If publishing fails the relay retries it, and
//! JetStream's duplicate window plus history-service's idempotency absorb
//! repeats.

mod outbox;

use std::time::Duration;

use chrono::Utc;
use unhidra_bus::Headers;
use unhidra_core::rpc::{RpcCode, RpcError, SendAccepted, SendRequest};
use unhidra_store::now_millis;

pub use self::outbox::{OutboxRepo, Pending};
use crate::{ChatState, membership::store_unavailable};

/// How often the relay looks for unpublished messages.
const RELAY_INTERVAL: Duration = Duration::from_secs(1);
/// Outbox rows younger than this are left to the request that wrote them.
const RELAY_GRACE_MS: i64 = 2_000;
const RELAY_BATCH: i64 = 500;

pub async fn send(state: ChatState, request: SendRequest) -> Result<SendAccepted, RpcError> {
    if request.body.is_empty() {
        return Err(RpcError::new(
            RpcCode::InvalidInput,
            "body must not be empty",
        ));
    }
    if request.body.len() > state.ctx.config.max_frame_bytes {
        return Err(RpcError::new(RpcCode::InvalidInput, "body is too large"));
    }
    let chat = &state.service;
    chat.rooms
        .role_of(request.room, request.user)
        .await
        .map_err(|e| store_unavailable(&e))?
        .map_err(|refusal| refusal.rpc_error())?;
    let (event, pending) = chat
        .outbox
        .accept(request.room, request.user, request.body, Utc::now())
        .await
        .map_err(|e| store_unavailable(&e))?;
    tracing::debug!(room_id = %event.room, seq = event.seq, message_id = %event.message_id, "message accepted");
    chat.metrics.accepted.inc();
    publish(&state, pending).await;
    Ok(SendAccepted {
        seq: event.seq,
        message_id: event.message_id,
    })
}

/// Publishes one outbox entry and deletes it; on failure it stays for the relay.
async fn publish(state: &ChatState, pending: Pending) {
    let Pending {
        message_id,
        room,
        payload,
    } = pending;
    let published = state
        .ctx
        .bus
        .publish_durable(
            &state.ctx.subjects.room_messages(room),
            &message_id.to_string(),
            Headers::new(),
            payload.into(),
        )
        .await;
    match published {
        Ok(()) => {
            state.service.metrics.published.inc();
            if let Err(e) = state.service.outbox.published(message_id).await {
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
        match state
            .service
            .outbox
            .unpublished(now_millis() - RELAY_GRACE_MS, RELAY_BATCH)
            .await
        {
            Ok(pending) => {
                if !pending.is_empty() {
                    tracing::info!(count = pending.len(), "relaying unpublished messages");
                }
                for entry in pending {
                    publish(&state, entry).await;
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
