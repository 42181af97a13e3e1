//! Signing keys and a verifier of their tokens, for the tests and the
//! benchmark of this crate (the benchmark includes this file by path).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::StreamExt;
use ring::signature::{Ed25519KeyPair, KeyPair};
use unhidra_authn::TokenVerifier;
use unhidra_bus::{Bus, Headers, MemoryBus, RpcClient};
use unhidra_core::{
    Config,
    ids::{SessionId, UserId},
    rpc::RpcReply,
    subjects::Subjects,
    token::{AccessClaims, Jwk, Jwks},
    users::SystemRole,
};

/// A signing key of auth-api's.
pub struct SigningKey {
    kid: String,
    pub pkcs8: Vec<u8>,
    public: String,
}

impl SigningKey {
    pub fn generate(kid: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| "key generation failed")?;
        let pair =
            Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| "key generation failed")?;
        Ok(Self {
            kid: kid.to_owned(),
            public: URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
            pkcs8: pkcs8.as_ref().to_vec(),
        })
    }

    pub fn jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: self.public.clone(),
            kid: self.kid.clone(),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        }
    }

    /// An access token of `session`, expiring `expires_in` seconds from now.
    pub fn token(
        &self,
        config: &Config,
        session: SessionId,
        expires_in: i64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            sub: UserId::new().to_string(),
            sid: session.to_string(),
            role: SystemRole::Member,
            did: None,
            jti: uuid::Uuid::now_v7().to_string(),
            iat: now,
            exp: now + expires_in,
            iss: config.token_issuer.clone(),
            aud: config.token_audience.clone(),
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let key = jsonwebtoken::EncodingKey::from_ed_der(&self.pkcs8);
        jsonwebtoken::encode(&header, &claims, &key)
    }
}

/// A verifier whose auth-api answers JWKS requests with `published`, with
/// those keys installed already.
pub async fn verifier(
    config: &Config,
    published: Arc<Mutex<Jwks>>,
) -> Result<TokenVerifier, Box<dyn std::error::Error>> {
    let subjects = Subjects::new("test");
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let mut requests = bus.subscribe(&subjects.auth_jwks()).await?;
    let installed = published.lock().map(|j| j.clone()).unwrap_or_default();
    let responder_bus = Arc::clone(&bus);
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let jwks = published.lock().map(|j| j.clone()).unwrap_or_default();
            let reply = serde_json::to_vec(&RpcReply::Ok(jwks)).unwrap_or_default();
            if let Some(to) = request.reply {
                let _ = responder_bus
                    .publish(&to, Headers::new(), reply.into())
                    .await;
            }
        }
    });
    let verifier = TokenVerifier::new(
        config,
        RpcClient::new(bus, subjects, Duration::from_secs(5)),
    );
    verifier.install_keys(&installed);
    Ok(verifier)
}
