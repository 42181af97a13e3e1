//! Every bus subject, stream and durable consumer name, in one place, and the
//! parsing of a room subject back into its parts. All of them start with the
//! configured prefix so deployments (and tests) can share a NATS.

use std::time::Duration;

use crate::{
    events::AuditKind,
    ids::RoomId,
    streams::{ConsumerSpec, StreamSpec},
};

/// What a room subject carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomEventKind {
    /// `RoomMessage` events (`<prefix>.room.<room>.messages`).
    Messages,
    /// `MembershipChanged` events (`<prefix>.room.<room>.members`).
    Members,
    /// `Typing` indicators (`<prefix>.room.<room>.typing`), never stored.
    Typing,
}

impl RoomEventKind {
    fn token(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Members => "members",
            Self::Typing => "typing",
        }
    }
}

/// Bytes each stream holds at most unless configured otherwise.
pub const DEFAULT_STREAM_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Whether `subject` matches `pattern` (NATS rules: tokens separated by
/// `.`, `*` matches one token, a final `>` matches one or more).
pub fn matches(pattern: &str, subject: &str) -> bool {
    let (mut pattern, mut subject) = (Some(pattern), Some(subject));
    while let Some(p) = next_token(&mut pattern) {
        if p == ">" && pattern.is_none() {
            return subject.is_some();
        }
        match next_token(&mut subject) {
            Some(s) if p == "*" || p == s => {}
            _ => return false,
        }
    }
    subject.is_none()
}

/// The first token of `rest` (as `split('.')` gives them, empty ones
/// included), leaving what follows it; `rest` is `None` after the last.
/// A plain scan: tokens are short, and every message published in-process
/// is matched this way against the subscriptions and streams.
fn next_token<'a>(rest: &mut Option<&'a str>) -> Option<&'a str> {
    let text = rest.take()?;
    match text.bytes().position(|b| b == b'.') {
        Some(dot) => {
            *rest = Some(&text[dot + 1..]);
            Some(&text[..dot])
        }
        None => Some(text),
    }
}

/// Subject and stream names under one prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    stream_max_bytes: u64,
}

impl Subjects {
    /// `prefix` must be a valid subject token (checked by `Config`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            stream_max_bytes: DEFAULT_STREAM_MAX_BYTES,
            prefix: prefix.into(),
        }
    }

    /// The same names, with streams of at most `bytes`.
    pub fn with_stream_max_bytes(self, bytes: u64) -> Self {
        Self {
            stream_max_bytes: bytes,
            ..self
        }
    }

    /// The first token of every subject.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn room_event(&self, room: &str, kind: RoomEventKind) -> String {
        format!("{}.room.{room}.{}", self.prefix, kind.token())
    }

    /// A room's messages, live (core NATS, not stored: the rooms stream
    /// stores them as [`Self::committed_messages`]).
    pub fn room_messages(&self, room: RoomId) -> String {
        self.room_event(&room.to_string(), RoomEventKind::Messages)
    }

    /// Every room's live messages.
    pub fn all_room_messages(&self) -> String {
        self.room_event("*", RoomEventKind::Messages)
    }

    /// Accepted messages in batches (`CommittedMessages`): what the rooms
    /// stream stores, for history-service.
    pub fn committed_messages(&self) -> String {
        format!("{}.messages.committed", self.prefix)
    }

    /// A room's membership changes (core NATS, not stored): gateways add or
    /// drop the room for the member's connections.
    pub fn room_members(&self, room: RoomId) -> String {
        self.room_event(&room.to_string(), RoomEventKind::Members)
    }

    /// Every room's membership changes.
    pub fn room_members_of_any_room(&self) -> String {
        self.room_event("*", RoomEventKind::Members)
    }

    /// A room's typing indicators (core NATS, not stored).
    pub fn room_typing(&self, room: RoomId) -> String {
        self.room_event(&room.to_string(), RoomEventKind::Typing)
    }

    /// Every room's typing indicators.
    pub fn room_typing_of_any_room(&self) -> String {
        self.room_event("*", RoomEventKind::Typing)
    }

    /// The room and kind of a subject built by [`Self::room_messages`],
    /// [`Self::room_members`] or [`Self::room_typing`]; `None` for any other
    /// subject.
    pub fn parse_room_event(&self, subject: &str) -> Option<(RoomId, RoomEventKind)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".room.")?;
        let (room, kind) = rest.split_once('.')?;
        let kind = [
            RoomEventKind::Messages,
            RoomEventKind::Members,
            RoomEventKind::Typing,
        ]
        .into_iter()
        .find(|k| k.token() == kind)?;
        Some((room.parse().ok()?, kind))
    }

    /// Everything about one room (messages, membership changes, typing), on
    /// one subscription so a gateway following the room sees them in the
    /// order they were published.
    pub fn room_events(&self, room: RoomId) -> String {
        format!("{}.room.{room}.*", self.prefix)
    }

    /// Every room's events.
    pub fn all_room_events(&self) -> String {
        format!("{}.room.>", self.prefix)
    }

    /// A security event of one kind (JetStream, stream `audit`).
    pub fn audit(&self, kind: &str) -> String {
        format!("{}.audit.{kind}", self.prefix)
    }

    /// Every security event: what the audit stream stores.
    pub fn all_audit(&self) -> String {
        format!("{}.audit.>", self.prefix)
    }

    /// Every request chat-service answers.
    pub fn chat_requests(&self) -> String {
        format!("{}.rpc.chat.>", self.prefix)
    }

    /// Every request history-service answers.
    pub fn history_requests(&self) -> String {
        format!("{}.rpc.history.>", self.prefix)
    }

    /// Every request auth-api answers.
    pub fn auth_requests(&self) -> String {
        format!("{}.rpc.auth.>", self.prefix)
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

    /// Every gateway's users online (core pub/sub; `PresenceBeat`).
    pub fn presence_beats(&self) -> String {
        format!("{}.presence.beats", self.prefix)
    }

    /// Request/reply: the members of a room.
    pub fn chat_room_members(&self) -> String {
        format!("{}.rpc.chat.room_members", self.prefix)
    }

    /// Request/reply: a room's latest sequence and epoch, for a member.
    pub fn chat_room_head(&self) -> String {
        format!("{}.rpc.chat.room_head", self.prefix)
    }

    /// Request/reply: a room's stored messages in a sequence range.
    pub fn history_range(&self) -> String {
        format!("{}.rpc.history.range", self.prefix)
    }

    /// Sessions just revoked (core pub/sub; `SessionsRevoked`): every
    /// process that verifies tokens refuses them from then on.
    pub fn sessions_revoked(&self) -> String {
        format!("{}.auth.sessions.revoked", self.prefix)
    }

    /// The signing keys just changed (core pub/sub; the new `Jwks`): every
    /// process that verifies tokens takes them at once, so tokens of a key
    /// rotated in are accepted before any cache would have expired.
    pub fn signing_keys_changed(&self) -> String {
        format!("{}.auth.keys.changed", self.prefix)
    }

    /// Request/reply: the sessions revoked recently enough that tokens of
    /// theirs may still be unexpired (`AuthRevocations`).
    pub fn auth_revocations(&self) -> String {
        format!("{}.rpc.auth.revocations", self.prefix)
    }

    /// Request/reply: who an API key belongs to (`AuthApiKey`).
    pub fn auth_api_key(&self) -> String {
        format!("{}.rpc.auth.api_key", self.prefix)
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

    /// Accepted messages, kept until history-service stored them.
    pub fn rooms_stream(&self) -> StreamSpec {
        StreamSpec {
            name: self.stream_name("ROOMS"),
            subjects: vec![self.committed_messages()],
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: self.stream_max_bytes,
            duplicate_window: Duration::from_secs(120),
            consumers: vec![self.history_consumer()],
        }
    }

    /// Security events, consumed by audit-service.
    pub fn audit_stream(&self) -> StreamSpec {
        StreamSpec {
            name: self.stream_name("AUDIT"),
            subjects: vec![self.all_audit()],
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: self.stream_max_bytes,
            duplicate_window: Duration::from_secs(120),
            consumers: vec![self.audit_consumer(), self.account_deletions_consumer()],
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

    /// chat-service's durable consumer of account deletions (the
    /// `user_deleted` security events): it removes their room memberships.
    pub fn account_deletions_consumer(&self) -> ConsumerSpec {
        ConsumerSpec {
            stream: self.stream_name("AUDIT"),
            durable: "chat-account-deletions".to_owned(),
            filter: Some(self.audit(AuditKind::UserDeleted.as_str())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(matches("a.b.c", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(!matches("a.*.c", "a.x.y.c"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c.d"));
        assert!(!matches("a.>", "a"));
        assert!(matches("*.b.>", "z.b.c"));
        assert!(!matches("a.b.c", "a.b.d"));
        assert!(!matches("a.b", "a.bc"));
        assert!(!matches("a.bc", "a.b"));
        assert!(matches("*", "abc"));
        assert!(!matches("*", "a.b"));
        assert!(matches(">", "a.b"));
        // Empty tokens count as tokens, as they did (NATS refuses such
        // subjects; the in-process bus takes them).
        assert!(matches("a.*.b", "a..b"));
        assert!(matches("a.>", "a."));
        assert!(!matches("a", ""));
    }

    #[test]
    fn room_subjects_parse_back_into_room_and_kind() {
        let subjects = Subjects::new("p1");
        let room = RoomId::new();
        assert_eq!(
            subjects.parse_room_event(&subjects.room_messages(room)),
            Some((room, RoomEventKind::Messages))
        );
        assert_eq!(
            subjects.parse_room_event(&subjects.room_members(room)),
            Some((room, RoomEventKind::Members))
        );
        assert_eq!(
            subjects.parse_room_event(&subjects.room_typing(room)),
            Some((room, RoomEventKind::Typing))
        );
        for foreign in [
            format!("p2.room.{room}.messages"),
            format!("p1.room.{room}.presence"),
            format!("p1.room.{room}.messages.extra"),
            "p1.room.not-a-uuid.messages".to_owned(),
            "p1.audit.login_failed".to_owned(),
            format!("p1x.room.{room}.messages"),
        ] {
            assert_eq!(subjects.parse_room_event(&foreign), None, "{foreign}");
        }
    }
}
