//! Access-token verification for every service that accepts tokens: the JWKS is
//! fetched from auth-api over the bus, cached, and refetched when a token names
//! an unknown `kid` (at most every few seconds), so verifying a token costs no
//! database or network round trip.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use axum::{
    extract::{FromRef, FromRequestParts},
    http::{HeaderMap, header::AUTHORIZATION, request::Parts},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use unhidra_bus::{Bus, Headers};
use unhidra_core::{
    ApiError, Config,
    events::{JwksRequest, RpcReply, SCHEMA_VERSION},
    ids::{SessionId, UserId},
    subjects::Subjects,
    token::{AccessClaims, Jwks},
};

/// How often an unknown `kid` may trigger a JWKS refetch.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(5);

/// Who a verified token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authenticated {
    pub user: UserId,
    pub session: SessionId,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Verifies access tokens against auth-api's signing keys.
pub struct TokenVerifier {
    bus: Arc<dyn Bus>,
    jwks_subject: String,
    timeout: Duration,
    validation: Validation,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

fn refuse(code: &'static str, message: &str) -> ApiError {
    ApiError::Unauthenticated {
        code,
        message: message.to_owned(),
    }
}

impl TokenVerifier {
    pub fn new(config: &Config, bus: Arc<dyn Bus>, subjects: &Subjects) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&config.token_issuer]);
        validation.set_audience(&[&config.token_audience]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        validation.leeway = 30;
        Self {
            bus,
            jwks_subject: subjects.auth_jwks(),
            timeout: config.bus_timeout(),
            validation,
            keys: RwLock::new(HashMap::new()),
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    /// Checks signature, algorithm, issuer, audience and expiry.
    pub async fn verify(&self, token: &str) -> Result<Authenticated, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| refuse("invalid_token", "malformed token"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(refuse("invalid_token", "unsupported token algorithm"));
        }
        let kid = header
            .kid
            .ok_or_else(|| refuse("invalid_token", "token names no signing key"))?;
        let key = self.key(&kid).await?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => refuse("token_expired", "token expired"),
                _ => refuse("invalid_token", "token rejected"),
            },
        )?;
        let claims = data.claims;
        let user = claims
            .sub
            .parse()
            .map_err(|_| refuse("invalid_token", "token subject is not a user id"))?;
        let session = claims
            .sid
            .parse()
            .map_err(|_| refuse("invalid_token", "token session is not a session id"))?;
        Ok(Authenticated {
            user,
            session,
            expires_at: claims.exp,
        })
    }

    fn cached(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, ApiError> {
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        // One fetch at a time; whoever waited finds the refreshed keys.
        let mut last_fetch = self.last_fetch.lock().await;
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        if last_fetch.is_some_and(|at| at.elapsed() < MIN_REFETCH_INTERVAL) {
            return Err(refuse("invalid_token", "unknown signing key"));
        }
        let jwks = self.fetch().await?;
        *last_fetch = Some(Instant::now());
        let keys: HashMap<String, DecodingKey> = jwks
            .keys
            .iter()
            .filter(|k| k.alg == "EdDSA" && k.kty == "OKP" && k.crv == "Ed25519")
            .filter_map(|k| Some((k.kid.clone(), DecodingKey::from_ed_components(&k.x).ok()?)))
            .collect();
        let found = keys.get(kid).cloned();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        found.ok_or_else(|| refuse("invalid_token", "unknown signing key"))
    }

    async fn fetch(&self) -> Result<Jwks, ApiError> {
        let request = serde_json::to_vec(&JwksRequest { v: SCHEMA_VERSION })
            .map_err(|e| ApiError::Unexpected(e.into()))?;
        let reply = self
            .bus
            .request(
                &self.jwks_subject,
                Headers::new(),
                request.into(),
                self.timeout,
            )
            .await
            .map_err(|e| ApiError::Unavailable(format!("signing keys unavailable: {e}")))?;
        match serde_json::from_slice::<RpcReply<Jwks>>(&reply.payload) {
            Ok(RpcReply::Ok(jwks)) => Ok(jwks),
            Ok(RpcReply::Err(e)) => Err(e.into()),
            Err(e) => Err(ApiError::Unexpected(anyhow::anyhow!(
                "malformed JWKS reply: {e}"
            ))),
        }
    }
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Extractor for handlers that need an authenticated user (401 otherwise).
#[derive(Debug, Clone, Copy)]
pub struct CurrentUser(pub Authenticated);

impl<S> FromRequestParts<S> for CurrentUser
where
    Arc<TokenVerifier>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let token = bearer_token(&parts.headers)
            .ok_or_else(|| ApiError::unauthenticated("missing bearer token"))?;
        Arc::<TokenVerifier>::from_ref(state)
            .verify(token)
            .await
            .map(CurrentUser)
    }
}
