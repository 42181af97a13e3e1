//! The request/reply contracts between services. Each endpoint is declared
//! once, as an [`Rpc`] that ties its subject to its request and reply types,
//! so a caller cannot pair a subject with the wrong types. A refusal carries an
//! [`RpcCode`]; [`RpcCode::http_status`] and [`RpcCode::frame_code`] are the one
//! mapping of those codes onto what HTTP and WebSocket clients see.
//!
//! On the wire a reply is `{"ok": <reply>}` or
//! `{"err": {"code": "<rpc code>", "message": "..."}}`.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    api_keys::ApiKeyIdentity,
    events::{RoomMessage, SessionsRevoked},
    ids::{MessageId, RoomId, UserId},
    protocol::ErrorCode,
    rooms::Role,
    subjects::Subjects,
    token::Jwks,
};

/// One request/reply endpoint on the bus.
pub trait Rpc {
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    type Reply: Serialize + DeserializeOwned + Send + 'static;

    /// The subject requests go to.
    fn subject(subjects: &Subjects) -> String;
}

/// The subject of every contract below, each with its name (the subject
/// after `<prefix>.rpc.`, as in `chat.send`): what request metrics are
/// labelled with.
pub fn contracts(subjects: &Subjects) -> Vec<(String, String)> {
    let rpc = format!("{}.rpc.", subjects.prefix());
    [
        ChatSend::subject(subjects),
        RoomsOf::subject(subjects),
        Membership::subject(subjects),
        RoomMembers::subject(subjects),
        RoomHead::subject(subjects),
        HistoryRange::subject(subjects),
        AuthJwks::subject(subjects),
        AuthRevocations::subject(subjects),
        AuthApiKey::subject(subjects),
    ]
    .into_iter()
    .map(|subject| {
        let name = subject.strip_prefix(&rpc).unwrap_or(&subject).to_owned();
        (subject, name)
    })
    .collect()
}

/// Why a request was refused. The message is shown to clients, so it is
/// fixed text that never carries internals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    pub code: RpcCode,
    pub message: String,
}

impl RpcError {
    pub fn new(code: RpcCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The stable refusal codes of the bus.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RpcCode {
    /// The request is well-formed but invalid.
    InvalidInput,
    /// The user may not do this.
    Forbidden,
    /// The room (or other target) does not exist.
    NotFound,
    /// The service, or a store behind it, cannot answer now; retry later.
    Unavailable,
    /// Something broke; the cause is in the answering service's log.
    Internal,
}

impl RpcCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid_input",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status an API answers with when a call fails with this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidInput => 422,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }

    /// The code of the `error` frame a WebSocket client gets.
    pub fn frame_code(self) -> ErrorCode {
        match self {
            Self::InvalidInput => ErrorCode::InvalidFrame,
            Self::Forbidden => ErrorCode::Forbidden,
            Self::NotFound => ErrorCode::NotFound,
            Self::Unavailable => ErrorCode::Unavailable,
            Self::Internal => ErrorCode::Internal,
        }
    }
}

/// Every reply on the bus.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RpcReply<T> {
    Ok(T),
    Err(RpcError),
}

impl<T> From<Result<T, RpcError>> for RpcReply<T> {
    fn from(result: Result<T, RpcError>) -> Self {
        match result {
            Ok(reply) => Self::Ok(reply),
            Err(e) => Self::Err(e),
        }
    }
}

impl<T> From<RpcReply<T>> for Result<T, RpcError> {
    fn from(reply: RpcReply<T>) -> Self {
        match reply {
            RpcReply::Ok(reply) => Ok(reply),
            RpcReply::Err(e) => Err(e),
        }
    }
}

/// `chat.send`: the gateway forwards the sends of one or more connections,
/// each connection's in the order the client sent them; the reply has one
/// outcome per send, in the same order, each the room sequence it was
/// accepted with or why it was refused. A connection has sends in one such
/// request at a time, so its sends to a room are numbered in the order it
/// sent them.
pub enum ChatSend {}

impl Rpc for ChatSend {
    type Request = SendBatch;
    type Reply = Vec<RpcReply<SendAccepted>>;

    fn subject(subjects: &Subjects) -> String {
        subjects.chat_send()
    }
}

/// Sends one `chat.send` request carries at most (all its users' together).
pub const MAX_SENDS_PER_BATCH: usize = 256;

/// Sends of one or more connections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendBatch {
    pub v: u32,
    pub users: Vec<UserSends>,
}

/// One connection's sends, of its user, in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserSends {
    pub user: UserId,
    pub sends: Vec<Draft>,
}

/// One message to post.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Draft {
    /// The client's id of the send: a send repeated with the same id (per
    /// user, within `UNHIDRA_SEND_IDEMPOTENCY_SECS`) gets the original ack.
    pub id: String,
    pub room: RoomId,
    pub body: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendAccepted {
    pub seq: u64,
    pub message_id: MessageId,
}

/// `chat.rooms_of`: the rooms each of up to [`MAX_USERS_PER_ROOMS_OF`] users
/// belongs to (a user in no room is left out of the reply).
pub enum RoomsOf {}

/// The most users one `chat.rooms_of` asks about.
pub const MAX_USERS_PER_ROOMS_OF: usize = 500;

impl Rpc for RoomsOf {
    type Request = RoomsOfRequest;
    type Reply = Vec<UserRooms>;

    fn subject(subjects: &Subjects) -> String {
        subjects.chat_rooms_of()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomsOfRequest {
    pub v: u32,
    pub users: Vec<UserId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRooms {
    pub user: UserId,
    pub rooms: Vec<RoomId>,
}

/// `chat.membership`: a user's role in a room; refused with `not_found` when
/// the room does not exist and `forbidden` when the user is not a member.
pub enum Membership {}

impl Rpc for Membership {
    type Request = MembershipRequest;
    type Reply = Role;

    fn subject(subjects: &Subjects) -> String {
        subjects.chat_membership()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MembershipRequest {
    pub v: u32,
    pub room: RoomId,
    pub user: UserId,
}

/// `chat.room_members`: the members of a room, for a member of it (refused
/// with `not_found` or `forbidden` like `chat.membership`).
pub enum RoomMembers {}

impl Rpc for RoomMembers {
    type Request = MembershipRequest;
    type Reply = Vec<UserId>;

    fn subject(subjects: &Subjects) -> String {
        subjects.chat_room_members()
    }
}

/// `chat.room_head`: where a room's stream stands, for a member (refused
/// with `not_found` or `forbidden` like `chat.membership`).
pub enum RoomHead {}

impl Rpc for RoomHead {
    type Request = MembershipRequest;
    type Reply = RoomHeadReply;

    fn subject(subjects: &Subjects) -> String {
        subjects.chat_room_head()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomHeadReply {
    /// The sequence number of the room's latest accepted message (0 for
    /// none): every message up to it is committed.
    pub seq: u64,
    /// Changes if the room's history is ever reset; a client's sequence
    /// numbers mean nothing under another epoch.
    pub epoch: String,
}

/// `history.range`: the stored messages of a room with `after < seq <=
/// up_to`, in order (at most `MAX_RANGE`; the caller checked membership).
/// Messages not stored yet are missing from the answer, not waited for.
pub enum HistoryRange {}

/// The most messages one `history.range` answer holds.
pub const MAX_RANGE: u64 = 1000;

impl Rpc for HistoryRange {
    type Request = HistoryRangeRequest;
    type Reply = Vec<RoomMessage>;

    fn subject(subjects: &Subjects) -> String {
        subjects.history_range()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryRangeRequest {
    pub v: u32,
    pub room: RoomId,
    pub after: u64,
    pub up_to: u64,
}

/// `auth.jwks`: the public signing keys, for token verification.
pub enum AuthJwks {}

impl Rpc for AuthJwks {
    type Request = JwksRequest;
    type Reply = Jwks;

    fn subject(subjects: &Subjects) -> String {
        subjects.auth_jwks()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JwksRequest {
    pub v: u32,
}

/// `auth.revocations`: every session revoked recently enough that tokens of
/// it may be unexpired, so a process that starts late refuses them too.
pub enum AuthRevocations {}

impl Rpc for AuthRevocations {
    type Request = RevocationsRequest;
    type Reply = Vec<SessionsRevoked>;

    fn subject(subjects: &Subjects) -> String {
        subjects.auth_revocations()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationsRequest {
    pub v: u32,
}

/// `auth.api_key`: who the API key with this prefix and hash belongs to;
/// `None` for an unknown, revoked or expired key, or one whose owner can no
/// longer log in. The secret itself never crosses the bus.
pub enum AuthApiKey {}

impl Rpc for AuthApiKey {
    type Request = ApiKeyLookup;
    type Reply = Option<ApiKeyIdentity>;

    fn subject(subjects: &Subjects) -> String {
        subjects.auth_api_key()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKeyLookup {
    pub v: u32,
    /// The key's public prefix.
    pub prefix: String,
    /// SHA-256 of the whole key, base64url without padding.
    pub hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_is_named_after_its_subject() {
        let subjects = Subjects::new("p1");
        let names: Vec<String> = contracts(&subjects)
            .into_iter()
            .map(|(subject, name)| {
                assert_eq!(subject, format!("p1.rpc.{name}"));
                name
            })
            .collect();
        assert_eq!(
            names,
            [
                "chat.send",
                "chat.rooms_of",
                "chat.membership",
                "chat.room_members",
                "chat.room_head",
                "history.range",
                "auth.jwks",
                "auth.revocations",
                "auth.api_key",
            ]
        );
    }

    #[test]
    fn replies_keep_their_wire_shape() -> Result<(), serde_json::Error> {
        let refused = RpcReply::<Role>::Err(RpcError::new(RpcCode::NotFound, "no such room"));
        assert_eq!(
            serde_json::to_string(&refused)?,
            r#"{"err":{"code":"not_found","message":"no such room"}}"#
        );
        assert_eq!(
            serde_json::to_string(&RpcReply::Ok(Role::Owner))?,
            r#"{"ok":"owner"}"#
        );
        let parsed: RpcReply<Role> =
            serde_json::from_str(r#"{"err":{"code":"forbidden","message":"no"}}"#)?;
        assert_eq!(
            Result::from(parsed),
            Err::<Role, _>(RpcError::new(RpcCode::Forbidden, "no"))
        );
        Ok(())
    }

    #[test]
    fn every_code_maps_to_a_status_and_a_frame_code() {
        for (code, status, frame) in [
            (RpcCode::InvalidInput, 422, ErrorCode::InvalidFrame),
            (RpcCode::Forbidden, 403, ErrorCode::Forbidden),
            (RpcCode::NotFound, 404, ErrorCode::NotFound),
            (RpcCode::Unavailable, 503, ErrorCode::Unavailable),
            (RpcCode::Internal, 500, ErrorCode::Internal),
        ] {
            assert_eq!((code.http_status(), code.frame_code()), (status, frame));
            let wire = serde_json::to_value(code).ok();
            assert_eq!(wire, Some(code.as_str().into()));
        }
    }
}
