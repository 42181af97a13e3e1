//! Token signing keys: Ed25519, generated at first start and kept in the auth
//! database, published as a JWKS (`kid` = RFC 7638 thumbprint, `alg`, `use`).
//! Access tokens are signed with the newest key; every stored key verifies.

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
use unhidra_store::{Database, now_millis};

/// The signing key in use and the public keys of all keys.
#[derive(Clone)]
pub struct SigningKeys {
    kid: Arc<str>,
    encoding: EncodingKey,
    jwks: Arc<Jwks>,
}

impl SigningKeys {
    /// Loads the stored keys, generating the first one if there is none.
    pub async fn load_or_create(db: &Database) -> anyhow::Result<Self> {
        if Self::rows(db).await?.is_empty() {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("generating an Ed25519 key"))?;
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|_| anyhow::anyhow!("reading the generated key"))?;
            let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
            let kid = thumbprint(&x);
            // Replicas starting together may each insert a key; all of them
            // verify, and all replicas sign with the newest.
            sqlx::query(
                "INSERT INTO signing_keys (kid, algorithm, private_key_pkcs8, public_key, created_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(&kid)
            .bind(JWT_ALG)
            .bind(STANDARD.encode(pkcs8.as_ref()))
            .bind(&x)
            .bind(now_millis())
            .execute(&db.pool)
            .await?;
            tracing::info!(%kid, "generated a new signing key");
        }
        let rows = Self::rows(db).await?;
        let (kid, private, _) = rows.last().context("no signing key stored")?;
        let der = STANDARD.decode(private).context("stored signing key")?;
        let jwks = Jwks {
            keys: rows
                .iter()
                .map(|(kid, _, x)| Jwk {
                    kty: "OKP".into(),
                    crv: "Ed25519".into(),
                    x: x.clone(),
                    kid: kid.clone(),
                    alg: JWT_ALG.into(),
                    use_: "sig".into(),
                })
                .collect(),
        };
        Ok(Self {
            kid: Arc::from(kid.as_str()),
            encoding: EncodingKey::from_ed_der(&der),
            jwks: Arc::new(jwks),
        })
    }

    /// (kid, private pkcs8, public x), oldest first.
    async fn rows(db: &Database) -> anyhow::Result<Vec<(String, String, String)>> {
        Ok(sqlx::query_as(
            "SELECT kid, private_key_pkcs8, public_key FROM signing_keys
             WHERE algorithm = $1 ORDER BY created_at, kid",
        )
        .bind(JWT_ALG)
        .fetch_all(&db.pool)
        .await?)
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
