//! Access-token verification for every service that accepts tokens: the JWKS is
//! fetched from auth-api over the bus, cached, replaced when auth-api
//! announces a change, refetched on a timer (see `unhidra-runtime`) and when
//! a token names an unknown `kid` (at most once a second), and revoked sessions are kept
//! in memory until their tokens would have expired anyway, so verifying a token
//! costs no database or network round trip. A token whose signature was
//! verified is remembered (by its SHA-256) until the signing keys change, so
//! a client that reconnects with it costs no second signature check; its
//! expiry and its session's revocation are checked at every use all the same.
//! No HTTP here: the extractor and the mapping of [`TokenError`] onto
//! responses live in `unhidra-runtime`.

use std::{
    collections::HashMap,
    sync::RwLock,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use sha2::{Digest, Sha256};
use unhidra_bus::RpcClient;
use unhidra_core::{
    Config,
    api_keys::{self, ApiScope, ApiScopes},
    events::{SCHEMA_VERSION, SessionsRevoked},
    ids::{ApiKeyId, DeviceId, SessionId, UserId},
    rpc::{
        ApiKeyLookup, AuthApiKey, AuthJwks, AuthRevocations, JwksRequest, RevocationsRequest,
        RpcError,
    },
    token::{AccessClaims, JWT_ALG, Jwks},
    users::SystemRole,
};

fn unix_now() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

/// How often an unknown `kid` may trigger a JWKS refetch.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(1);
/// Seconds a token is still accepted after its expiry (clock skew).
const LEEWAY_SECS: i64 = 30;
/// Verified tokens remembered at most per process (about 130 bytes each).
const VERIFIED_TOKENS: usize = 50_000;

/// Who a verified token or API key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authenticated {
    pub user: UserId,
    /// The login session; for an API key, its id (revoking the key revokes
    /// this "session").
    pub session: SessionId,
    /// The user's system role when the token was issued.
    pub role: SystemRole,
    /// The registered device the session was opened on, if any.
    pub device: Option<DeviceId>,
    /// Unix seconds.
    pub expires_at: i64,
    pub credential: Credential,
}

/// What the request authenticated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A user's access token: everything the user may do.
    AccessToken,
    /// An API key: what its owner may do, within its scopes.
    ApiKey { key: ApiKeyId, scopes: ApiScopes },
}

impl Authenticated {
    /// Whether the credential allows `scope` (an access token allows all).
    pub fn may(&self, scope: ApiScope) -> bool {
        match self.credential {
            Credential::AccessToken => true,
            Credential::ApiKey { scopes, .. } => scopes.contains(scope),
        }
    }

    pub fn is_api_key(&self) -> bool {
        matches!(self.credential, Credential::ApiKey { .. })
    }
}

/// What auth-api stores of an API key: SHA-256 of the whole key, base64url.
pub fn hash_api_key(key: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(key.as_bytes()))
}

/// How long a process trusts what auth-api said about an API key (a revoked
/// key is refused at once all the same: revocations are announced).
pub const API_KEY_CACHE: Duration = Duration::from_secs(30);
/// At most this many API keys are remembered per process.
const API_KEY_CACHE_ENTRIES: usize = 10_000;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Malformed, wrongly signed, for another issuer or audience, or naming
    /// an unknown key; the message says which, without internals.
    #[error("{0}")]
    Invalid(&'static str),
    /// Well-formed and signed, but past its expiry.
    #[error("token expired")]
    Expired,
    /// Its session (or API key) was revoked (logout, a revoked session, a
    /// reused refresh token, a disabled account, a revoked key).
    #[error("the session was revoked; log in again")]
    Revoked,
    /// auth-api could not be asked (for the signing keys or about an API
    /// key).
    #[error("credentials cannot be checked now")]
    Unavailable(RpcError),
}

impl TokenError {
    /// The stable code clients see (`invalid_token`, `token_expired`,
    /// `unavailable`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_token",
            Self::Expired => "token_expired",
            Self::Revoked => "session_revoked",
            Self::Unavailable(e) => e.code.as_str(),
        }
    }
}

/// Verifies access tokens against auth-api's signing keys.
pub struct TokenVerifier {
    rpc: RpcClient,
    validation: Validation,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Revoked session → Unix seconds until which its tokens are refused.
    revoked: RwLock<HashMap<SessionId, i64>>,
    /// Hash of an API key → who it belongs to, and until when that holds.
    api_keys: RwLock<HashMap<String, (Authenticated, Instant)>>,
    /// The key set installed last, to tell a change.
    installed: std::sync::Mutex<Jwks>,
    verified: RwLock<VerifiedTokens>,
}

/// Access tokens whose signature, issuer and audience were verified with
/// the signing keys installed now, by SHA-256 of the whole token.
#[derive(Default)]
struct VerifiedTokens {
    by_digest: HashMap<[u8; 32], Authenticated>,
    /// Counts the changes of the signing keys: a verification done with
    /// keys since replaced is not remembered.
    keys_changed: u64,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier for the issuer and audience `config` names, fetching keys
    /// through `rpc`.
    pub fn new(config: &Config, rpc: RpcClient) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&config.token_issuer]);
        validation.set_audience(&[&config.token_audience]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        validation.leeway = LEEWAY_SECS.unsigned_abs();
        Self {
            rpc,
            validation,
            keys: RwLock::new(HashMap::new()),
            last_fetch: tokio::sync::Mutex::new(None),
            revoked: RwLock::new(HashMap::new()),
            api_keys: RwLock::new(HashMap::new()),
            installed: std::sync::Mutex::default(),
            verified: RwLock::default(),
        }
    }

    /// Refuses the tokens of these sessions from now on (until they would
    /// have expired anyway), and forgets revocations that have run out.
    pub fn revoke(&self, revoked: &SessionsRevoked) {
        let now = unix_now();
        let mut list = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        list.retain(|_, until| *until > now);
        if revoked.until > now {
            for session in &revoked.sessions {
                list.insert(*session, revoked.until);
            }
        }
    }

    /// Loads every revocation auth-api still holds (for a process that
    /// started after some were announced).
    pub async fn sync_revocations(&self) -> Result<usize, RpcError> {
        let all = self
            .rpc
            .call::<AuthRevocations>(&RevocationsRequest { v: SCHEMA_VERSION })
            .await?;
        for revoked in &all {
            self.revoke(revoked);
        }
        Ok(all.len())
    }

    fn is_revoked(&self, session: &SessionId) -> bool {
        let now = unix_now();
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(session)
            .is_some_and(|until| *until > now)
    }

    /// Checks signature, algorithm, issuer, audience and expiry (the
    /// signature once per token while the signing keys stay the same), and
    /// that the token's session was not revoked.
    pub async fn verify(&self, token: &str) -> Result<Authenticated, TokenError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (known, keys_changed) = {
            let verified = self.verified.read().unwrap_or_else(|p| p.into_inner());
            (
                verified.by_digest.get(&digest).copied(),
                verified.keys_changed,
            )
        };
        let auth = match known {
            Some(auth) if auth.expires_at < unix_now() - LEEWAY_SECS => {
                return Err(TokenError::Expired);
            }
            Some(auth) => auth,
            None => {
                let auth = self.verify_signed(token).await?;
                self.remember_verified(digest, keys_changed, auth);
                auth
            }
        };
        if self.is_revoked(&auth.session) {
            return Err(TokenError::Revoked);
        }
        Ok(auth)
    }

    /// Remembers a token verified with the keys of `keys_changed`, unless
    /// they changed meanwhile. When full, expired tokens are forgotten, and
    /// all of them if that is not enough.
    fn remember_verified(&self, digest: [u8; 32], keys_changed: u64, auth: Authenticated) {
        let mut verified = self.verified.write().unwrap_or_else(|p| p.into_inner());
        if verified.keys_changed != keys_changed {
            return;
        }
        if verified.by_digest.len() >= VERIFIED_TOKENS {
            let now = unix_now();
            verified
                .by_digest
                .retain(|_, auth| auth.expires_at >= now - LEEWAY_SECS);
            if verified.by_digest.len() >= VERIFIED_TOKENS {
                verified.by_digest.clear();
            }
        }
        verified.by_digest.insert(digest, auth);
    }

    /// Checks the token's signature, algorithm, issuer, audience and expiry.
    async fn verify_signed(&self, token: &str) -> Result<Authenticated, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError::Invalid("malformed token"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid("unsupported token algorithm"));
        }
        let kid = header
            .kid
            .ok_or(TokenError::Invalid("token names no signing key"))?;
        let key = self.key(&kid).await?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid("token rejected"),
            },
        )?;
        let claims = data.claims;
        let user = claims
            .sub
            .parse()
            .map_err(|_| TokenError::Invalid("token subject is not a user id"))?;
        let session = claims
            .sid
            .parse()
            .map_err(|_| TokenError::Invalid("token session is not a session id"))?;
        let device = claims
            .did
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|_| TokenError::Invalid("token device is not a device id"))?;
        Ok(Authenticated {
            user,
            session,
            role: claims.role,
            device,
            expires_at: claims.exp,
            credential: Credential::AccessToken,
        })
    }

    /// Who an API key belongs to: asked of auth-api (only the key's prefix
    /// and hash cross the bus), then remembered for [`API_KEY_CACHE`].
    pub async fn verify_api_key(&self, key: &str) -> Result<Authenticated, TokenError> {
        let prefix = api_keys::prefix_of(key).ok_or(TokenError::Invalid("malformed API key"))?;
        let hash = hash_api_key(key);
        let cached = self
            .api_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(auth, _)| *auth);
        let auth = match cached {
            Some(auth) => auth,
            None => {
                let lookup = ApiKeyLookup {
                    v: SCHEMA_VERSION,
                    prefix: prefix.to_owned(),
                    hash: hash.clone(),
                };
                let identity = self
                    .rpc
                    .call::<AuthApiKey>(&lookup)
                    .await
                    .map_err(TokenError::Unavailable)?
                    .ok_or(TokenError::Invalid("unknown, revoked or expired API key"))?;
                let auth = Authenticated {
                    user: identity.user,
                    session: SessionId(identity.key.0),
                    role: identity.role,
                    device: None,
                    expires_at: identity.expires_at,
                    credential: Credential::ApiKey {
                        key: identity.key,
                        scopes: identity.scopes,
                    },
                };
                self.remember_api_key(hash, auth);
                auth
            }
        };
        if auth.expires_at <= unix_now() {
            return Err(TokenError::Invalid("unknown, revoked or expired API key"));
        }
        if self.is_revoked(&auth.session) {
            return Err(TokenError::Revoked);
        }
        Ok(auth)
    }

    fn remember_api_key(&self, hash: String, auth: Authenticated) {
        let now = Instant::now();
        let mut cache = self.api_keys.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= API_KEY_CACHE_ENTRIES {
            cache.retain(|_, (_, until)| *until > now);
        }
        if cache.len() < API_KEY_CACHE_ENTRIES {
            cache.insert(hash, (auth, now + API_KEY_CACHE));
        }
    }

    fn cached(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        // One fetch at a time; whoever waited finds the refreshed keys.
        let mut last_fetch = self.last_fetch.lock().await;
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        if last_fetch.is_some_and(|at| at.elapsed() < MIN_REFETCH_INTERVAL) {
            return Err(TokenError::Invalid("unknown signing key"));
        }
        self.fetch_keys(&mut last_fetch)
            .await
            .map_err(TokenError::Unavailable)?;
        self.cached(kid)
            .ok_or(TokenError::Invalid("unknown signing key"))
    }

    /// Fetches the JWKS again if it was fetched before (a process that never
    /// verified a token asks nothing), so that keys retired by a rotation
    /// are dropped and new ones known before a token names them.
    pub async fn refresh_keys(&self) -> Result<(), RpcError> {
        let mut last_fetch = self.last_fetch.lock().await;
        if last_fetch.is_none() {
            return Ok(());
        }
        self.fetch_keys(&mut last_fetch).await
    }

    async fn fetch_keys(&self, last_fetch: &mut Option<Instant>) -> Result<(), RpcError> {
        let jwks = self
            .rpc
            .call::<AuthJwks>(&JwksRequest { v: SCHEMA_VERSION })
            .await?;
        *last_fetch = Some(Instant::now());
        self.install_keys(&jwks);
        Ok(())
    }

    /// Verifies with exactly the keys of `jwks` from now on (announced by
    /// auth-api when they change). A change forgets every verified token:
    /// those signed with a retired key are refused from now on.
    pub fn install_keys(&self, jwks: &Jwks) {
        let keys: HashMap<String, DecodingKey> = jwks
            .keys
            .iter()
            .filter(|k| k.alg == JWT_ALG && k.kty == "OKP" && k.crv == "Ed25519")
            .filter_map(|k| Some((k.kid.clone(), DecodingKey::from_ed_components(&k.x).ok()?)))
            .collect();
        let mut installed = self.installed.lock().unwrap_or_else(|p| p.into_inner());
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        if *installed != *jwks {
            installed.clone_from(jwks);
            let mut verified = self.verified.write().unwrap_or_else(|p| p.into_inner());
            verified.keys_changed += 1;
            verified.by_digest.clear();
        }
    }
}
