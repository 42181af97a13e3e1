//! One subscription per gateway node to every room's events: messages go to
//! the member connections held here, joins subscribe the member's
//! connections, leaves unsubscribe them.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;
use unhidra_bus::Message;
use unhidra_core::{
    events::{MembershipChanged, RoomMessage, Typing},
    protocol::ServerFrame,
    subjects::RoomEventKind,
};

use crate::Gateway;

/// Events dispatched between two yields to the other tasks.
const YIELD_EVERY: u32 = 16;

pub async fn spawn(gateway: Arc<Gateway>) -> anyhow::Result<JoinHandle<()>> {
    let mut events = gateway
        .ctx
        .bus
        .subscribe(&gateway.ctx.subjects.all_room_events())
        .await?;
    let shutdown = gateway.ctx.shutdown.clone();
    Ok(tokio::spawn(async move {
        let mut dispatched: u32 = 0;
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
            // A burst of events must not keep the connections' writers from
            // draining their queues in between.
            dispatched = dispatched.wrapping_add(1);
            if dispatched % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
        }
    }))
}

fn dispatch(gateway: &Gateway, event: &Message) {
    let Some((room, kind)) = gateway.ctx.subjects.parse_room_event(&event.subject) else {
        tracing::debug!(subject = %event.subject, "not a room event; ignored");
        return;
    };
    match kind {
        RoomEventKind::Messages => match serde_json::from_slice::<RoomMessage>(&event.payload) {
            Ok(m) if m.room == room => deliver(gateway, m),
            Ok(_) => {
                tracing::warn!(subject = %event.subject, "room message on another room's subject")
            }
            Err(e) => {
                tracing::warn!(subject = %event.subject, error = %e, "undecodable room message")
            }
        },
        RoomEventKind::Typing => match serde_json::from_slice::<Typing>(&event.payload) {
            Ok(typing) if typing.room == room => {
                let frame = ServerFrame::Typing {
                    room,
                    user: typing.user,
                };
                if let Ok(text) = serde_json::to_string(&frame) {
                    gateway
                        .registry
                        .deliver_once(&[room], typing.user, &Utf8Bytes::from(text));
                }
            }
            Ok(_) => tracing::warn!(subject = %event.subject, "typing on another room's subject"),
            Err(e) => tracing::warn!(subject = %event.subject, error = %e, "undecodable typing"),
        },
        RoomEventKind::Members => {
            match serde_json::from_slice::<MembershipChanged>(&event.payload) {
                Ok(change) if change.room != room => {
                    tracing::warn!(subject = %event.subject, "membership change on another room's subject")
                }
                Ok(change) if change.joined => gateway.registry.user_joined(change.user, room),
                Ok(change) => gateway.registry.user_left(change.user, room),
                Err(e) => {
                    tracing::warn!(subject = %event.subject, error = %e, "undecodable membership change")
                }
            }
        }
    }
}

fn deliver(gateway: &Gateway, m: RoomMessage) {
    let room = m.room;
    let seq = m.seq;
    let frame = ServerFrame::Message {
        room,
        seq,
        message_id: m.message_id,
        sender: m.sender,
        body: m.body,
        sent_at: m.sent_at,
    };
    match serde_json::to_string(&frame) {
        Ok(text) => {
            let fanout = gateway.registry.deliver(room, seq, &Utf8Bytes::from(text));
            gateway.metrics.delivered.inc_by(fanout.delivered);
            gateway.metrics.slow_consumers.inc_by(fanout.cut_off);
        }
        Err(e) => tracing::error!(error = %e, "message frame not serialisable"),
    }
}
