//! Least privilege on the bus: the scaled-out services, and exactly which
//! subjects each may publish and subscribe to. A NATS server configured with
//! these permissions (see `unhidra nats-config`) refuses anything else, so a
//! leaked gateway credential cannot accept messages as chat-service, forge
//! room messages, answer token-verification requests or read the audit trail.

use crate::{
    streams::{ConsumerSpec, StreamSpec},
    subjects::Subjects,
};

/// A scaled-out service: its own process, its own NATS user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    AuthApi,
    Chat,
    History,
    Audit,
}

impl Role {
    pub const ALL: [Self; 5] = [
        Self::Gateway,
        Self::AuthApi,
        Self::Chat,
        Self::History,
        Self::Audit,
    ];

    /// The service's name: its binary, its NATS user and its reply inbox.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway-service",
            Self::AuthApi => "auth-api",
            Self::Chat => "chat-service",
            Self::History => "history-service",
            Self::Audit => "audit-service",
        }
    }
}

/// What one service may do on the bus; everything else is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May reply to the requests it receives (and only to those).
    pub respond: bool,
}

/// The JetStream API calls that create or update `stream` with its consumers.
fn manage_stream(stream: &StreamSpec) -> Vec<String> {
    let name = &stream.name;
    let mut subjects = vec![
        format!("$JS.API.STREAM.CREATE.{name}"),
        format!("$JS.API.STREAM.UPDATE.{name}"),
        format!("$JS.API.STREAM.INFO.{name}"),
    ];
    subjects.extend(stream.consumers.iter().flat_map(create_consumer));
    subjects
}

fn create_consumer(consumer: &ConsumerSpec) -> [String; 3] {
    let (stream, durable) = (&consumer.stream, &consumer.durable);
    [
        format!("$JS.API.CONSUMER.CREATE.{stream}.{durable}"),
        // Newer servers take the filter subject after the name.
        format!("$JS.API.CONSUMER.CREATE.{stream}.{durable}.>"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}"),
    ]
}

/// The JetStream API calls that read `consumer`: resume it, pull its
/// messages, report its lag, acknowledge.
fn consume(consumer: &ConsumerSpec) -> Vec<String> {
    let (stream, durable) = (&consumer.stream, &consumer.durable);
    let mut subjects = create_consumer(consumer).to_vec();
    subjects.extend([
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.CONSUMER.INFO.{stream}.{durable}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"),
        format!("$JS.ACK.{stream}.{durable}.>"),
    ]);
    subjects
}

impl Subjects {
    /// Where a service receives its replies on NATS; only it may subscribe
    /// there.
    pub fn inbox(&self, service: &str) -> String {
        format!("_INBOX.{}.{service}", self.prefix())
    }

    /// Everything `role` may publish and subscribe to, and nothing more.
    pub fn permissions(&self, role: Role) -> Permissions {
        // Every service verifies tokens and API keys, and hears of revoked
        // sessions and rotated keys.
        let mut publish = vec![
            self.auth_jwks(),
            self.auth_revocations(),
            self.auth_api_key(),
        ];
        let mut subscribe = vec![
            format!("{}.>", self.inbox(role.name())),
            self.sessions_revoked(),
            self.signing_keys_changed(),
        ];
        let respond = role != Role::Gateway && role != Role::Audit;
        let (rooms, audit) = (self.rooms_stream(), self.audit_stream());
        match role {
            Role::Gateway => {
                publish.extend([
                    self.chat_send(),
                    self.chat_rooms_of(),
                    self.chat_room_members(),
                    self.chat_room_head(),
                    self.history_range(),
                    self.room_typing_of_any_room(),
                    self.presence_beats(),
                ]);
                subscribe.extend([self.all_room_events(), self.presence_beats()]);
            }
            Role::AuthApi => {
                publish.extend([
                    self.sessions_revoked(),
                    self.signing_keys_changed(),
                    self.all_audit(),
                ]);
                publish.extend(manage_stream(&audit));
                subscribe.push(self.auth_requests());
            }
            Role::Chat => {
                publish.extend([
                    self.all_room_messages(),
                    self.committed_messages(),
                    self.room_members_of_any_room(),
                    self.all_audit(),
                ]);
                publish.extend(manage_stream(&rooms));
                publish.extend(manage_stream(&audit));
                publish.extend(consume(&self.account_deletions_consumer()));
                subscribe.push(self.chat_requests());
            }
            Role::History => {
                publish.push(self.chat_membership());
                publish.extend(manage_stream(&rooms));
                publish.extend(consume(&self.history_consumer()));
                subscribe.push(self.history_requests());
            }
            Role::Audit => {
                publish.extend(manage_stream(&audit));
                publish.extend(consume(&self.audit_consumer()));
            }
        }
        publish.sort();
        publish.dedup();
        subscribe.sort();
        subscribe.dedup();
        Permissions {
            publish,
            subscribe,
            respond,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RoomId;

    fn allows(patterns: &[String], subject: &str) -> bool {
        patterns
            .iter()
            .any(|p| crate::subjects::matches(p, subject))
    }

    #[test]
    fn the_gateway_asks_and_listens_but_never_answers_nor_forges() {
        let subjects = Subjects::new("u");
        let gateway = subjects.permissions(Role::Gateway);
        let room = RoomId::new();
        for asked in [
            subjects.chat_send(),
            subjects.history_range(),
            subjects.auth_jwks(),
        ] {
            assert!(allows(&gateway.publish, &asked), "{asked}");
            assert!(!allows(&gateway.subscribe, &asked), "{asked}");
        }
        assert!(allows(&gateway.publish, &subjects.room_typing(room)));
        assert!(!allows(&gateway.publish, &subjects.room_messages(room)));
        assert!(!allows(&gateway.publish, &subjects.committed_messages()));
        assert!(!allows(&gateway.subscribe, &subjects.committed_messages()));
        assert!(!allows(&gateway.publish, &subjects.room_members(room)));
        assert!(!allows(&gateway.publish, &subjects.audit("login_failed")));
        assert!(!allows(&gateway.subscribe, &subjects.audit("login_failed")));
        assert!(!allows(
            &gateway.publish,
            "$JS.API.CONSUMER.CREATE.U_AUDIT.x"
        ));
        assert!(!allows(&gateway.subscribe, "_INBOX.u.chat-service.abc.1"));
        assert!(allows(&gateway.subscribe, "_INBOX.u.gateway-service.abc.1"));
        assert!(!gateway.respond);
    }

    #[test]
    fn only_chat_service_posts_messages_live_or_into_the_rooms_stream() {
        let subjects = Subjects::new("u");
        let room = RoomId::new();
        for role in Role::ALL {
            let permissions = subjects.permissions(role);
            for subject in [subjects.room_messages(room), subjects.committed_messages()] {
                assert_eq!(
                    allows(&permissions.publish, &subject),
                    role == Role::Chat,
                    "{role:?} {subject}"
                );
            }
        }
    }

    #[test]
    fn only_auth_api_answers_token_verification_and_announces_keys() {
        let subjects = Subjects::new("u");
        for role in Role::ALL {
            let permissions = subjects.permissions(role);
            let is_auth = role == Role::AuthApi;
            assert_eq!(
                allows(&permissions.subscribe, &subjects.auth_jwks()),
                is_auth,
                "{role:?}"
            );
            assert_eq!(
                allows(&permissions.publish, &subjects.signing_keys_changed()),
                is_auth,
                "{role:?}"
            );
            assert_eq!(
                allows(&permissions.subscribe, &subjects.chat_send()),
                role == Role::Chat,
                "{role:?}"
            );
        }
    }
}
