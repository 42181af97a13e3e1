//! Deleted accounts leave their rooms: a durable consumer of the
//! `user_deleted` security events removes the account from every room
//! (freeing its place under the member caps) and tells the gateways, so a
//! deletion made while chat-service was down is carried out when it is back.

use std::time::Duration;

use tokio::task::JoinHandle;
use unhidra_bus::Delivery;
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::UserId,
};
use unhidra_runtime::consumer::spawn_consumer;
use unhidra_telemetry::request_id;

use crate::{ChatState, membership::announce};

/// How long a deletion that failed waits before it is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

pub async fn spawn(state: &ChatState) -> anyhow::Result<JoinHandle<()>> {
    let spec = state.ctx.subjects.account_deletions_consumer();
    let state = state.clone();
    spawn_consumer(&state.ctx.clone(), spec, move |batch| {
        let state = state.clone();
        async move {
            for delivery in batch {
                handle(&state, delivery).await;
            }
        }
    })
    .await
}

async fn handle(state: &ChatState, delivery: Delivery) {
    let deleted = serde_json::from_slice::<AuditEvent>(&delivery.message.payload)
        .ok()
        .filter(|event| event.kind == AuditKind::UserDeleted)
        .and_then(|event| event.subject?.parse::<UserId>().ok());
    let Some(user) = deleted else {
        tracing::error!(subject = %delivery.message.subject, "unreadable account deletion dropped");
        settle(delivery.ack().await);
        return;
    };
    let headers = delivery.message.headers.clone();
    let removed = request_id::scope_from("account deleted", &headers, async {
        let rooms = state.service.rooms.remove_member_everywhere(user).await?;
        for room in &rooms {
            announce(state, *room, user, None).await;
        }
        tracing::info!(user_id = %user, rooms = rooms.len(), "deleted account removed from its rooms");
        anyhow::Ok(())
    })
    .await;
    match removed {
        Ok(()) => settle(delivery.ack().await),
        Err(e) => {
            tracing::warn!(user_id = %user, error = ?e, "deleted account not removed from its rooms yet; will retry");
            settle(delivery.nak(RETRY_DELAY).await);
        }
    }
}

fn settle(outcome: unhidra_bus::Result<()>) {
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "account deletion not settled; it comes again after ack_wait");
    }
}
