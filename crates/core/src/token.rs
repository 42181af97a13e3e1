//! Access-token claims and the JWKS document: issued by auth-api, verified by
//! every service that accepts tokens.

use serde::{Deserialize, Serialize};

use crate::users::SystemRole;

/// The only signing algorithm Unhidra issues and accepts.
pub const JWT_ALG: &str = "EdDSA";

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    /// The user id.
    pub sub: String,
    /// The session id.
    pub sid: String,
    /// The user's system role when the token was issued.
    pub role: SystemRole,
    /// The registered device the session was opened on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Unique token id, for revocation.
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
}

/// A public signing key (RFC 8037 OKP, Ed25519).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    /// The public key, base64url without padding.
    pub x: String,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

/// `/.well-known/jwks.json`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}
