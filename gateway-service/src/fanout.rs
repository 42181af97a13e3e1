//! One subscription per gateway node to every room's events: messages go to
//! the member connections held here, joins subscribe the member's connections.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;
use unhidra_bus::Message;
use unhidra_core::{
    events::{MembershipChanged, RoomMessage},
    protocol::ServerFrame,
};
use unhidra_telemetry::metrics;

use crate::Gateway;

pub async fn spawn(gateway: Arc<Gateway>) -> anyhow::Result<JoinHandle<()>> {
    let mut events = gateway
        .ctx
        .bus
        .subscribe(&gateway.ctx.subjects.all_room_events())
        .await?;
    let shutdown = gateway.ctx.shutdown.clone();
    Ok(tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                Some(event) => dispatch(&gateway, &event),
                None => {
                    tracing::error!("room event subscription ended");
                    return;
                }
            }
        }
    }))
}

fn dispatch(gateway: &Gateway, event: &Message) {
    match event.subject.rsplit('.').next() {
        Some("messages") => match serde_json::from_slice::<RoomMessage>(&event.payload) {
            Ok(m) => {
                let frame = ServerFrame::Message {
                    room: m.room,
                    seq: m.seq,
                    message_id: m.message_id,
                    sender: m.sender,
                    body: m.body,
                    sent_at: m.sent_at,
                };
                match serde_json::to_string(&frame) {
                    Ok(text) => {
                        let delivered = gateway.registry.deliver(m.room, &Utf8Bytes::from(text));
                        metrics::MESSAGES_DELIVERED.inc_by(delivered as u64);
                    }
                    Err(e) => tracing::error!(error = %e, "message frame not serialisable"),
                }
            }
            Err(e) => {
                tracing::warn!(subject = %event.subject, error = %e, "undecodable room message")
            }
        },
        Some("members") => match serde_json::from_slice::<MembershipChanged>(&event.payload) {
            Ok(change) if change.joined => gateway.registry.user_joined(change.user, change.room),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(subject = %event.subject, error = %e, "undecodable membership change")
            }
        },
        _ => {}
    }
}
