//! The client wire protocol, version 1 (`unhidra.v1`): JSON text frames between
//! a client and the gateway. `docs/protocol.md` documents every frame and code.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{MessageId, RoomId, UserId};

/// The WebSocket subprotocol the gateway selects.
pub const SUBPROTOCOL: &str = "unhidra.v1";
/// A subprotocol entry `bearer.<jwt>` carries the access token (browsers cannot
/// set `Authorization` on a WebSocket).
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";
/// Longest client id a command may carry.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// Close codes the gateway uses, besides the standard 1000 and 1009.
pub mod close {
    /// The server is restarting: its connections are closed over its drain
    /// period; reconnect (elsewhere) and resume.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The frame exceeded the hard transport limit, or was not valid WebSocket.
    pub const TOO_BIG: u16 = 1009;
    /// The server could not load the user's rooms; reconnect later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The client kept sending far past its rate limit.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// The access token expired; reconnect with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The session was revoked (logout, a revoked session, a reused refresh
    /// token, a disabled account); log in again.
    pub const SESSION_REVOKED: u16 = 4003;
    /// The client did not read its frames fast enough.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Nothing came from the client (not even a pong to the server's pings)
    /// within the idle timeout: the connection is presumed dead.
    pub const IDLE_TIMEOUT: u16 = 4009;
}

/// A command from the client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Post `body` to `room`.
    Send {
        id: String,
        room: RoomId,
        body: String,
    },
    /// Liveness check at the application level.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// After a (re)connect: the last sequence seen per room; the server
    /// sends what was missed, in order, then `resumed` (or `gap`) per room.
    Resume {
        rooms: BTreeMap<RoomId, ResumePoint>,
    },
    /// The user is typing in `room` (shown to its other members for a few
    /// seconds; send again while typing goes on).
    Typing { room: RoomId },
    /// A fresh access token of the same user for this connection, which
    /// then lives until that token expires.
    Refresh {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        token: String,
    },
}

/// Where a client stands in a room: the last sequence it saw, and the epoch
/// it saw it under when it knows one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ResumePoint {
    Seq(u64),
    At {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
}

impl ResumePoint {
    pub fn seq(&self) -> u64 {
        match self {
            Self::Seq(seq) | Self::At { seq, .. } => *seq,
        }
    }

    pub fn epoch(&self) -> Option<&str> {
        match self {
            Self::Seq(_) => None,
            Self::At { epoch, .. } => epoch.as_deref(),
        }
    }
}

/// The most rooms one `resume` may name.
pub const MAX_RESUME_ROOMS: usize = 1000;

/// A frame from the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The message with client id `id` was accepted with room sequence `seq`.
    Ack {
        id: String,
        room: RoomId,
        seq: u64,
        message_id: MessageId,
    },
    /// A message in one of the user's rooms (including the user's own).
    Message {
        room: RoomId,
        seq: u64,
        message_id: MessageId,
        sender: UserId,
        body: String,
        #[serde(with = "crate::timestamps")]
        sent_at: DateTime<Utc>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<String>,
    },
    /// `user` is typing in `room`.
    Typing { room: RoomId, user: UserId },
    /// `user`, who shares a room with this connection's user, came online
    /// (a first connection on any gateway) or went offline (the last one
    /// closed, or its gateway died).
    Presence { user: UserId, online: bool },
    /// The connection's access token was replaced; it lives until
    /// `expires_at` (Unix seconds).
    Refreshed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        expires_at: i64,
    },
    /// The connection's access token expires at `expires_at` (Unix
    /// seconds): send `refresh` with a fresh one before, or the connection
    /// closes with 4001.
    TokenExpiring { expires_at: i64 },
    /// The messages a `resume` asked for were sent (up to `seq`); live
    /// messages of the room follow, without a gap.
    Resumed {
        room: RoomId,
        epoch: String,
        seq: u64,
    },
    /// The messages `from_seq..=to_seq` of the room are not replayed (too
    /// many, or the client's epoch is not the room's: its history was reset);
    /// page them from history. Live messages after `to_seq` follow.
    Gap {
        room: RoomId,
        epoch: String,
        from_seq: u64,
        to_seq: u64,
    },
    /// A command was refused; `id` is the client id when one could be read.
    Error {
        id: Option<String>,
        code: ErrorCode,
        message: String,
        /// With `rate_limited`: when the frame would be accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// Stable error codes of `error` frames.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, a missing or mistyped field.
    InvalidFrame,
    /// A `type` this protocol version does not have.
    UnknownType,
    /// Larger than `max_frame_bytes`.
    TooLarge,
    /// Over the connection's frame or byte rate; retry after
    /// `retry_after_ms`.
    RateLimited,
    /// Not a member of the room, or not allowed on this connection.
    Forbidden,
    /// A `refresh` token that does not verify (malformed, expired, revoked).
    InvalidToken,
    /// No such room.
    NotFound,
    /// A service behind the gateway did not answer; retry later.
    Unavailable,
    /// Something broke on the server; the cause is in its logs.
    Internal,
}

/// A frame the gateway refuses, with the client id when one could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

/// A room message's `message` frame, written whole.
impl From<crate::events::RoomMessage> for ServerFrame {
    fn from(m: crate::events::RoomMessage) -> Self {
        Self::Message {
            room: m.room,
            seq: m.seq,
            message_id: m.message_id,
            sender: m.sender,
            body: m.body,
            sent_at: m.sent_at,
        }
    }
}

impl From<FrameError> for ServerFrame {
    fn from(e: FrameError) -> Self {
        Self::Error {
            id: e.id,
            code: e.code,
            message: e.message,
            retry_after_ms: None,
        }
    }
}

/// How a [`RoomMessage`](crate::events::RoomMessage) event's JSON begins,
/// as chat-service writes it (`v` is its first field), and how its
/// `message` frame begins.
const EVENT_START: &str = "{\"v\":1,";
const MESSAGE_FRAME_START: &str = "{\"type\":\"message\",";

/// A `message` frame made from a room message event's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageText {
    pub room: RoomId,
    pub seq: u64,
    pub text: String,
}

/// The fields of a room message event, each checked, none other allowed
/// (nor any twice); the body borrowed, not copied.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventFields<'a> {
    #[serde(rename = "v")]
    _v: u32,
    room: RoomId,
    seq: u64,
    #[serde(rename = "message_id")]
    _message_id: MessageId,
    #[serde(rename = "sender")]
    _sender: UserId,
    #[serde(rename = "body", borrow)]
    _body: std::borrow::Cow<'a, str>,
    #[serde(rename = "sent_at", with = "crate::timestamps")]
    _sent_at: DateTime<Utc>,
}

impl ServerFrame {
    /// The `message` frame of a room message, made from the event's JSON as
    /// chat-service wrote it: the frame has the event's fields but `v`, in
    /// the same order, so it is the event's text with `v` replaced by the
    /// frame's `type`, and a gateway fanning a message out does not write it
    /// again. The event's fields are checked (every one, and no other), so
    /// the text is a well-formed `message` frame. `None` when `event` is not
    /// exactly such a text (another version's, or not a message): read it
    /// whole then.
    pub fn message_text(event: &str) -> Option<MessageText> {
        let fields = event.strip_prefix(EVENT_START)?;
        let checked: EventFields = serde_json::from_str(event).ok()?;
        let mut text = String::with_capacity(MESSAGE_FRAME_START.len() + fields.len());
        text.push_str(MESSAGE_FRAME_START);
        text.push_str(fields);
        Some(MessageText {
            room: checked.room,
            seq: checked.seq,
            text,
        })
    }
}

const KNOWN_TYPES: [&str; 5] = ["send", "ping", "resume", "refresh", "typing"];

/// Parses a text frame. A valid frame is parsed once; only a refused one is
/// looked at again, to tell malformed frames from unknown types and to recover
/// the client id for the error.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let frame: ClientFrame = serde_json::from_str(text).map_err(|e| explain(text, e))?;
    match &frame {
        ClientFrame::Send { id, .. } if id.is_empty() || id.len() > MAX_CLIENT_ID_LEN => {
            return Err(FrameError {
                id: Some(id.chars().take(MAX_CLIENT_ID_LEN).collect()),
                code: ErrorCode::InvalidFrame,
                message: format!("`id` must be 1 to {MAX_CLIENT_ID_LEN} bytes"),
            });
        }
        ClientFrame::Resume { rooms } if rooms.len() > MAX_RESUME_ROOMS => {
            return Err(FrameError {
                id: None,
                code: ErrorCode::InvalidFrame,
                message: format!("`resume` names at most {MAX_RESUME_ROOMS} rooms"),
            });
        }
        _ => {}
    }
    Ok(frame)
}

/// Why `text` is not a client frame.
fn explain(text: &str, error: serde_json::Error) -> FrameError {
    let fail = |id: Option<String>, code, message: String| FrameError { id, code, message };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return fail(None, ErrorCode::InvalidFrame, format!("not JSON: {e}")),
    };
    let Some(object) = value.as_object() else {
        return fail(
            None,
            ErrorCode::InvalidFrame,
            "expected a JSON object".into(),
        );
    };
    let id = object.get("id").and_then(|v| v.as_str()).map(str::to_owned);
    match object.get("type").and_then(|v| v.as_str()) {
        None => fail(
            id,
            ErrorCode::InvalidFrame,
            "missing string field `type`".into(),
        ),
        Some(kind) if !KNOWN_TYPES.contains(&kind) => {
            let kind: String = kind.chars().take(64).collect();
            fail(id, ErrorCode::UnknownType, format!("unknown type `{kind}`"))
        }
        Some(_) => fail(id, ErrorCode::InvalidFrame, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_frame_made_from_the_event_text_is_the_frame_written_whole() {
        use crate::events::{RoomMessage, SCHEMA_VERSION};

        for body in [
            "hello",
            "",
            "quote \" backslash \\ newline \n nul \u{0} é 🦀",
            "{\"v\":1,",
        ] {
            let event = RoomMessage {
                v: SCHEMA_VERSION,
                room: RoomId::new(),
                seq: 42,
                message_id: MessageId::new(),
                sender: UserId::new(),
                body: body.to_owned(),
                sent_at: Utc::now(),
            };
            let written =
                serde_json::to_string(&ServerFrame::from(event.clone())).expect("written");
            let text = serde_json::to_string(&event).expect("written");
            let made = ServerFrame::message_text(&text).expect("made");
            assert_eq!((made.room, made.seq), (event.room, event.seq));
            assert_eq!(made.text, written);
        }
        let event = |fields: &str| {
            format!(
                r#"{{"v":1,"room":"{}","seq":1,"message_id":"{}","sender":"{}",{fields}}}"#,
                RoomId::new(),
                MessageId::new(),
                UserId::new()
            )
        };
        let sent_at = r#""sent_at":"2026-12-07T20:06:01.123Z""#;
        let whole = event(&format!(r#""body":"hi",{sent_at}"#));
        assert!(ServerFrame::message_text(&whole).is_some(), "{whole}");
        for not_exactly in [
            event(sent_at),
            event(&format!(r#""body":7,{sent_at}"#)),
            event(r#""body":"hi","sent_at":"yesterday""#),
            event(&format!(r#""body":"hi",{sent_at},"type":"ack""#)),
            event(&format!(r#""body":"hi",{sent_at},"seq":2"#)),
            whole.replacen(r#""v":1"#, r#""v":2"#, 1),
            whole
                .replacen(r#"{"v":1,"#, "{", 1)
                .replacen('}', r#","v":1}"#, 1),
            format!("{whole} trailing"),
        ] {
            assert_eq!(
                ServerFrame::message_text(&not_exactly),
                None,
                "{not_exactly}"
            );
        }
    }

    #[test]
    fn resume_names_rooms_by_sequence_with_or_without_an_epoch() {
        let room = RoomId::new();
        let text = format!(
            r#"{{"type":"resume","rooms":{{"{room}":41,"{other}":{{"seq":7,"epoch":"e1"}}}}}}"#,
            other = RoomId(uuid::Uuid::nil())
        );
        let Ok(ClientFrame::Resume { rooms }) = parse_client_frame(&text) else {
            panic!("not a resume: {text}");
        };
        assert_eq!(rooms[&room].seq(), 41);
        assert_eq!(rooms[&room].epoch(), None);
        let other = &rooms[&RoomId(uuid::Uuid::nil())];
        assert_eq!((other.seq(), other.epoch()), (7, Some("e1")));
        for bad in [
            r#"{"type":"resume","rooms":{"not-a-room":1}}"#,
            r#"{"type":"resume","rooms":{"00000000-0000-0000-0000-000000000000":-1}}"#,
            r#"{"type":"resume"}"#,
        ] {
            assert_eq!(code_of(bad), Some((None, ErrorCode::InvalidFrame)), "{bad}");
        }
        let many: serde_json::Map<String, serde_json::Value> = (0..=MAX_RESUME_ROOMS)
            .map(|_| (RoomId::new().to_string(), serde_json::json!(0)))
            .collect();
        let text = serde_json::json!({"type": "resume", "rooms": many}).to_string();
        assert_eq!(code_of(&text), Some((None, ErrorCode::InvalidFrame)));
    }

    fn code_of(text: &str) -> Option<(Option<String>, ErrorCode)> {
        parse_client_frame(text).err().map(|e| (e.id, e.code))
    }

    #[test]
    fn parses_send_and_ping() {
        let room = RoomId::new();
        let text = format!(r#"{{"type":"send","id":"c1","room":"{room}","body":"hi"}}"#);
        assert_eq!(
            parse_client_frame(&text),
            Ok(ClientFrame::Send {
                id: "c1".into(),
                room,
                body: "hi".into()
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping { id: None })
        );
    }

    #[test]
    fn tells_malformed_from_unknown() {
        assert_eq!(code_of("{nope"), Some((None, ErrorCode::InvalidFrame)));
        assert_eq!(code_of("[1]"), Some((None, ErrorCode::InvalidFrame)));
        assert_eq!(
            code_of(r#"{"type":"dance","id":"x"}"#),
            Some((Some("x".into()), ErrorCode::UnknownType))
        );
        assert_eq!(
            code_of(r#"{"type":"send","id":"c2","room":"not-a-uuid","body":"hi"}"#),
            Some((Some("c2".into()), ErrorCode::InvalidFrame))
        );
        assert_eq!(
            code_of(r#"{"type":"send","id":"c3","room":5}"#),
            Some((Some("c3".into()), ErrorCode::InvalidFrame))
        );
        assert_eq!(
            code_of(&format!(
                r#"{{"type":"send","id":"{}","room":"{}","body":""}}"#,
                "x".repeat(200),
                RoomId::new()
            ))
            .map(|(_, c)| c),
            Some(ErrorCode::InvalidFrame)
        );
    }
}
