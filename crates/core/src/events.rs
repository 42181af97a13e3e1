//! Events that travel on the bus between services. Each carries the schema
//! version `v` and its idempotency key (`message_id`, `id`), which is also the
//! JetStream `Nats-Msg-Id`. Request/reply payloads are in [`crate::rpc`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AuditEventId, MessageId, RoomId, SessionId, UserId};

/// Schema version of every bus payload (events and requests).
pub const SCHEMA_VERSION: u32 = 1;

/// Sessions revoked by their user, an admin or reuse detection (subject
/// `auth.sessions.revoked`). Their access tokens stay refused until
/// `until`, when the last of them has expired anyway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionsRevoked {
    pub v: u32,
    pub user: UserId,
    pub sessions: Vec<SessionId>,
    /// Unix seconds.
    pub until: i64,
}

/// A message accepted into a room: published live on its room's subject
/// (`room.<room>.messages`, for the gateways), and stored in the rooms
/// stream within [`CommittedMessages`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomMessage {
    pub v: u32,
    pub room: RoomId,
    pub seq: u64,
    pub message_id: MessageId,
    pub sender: UserId,
    pub body: String,
    #[serde(with = "crate::timestamps")]
    pub sent_at: DateTime<Utc>,
}

/// Accepted messages as the rooms stream stores them (subject
/// `messages.committed`): many in one stream message, each room's in
/// sequence order, so the stream and its consumer handle a batch where
/// they handled a message. Its `Nats-Msg-Id` is derived from the messages'
/// ids; each message's own idempotency key is its `message_id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommittedMessages {
    pub v: u32,
    pub messages: Vec<CommittedMessage>,
}

/// One message of [`CommittedMessages`], with the headers (request id,
/// trace context) of the request that sent it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommittedMessage {
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub message: RoomMessage,
}

/// A gateway's users with an open connection (core subject
/// `presence.beats`), sent every few seconds; `leaving` when the gateway
/// stops. A gateway that stops sending is presumed dead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceBeat {
    pub v: u32,
    /// The sending gateway's id for this run.
    pub gateway: String,
    pub users: Vec<UserId>,
    #[serde(default)]
    pub leaving: bool,
}

/// A user is typing in a room (core subject `room.<room>.typing`): relayed to
/// the room's members, never stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Typing {
    pub v: u32,
    pub room: RoomId,
    pub user: UserId,
}

/// A user joined or left a room (core subject `room.<room>.members`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MembershipChanged {
    pub v: u32,
    pub room: RoomId,
    pub user: UserId,
    pub joined: bool,
    /// For a join, the room's latest sequence before it: the member's
    /// connections are given every message after it, even those published
    /// before their gateway followed the room.
    #[serde(default)]
    pub seq: u64,
}

/// What happened, in an audit event.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    UserRegistered,
    LoginSucceeded,
    LoginFailed,
    /// Failed logins in a row locked an account.
    AccountLocked,
    /// Failed logins from one address, or an admin, blocked it on every node.
    IpBlocked,
    /// An admin lifted an address block.
    IpUnblocked,
    /// An admin changed an account's role or disabled or enabled it.
    UserChanged,
    /// A refresh token was used a second time: its session is revoked.
    RefreshTokenReused,
    /// A user logged out, or revoked sessions of theirs.
    SessionsRevoked,
    /// A user changed their password (their other sessions ended).
    PasswordChanged,
    /// A password was reset with a mailed token (every session ended).
    PasswordReset,
    /// A user asked for their account to be deleted.
    DeletionRequested,
    /// An admin deleted an account.
    UserDeleted,
    /// An admin created an invite.
    InviteCreated,
    /// A user turned two-factor authentication on.
    MfaEnabled,
    /// A user turned two-factor authentication off.
    MfaDisabled,
    /// A user registered a device (subject: its id).
    DeviceRegistered,
    /// A user revoked a device, ending its sessions (subject: its id).
    DeviceRevoked,
    /// An admin rotated the token signing key.
    SigningKeyRotated,
    /// A user created an API key (subject: its public prefix).
    ApiKeyCreated,
    /// A user replaced an API key with a new one (subject: the old prefix).
    ApiKeyRotated,
    /// A user revoked an API key (subject: its prefix).
    ApiKeyRevoked,
    RoomCreated,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserRegistered => "user_registered",
            Self::LoginSucceeded => "login_succeeded",
            Self::LoginFailed => "login_failed",
            Self::AccountLocked => "account_locked",
            Self::IpBlocked => "ip_blocked",
            Self::IpUnblocked => "ip_unblocked",
            Self::UserChanged => "user_changed",
            Self::RefreshTokenReused => "refresh_token_reused",
            Self::SessionsRevoked => "sessions_revoked",
            Self::PasswordChanged => "password_changed",
            Self::DeletionRequested => "deletion_requested",
            Self::PasswordReset => "password_reset",
            Self::UserDeleted => "user_deleted",
            Self::InviteCreated => "invite_created",
            Self::MfaEnabled => "mfa_enabled",
            Self::MfaDisabled => "mfa_disabled",
            Self::DeviceRegistered => "device_registered",
            Self::DeviceRevoked => "device_revoked",
            Self::SigningKeyRotated => "signing_key_rotated",
            Self::ApiKeyCreated => "api_key_created",
            Self::ApiKeyRotated => "api_key_rotated",
            Self::ApiKeyRevoked => "api_key_revoked",
            Self::RoomCreated => "room_created",
        }
    }
}

/// A security event (stream `audit`). Never carries secrets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEvent {
    pub v: u32,
    pub id: AuditEventId,
    pub kind: AuditKind,
    /// Who did it, when known.
    pub actor: Option<UserId>,
    /// What it was done to: a room id, or the email a failed login named.
    pub subject: Option<String>,
    #[serde(with = "crate::timestamps")]
    pub at: DateTime<Utc>,
    pub detail: serde_json::Value,
    /// Where the request that caused it came from (filled in by the service
    /// that publishes it, from the HTTP request being handled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// The `X-Request-Id` of that request, tying the event to its log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl AuditEvent {
    pub fn new(kind: AuditKind, actor: Option<UserId>, subject: Option<String>) -> Self {
        Self {
            v: SCHEMA_VERSION,
            id: AuditEventId::new(),
            kind,
            actor,
            subject,
            at: Utc::now(),
            detail: serde_json::Value::Null,
            client_ip: None,
            user_agent: None,
            request_id: None,
        }
    }

    /// The event with `detail` (what happened, in words and fields).
    pub fn with_detail(self, detail: serde_json::Value) -> Self {
        Self { detail, ..self }
    }
}
