//! Room events to the connections held here. The events of the rooms this
//! gateway follows ([`crate::feeds`]) come in publish order on each room's
//! subscription: messages go to the member connections, typing to the other
//! members, a leave takes the room from the member's connections at once.
//! Joins come on one subscription to every room's membership changes (few),
//! since the room may not be followed yet: the member's connections are
//! given the room, and every message after the sequence the join names,
//! those published before the room was followed included (caught up from
//! history, as a `resume` is).

use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;
use unhidra_bus::Message;
use unhidra_core::{
    events::{MembershipChanged, RoomMessage, Typing},
    protocol::{MessageText, ResumePoint, ServerFrame},
    subjects::RoomEventKind,
};

use crate::{Gateway, feeds, registry::lock, resume, tail::RoomTail};

pub async fn spawn(gateway: Arc<Gateway>) -> anyhow::Result<JoinHandle<()>> {
    let mut changes = gateway
        .ctx
        .bus
        .subscribe(&gateway.ctx.subjects.room_members_of_any_room())
        .await?;
    let shutdown = gateway.ctx.shutdown.clone();
    Ok(tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = changes.next() => event,
            };
            let Some(event) = event else {
                tracing::error!("membership subscription ended");
                return;
            };
            match serde_json::from_slice::<MembershipChanged>(&event.payload) {
                Ok(change) if change.joined => joined(&gateway, &change),
                // Leaves come in order with the room's messages, on its feed.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(subject = %event.subject, error = %e, "undecodable membership change")
                }
            }
        }
    }))
}

/// Gives `change.room` to every connection of its user here, holding the
/// room's live messages back until what came after `change.seq` is caught
/// up.
fn joined(gateway: &Arc<Gateway>, change: &MembershipChanged) {
    let room = change.room;
    gateway.feeds.changed();
    for id in gateway.registry.connections_of(change.user) {
        if gateway.registry.in_room(id, room) {
            continue;
        }
        gateway.registry.hold(id, room);
        gateway.registry.add_rooms(id, &[room]);
        let (gateway, user, after) = (Arc::clone(gateway), change.user, change.seq);
        gateway.ctx.in_flight.clone().spawn(async move {
            feeds::follow_rooms(&gateway, &[room]).await;
            let Some(outbound) = gateway.registry.outbound(id) else {
                return;
            };
            let point = ResumePoint::Seq(after);
            let sent = match resume::catch_up(&gateway, id, user, room, &point, &outbound).await {
                Ok((top, _)) => top,
                Err(e) => {
                    tracing::warn!(conn = id, %room, error = ?e, "joined room not caught up");
                    0
                }
            };
            gateway.registry.given_up_to(id, room, sent);
            gateway.registry.release(id, room, sent).await;
        });
    }
}

/// One event of a followed room; its messages are kept in `tail` too.
pub fn dispatch(gateway: &Arc<Gateway>, event: &Message, tail: &Mutex<RoomTail>) {
    let Some((room, kind)) = gateway.ctx.subjects.parse_room_event(&event.subject) else {
        tracing::debug!(subject = %event.subject, "not a room event; ignored");
        return;
    };
    match kind {
        RoomEventKind::Messages => match message_frame(&event.payload) {
            Ok(m) if m.room == room => deliver(gateway, m, tail),
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
                // Joins are taken from the subscription to every room's.
                Ok(change) if change.joined => {}
                Ok(change) => {
                    gateway.feeds.changed();
                    gateway.registry.user_left(change.user, room);
                    feeds::update(gateway, room);
                }
                Err(e) => {
                    tracing::warn!(subject = %event.subject, error = %e, "undecodable membership change")
                }
            }
        }
    }
}

/// The `message` frame of a room message event: made from its text as
/// chat-service wrote it, or (written otherwise, by another version) read
/// and written whole.
fn message_frame(payload: &[u8]) -> Result<MessageText, serde_json::Error> {
    if let Some(made) = std::str::from_utf8(payload)
        .ok()
        .and_then(ServerFrame::message_text)
    {
        return Ok(made);
    }
    let m: RoomMessage = serde_json::from_slice(payload)?;
    let (room, seq) = (m.room, m.seq);
    let text = serde_json::to_string(&ServerFrame::from(m))?;
    Ok(MessageText { room, seq, text })
}

fn deliver(gateway: &Gateway, m: MessageText, tail: &Mutex<RoomTail>) {
    let text = Utf8Bytes::from(m.text);
    lock(tail).push(m.seq, &text);
    let fanout = gateway.registry.deliver(m.room, m.seq, &text);
    gateway.metrics.delivered.inc_by(fanout.delivered);
    gateway.metrics.slow_consumers.inc_by(fanout.cut_off);
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use unhidra_core::{
        events::SCHEMA_VERSION,
        ids::{MessageId, RoomId, UserId},
    };

    use super::*;

    #[test]
    fn a_message_event_of_another_version_is_read_and_written_whole() {
        let event = RoomMessage {
            v: SCHEMA_VERSION,
            room: RoomId::new(),
            seq: 3,
            message_id: MessageId::new(),
            sender: UserId::new(),
            body: "hi".into(),
            sent_at: Utc::now(),
        };
        let written = serde_json::to_string(&ServerFrame::from(event.clone())).expect("written");
        let mut newer = serde_json::to_value(&event).expect("a value");
        newer["v"] = 2.into();
        newer["edited"] = true.into();
        for payload in [serde_json::to_string(&event), serde_json::to_string(&newer)] {
            let payload = payload.expect("written");
            let made = message_frame(payload.as_bytes()).expect("a frame");
            assert_eq!((made.room, made.seq), (event.room, event.seq));
            assert_eq!(made.text, written, "{payload}");
        }
        let refused = message_frame(br#"{"v":1,"room":"r"}"#).expect_err("not a message");
        assert!(refused.to_string().contains("UUID"), "{refused}");
    }
}
