//! API keys for services and bots: how a key looks, the scopes it may carry,
//! and what auth-api answers when a service asks who a key belongs to.
//!
//! A key is `uhk_<prefix>_<secret>`: the prefix (8 characters of base32) is
//! public and names the key in lists and logs; the secret (32 random bytes,
//! base64url) is shown once, at creation. Only the SHA-256 of the whole key
//! is stored. A key acts as the user who made it, within its scopes.

use serde::{Deserialize, Serialize};

use crate::{
    ids::{ApiKeyId, UserId},
    names::names,
    users::SystemRole,
};

/// The header a key is sent in, wherever a bearer token is accepted.
pub const API_KEY_HEADER: &str = "x-api-key";

const MARK: &str = "uhk_";
/// Characters of the public prefix.
pub const PREFIX_CHARS: usize = 8;
/// Characters of the secret: 32 bytes, base64url without padding.
const SECRET_CHARS: usize = 43;

/// The public prefix of a well-formed key, `None` for anything else.
pub fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(MARK)?;
    let (prefix, secret) = rest.split_once('_')?;
    let base32 = |c: char| c.is_ascii_lowercase() || ('2'..='7').contains(&c);
    let base64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    (prefix.len() == PREFIX_CHARS
        && prefix.chars().all(base32)
        && secret.len() == SECRET_CHARS
        && secret.chars().all(base64url))
    .then_some(prefix)
}

/// A key made of its prefix and secret.
pub fn assemble(prefix: &str, secret: &str) -> String {
    format!("{MARK}{prefix}_{secret}")
}

/// What a key may be used for.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiScope {
    /// `GET` requests, and receiving on a WebSocket.
    Read,
    /// Every other request, and sending on a WebSocket.
    Write,
    /// The `/api/v1/admin` endpoints (only for keys of admins).
    Admin,
}

names!(ApiScope, "API key scope", Read => "read", Write => "write", Admin => "admin");

impl ApiScope {
    const ALL: [Self; 3] = [Self::Read, Self::Write, Self::Admin];

    fn bit(self) -> u8 {
        match self {
            Self::Read => 1,
            Self::Write => 2,
            Self::Admin => 4,
        }
    }
}

/// A set of scopes (a list of names on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "Vec<ApiScope>", into = "Vec<ApiScope>")]
pub struct ApiScopes(u8);

impl ApiScopes {
    pub fn contains(self, scope: ApiScope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = ApiScope> {
        ApiScope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// `read,write` as stored.
    pub fn to_names(self) -> String {
        self.iter()
            .map(ApiScope::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses `read,write`; an unknown name is an error.
    pub fn from_names(names: &str) -> Result<Self, crate::names::UnknownVariant> {
        names
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<ApiScope>, _>>()
            .map(Self::from)
    }
}

impl From<Vec<ApiScope>> for ApiScopes {
    fn from(scopes: Vec<ApiScope>) -> Self {
        Self(scopes.iter().fold(0, |bits, s| bits | s.bit()))
    }
}

impl From<ApiScopes> for Vec<ApiScope> {
    fn from(scopes: ApiScopes) -> Self {
        scopes.iter().collect()
    }
}

/// Who a key belongs to, as auth-api answers it (`auth.api_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyIdentity {
    pub key: ApiKeyId,
    pub user: UserId,
    /// The owner's system role now.
    pub role: SystemRole,
    pub scopes: ApiScopes,
    /// Unix seconds.
    pub expires_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_keys_have_a_prefix() {
        let secret = "A".repeat(SECRET_CHARS);
        let key = assemble("abcd2345", &secret);
        assert_eq!(prefix_of(&key), Some("abcd2345"));
        for bad in [
            String::new(),
            "uhk_".into(),
            assemble("abcd234", &secret),
            assemble("ABCD2345", &secret),
            assemble("abcd2345", &secret[1..]),
            assemble("abcd2345", &format!("{}!", &secret[1..])),
            format!("xyz_abcd2345_{secret}"),
            format!("{key} "),
        ] {
            assert_eq!(prefix_of(&bad), None, "{bad}");
        }
    }

    #[test]
    fn scopes_round_trip_as_names_and_lists() -> Result<(), Box<dyn std::error::Error>> {
        let scopes = ApiScopes::from(vec![ApiScope::Write, ApiScope::Read]);
        assert_eq!(scopes.to_names(), "read,write");
        assert_eq!(ApiScopes::from_names("read,write")?, scopes);
        assert_eq!(
            serde_json::to_value(scopes)?,
            serde_json::json!(["read", "write"])
        );
        assert!(scopes.contains(ApiScope::Read) && !scopes.contains(ApiScope::Admin));
        assert!(ApiScopes::from_names("read,root").is_err());
        assert!(ApiScopes::from_names("")?.is_empty());
        assert!(serde_json::from_value::<ApiScopes>(serde_json::json!(["sudo"])).is_err());
        Ok(())
    }
}
