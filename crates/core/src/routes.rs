//! Which service answers each public HTTP path: how a gateway in front of
//! scaled-out services routes the API to their owners, so that clients use
//! one address for everything, as they do embedded. The gateway's own paths
//! (`/ws`, presence, health, metrics) never reach this table.

/// A service behind the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    AuthApi,
    Chat,
    History,
}

impl Upstream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthApi => "auth-api",
            Self::Chat => "chat-service",
            Self::History => "history-service",
        }
    }
}

/// The service that answers `path`; `None` for a path no service has, and
/// for one with a `.` or `..` segment (plain or percent-encoded), which a URL
/// parser on the way would resolve into another service's path.
pub fn owner(path: &str) -> Option<Upstream> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let dots = |segment: &&str| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        !decoded.is_empty() && decoded.bytes().all(|b| b == b'.')
    };
    if segments.iter().any(dots) {
        return None;
    }
    match segments.as_slice() {
        [".well-known", ..] => Some(Upstream::AuthApi),
        [
            "api",
            "v1",
            "auth" | "admin" | "users" | "api-keys" | "devices",
            ..,
        ] => Some(Upstream::AuthApi),
        ["api", "v1", "rooms", _, "messages"] => Some(Upstream::History),
        ["api", "v1", "rooms", ..] => Some(Upstream::Chat),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_to_their_owner_and_others_nowhere() {
        for (path, owner_of) in [
            ("/api/v1/auth/login", Some(Upstream::AuthApi)),
            ("/.well-known/jwks.json", Some(Upstream::AuthApi)),
            ("/api/v1/rooms", Some(Upstream::Chat)),
            ("/api/v1/rooms/r1/join", Some(Upstream::Chat)),
            ("/api/v1/rooms/r1/messages", Some(Upstream::History)),
            ("/api/v1/rooms/r1/messages/x", Some(Upstream::Chat)),
            ("/api/v2/rooms", None),
            ("/etc/passwd", None),
            ("", None),
            ("api/v1/rooms", None),
            ("/api/v1/rooms/../admin/users", None),
            ("/api/v1/auth/%2E%2e/rooms/r1/messages", None),
            ("/api/v1/rooms/./r1/join", None),
        ] {
            assert_eq!(owner(path), owner_of, "{path}");
        }
    }
}
