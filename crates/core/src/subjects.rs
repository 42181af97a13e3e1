//! Every bus subject, stream and durable consumer name, in one place. All of them
//! start with the configured prefix so deployments (and tests) can share a NATS.

use std::time::Duration;

use unhidra_bus::{ConsumerSpec, StreamSpec};

use crate::ids::RoomId;

/// Subject and stream names under one prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// `prefix` must be a valid subject token (checked by `Config`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// A room's message events (JetStream, stream `rooms`).
    pub fn room_messages(&self, room: RoomId) -> String {
        format!("{}.room.{room}.messages", self.prefix)
    }

    /// Every room's message events; what a gateway subscribes to.
    pub fn all_room_messages(&self) -> String {
        format!("{}.room.*.messages", self.prefix)
    }

    /// A room's membership changes (core NATS, not stored): gateways add or
    /// drop the room for the member's connections.
    pub fn room_members(&self, room: RoomId) -> String {
        format!("{}.room.{room}.members", self.prefix)
    }

    /// Messages and membership changes of every room, on one subscription so a
    /// gateway sees a join before the messages sent after it.
    pub fn all_room_events(&self) -> String {
        format!("{}.room.>", self.prefix)
    }

    /// A security event of one kind (JetStream, stream `audit`).
    pub fn audit(&self, kind: &str) -> String {
        format!("{}.audit.{kind}", self.prefix)
    }

    /// Request/reply: the gateway asks chat-service to accept a message.
    pub fn chat_send(&self) -> String {
        format!("{}.rpc.chat.send", self.prefix)
    }

    /// Request/reply: the rooms a user belongs to.
    pub fn chat_rooms_of(&self) -> String {
        format!("{}.rpc.chat.rooms_of", self.prefix)
    }

    /// Request/reply: a user's role in a room, if a member.
    pub fn chat_membership(&self) -> String {
        format!("{}.rpc.chat.membership", self.prefix)
    }

    /// Request/reply: the public signing keys, for token verification.
    pub fn auth_jwks(&self) -> String {
        format!("{}.rpc.auth.jwks", self.prefix)
    }

    fn stream_name(&self, what: &str) -> String {
        format!(
            "{}_{what}",
            self.prefix.to_ascii_uppercase().replace('-', "_")
        )
    }

    /// Room events, kept for gap recovery and consumed by history-service.
    pub fn rooms_stream(&self) -> StreamSpec {
        StreamSpec {
            name: self.stream_name("ROOMS"),
            subjects: vec![self.all_room_messages()],
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
        }
    }

    /// Security events, consumed by audit-service.
    pub fn audit_stream(&self) -> StreamSpec {
        StreamSpec {
            name: self.stream_name("AUDIT"),
            subjects: vec![format!("{}.audit.>", self.prefix)],
            max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
        }
    }

    /// history-service's durable consumer of every room event.
    pub fn history_consumer(&self) -> ConsumerSpec {
        ConsumerSpec {
            stream: self.stream_name("ROOMS"),
            durable: "history".to_owned(),
            filter: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
        }
    }

    /// audit-service's durable consumer of every security event.
    pub fn audit_consumer(&self) -> ConsumerSpec {
        ConsumerSpec {
            stream: self.stream_name("AUDIT"),
            durable: "audit".to_owned(),
            filter: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
        }
    }
}
