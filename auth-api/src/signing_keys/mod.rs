//! Token signing keys: Ed25519, generated at first start and kept in the auth
//! database, published as a JWKS (`kid` = RFC 7638 thumbprint, `alg`, `use`).
//! Access tokens are signed with the newest key; every stored key verifies.

mod repo;

use std::sync::Arc;

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::{
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair},
};
use sha2::{Digest, Sha256};
use unhidra_core::token::{AccessClaims, JWT_ALG, Jwk, Jwks};

pub use self::repo::{SigningKeyRepo, StoredKey};

/// The signing key in use and the public keys of all keys.
#[derive(Clone)]
pub struct SigningKeys {
    kid: Arc<str>,
    encoding: EncodingKey,
    jwks: Arc<Jwks>,
}

impl SigningKeys {
    /// Loads the stored keys, generating the first one if there is none.
    pub async fn load_or_create(repo: &SigningKeyRepo) -> anyhow::Result<Self> {
        if repo.all(JWT_ALG).await?.is_empty() {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("generating an Ed25519 key"))?;
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|_| anyhow::anyhow!("reading the generated key"))?;
            let public_x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
            let key = StoredKey {
                kid: thumbprint(&public_x),
                private_pkcs8: STANDARD.encode(pkcs8.as_ref()),
                public_x,
            };
            // Replicas starting together may each insert a key; all of them
            // verify, and all replicas sign with the newest.
            repo.insert(JWT_ALG, &key).await?;
            tracing::info!(kid = %key.kid, "generated a new signing key");
        }
        let keys = repo.all(JWT_ALG).await?;
        let newest = keys.last().context("no signing key stored")?;
        let der = STANDARD
            .decode(&newest.private_pkcs8)
            .context("stored signing key")?;
        let jwks = Jwks {
            keys: keys
                .iter()
                .map(|key| Jwk {
                    kty: "OKP".into(),
                    crv: "Ed25519".into(),
                    x: key.public_x.clone(),
                    kid: key.kid.clone(),
                    alg: JWT_ALG.into(),
                    use_: "sig".into(),
                })
                .collect(),
        };
        Ok(Self {
            kid: Arc::from(newest.kid.as_str()),
            encoding: EncodingKey::from_ed_der(&der),
            jwks: Arc::new(jwks),
        })
    }

    pub fn sign(&self, claims: &AccessClaims) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.to_string());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }

    pub fn jwks(&self) -> &Jwks {
        &self.jwks
    }
}

/// RFC 7638 JWK thumbprint of an Ed25519 public key.
fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}
