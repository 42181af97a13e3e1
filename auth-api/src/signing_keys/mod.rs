//! Token signing keys: Ed25519, generated at first start and kept in the auth
//! database (sealed with `UNHIDRA_SIGNING_KEY_SECRET` when it is set),
//! published as a JWKS (`kid` = RFC 7638 thumbprint, `alg`, `use`). Access
//! tokens are signed with the newest key; every stored key verifies.

mod repo;
mod sealed;

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
    /// Loads the stored keys, generating the first one if there is none;
    /// with a `secret`, new keys are sealed and keys stored as they are get
    /// sealed now.
    pub async fn load_or_create(
        repo: &SigningKeyRepo,
        secret: Option<&secrecy::SecretString>,
    ) -> anyhow::Result<Self> {
        let sealer = secret.map(sealed::Sealer::from_secret).transpose()?;
        if repo.all(JWT_ALG).await?.is_empty() {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("generating an Ed25519 key"))?;
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|_| anyhow::anyhow!("reading the generated key"))?;
            let public_x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
            let kid = thumbprint(&public_x);
            let der = STANDARD.encode(pkcs8.as_ref());
            let private_pkcs8 = match &sealer {
                Some(sealer) => sealer.seal(&kid, &der)?,
                None => der,
            };
            let key = StoredKey {
                kid,
                private_pkcs8,
                public_x,
            };
            // Replicas starting together may each insert a key; all of them
            // verify, and all replicas sign with the newest.
            repo.insert(JWT_ALG, &key).await?;
            tracing::info!(kid = %key.kid, "generated a new signing key");
        }
        let keys = repo.all(JWT_ALG).await?;
        if let Some(sealer) = &sealer {
            for key in keys.iter().filter(|k| !sealed::is_sealed(&k.private_pkcs8)) {
                let sealed = sealer.seal(&key.kid, &key.private_pkcs8)?;
                repo.reseal(&key.kid, &key.private_pkcs8, &sealed).await?;
                tracing::info!(kid = %key.kid, "signing key sealed");
            }
        }
        let newest = keys.last().context("no signing key stored")?;
        let der = sealed::unseal(sealer.as_ref(), &newest.kid, &newest.private_pkcs8)?;
        let der = STANDARD.decode(der).context("stored signing key")?;
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

#[cfg(test)]
mod tests {
    use secrecy::SecretString;
    use unhidra_store::Database;
    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{MIGRATIONS, NAME};

    fn secret(byte: u8) -> SecretString {
        SecretString::from(STANDARD.encode([byte; 32]))
    }

    #[tokio::test]
    async fn keys_are_sealed_with_the_secret_and_refuse_to_load_without_it() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = Database::connect(db.url(), 2).await?;
            database.migrate(NAME, MIGRATIONS).await?;
            let repo = SigningKeyRepo::new(database.clone());
            let stored = || async {
                let value: String =
                    sqlx::query_scalar("SELECT private_key_pkcs8 FROM signing_keys")
                        .fetch_one(&database.pool)
                        .await?;
                anyhow::Ok(value)
            };

            // Without a secret, a key kept as is; with one, the same key sealed.
            let plain = SigningKeys::load_or_create(&repo, None).await?;
            let clear = stored().await?;
            assert!(!clear.starts_with("xc20p1:"));
            let sealed = SigningKeys::load_or_create(&repo, Some(&secret(7))).await?;
            assert!(stored().await?.starts_with("xc20p1:"), "sealed at start");
            assert_eq!(plain.jwks(), sealed.jwks(), "the same key");
            assert!(
                !stored()
                    .await?
                    .contains(&STANDARD.encode([0x30_u8, 0x2e, 0x02, 0x01])),
                "no DER in the clear"
            );
            let again = SigningKeys::load_or_create(&repo, Some(&secret(7))).await?;
            assert_eq!(again.jwks(), sealed.jwks());

            let refused = SigningKeys::load_or_create(&repo, None).await.err();
            assert!(
                refused.is_some_and(|e| e.to_string().contains("UNHIDRA_SIGNING_KEY_SECRET")),
                "a sealed key needs the secret"
            );
            assert!(
                SigningKeys::load_or_create(&repo, Some(&secret(8)))
                    .await
                    .is_err(),
                "another secret opens nothing"
            );
            Ok(())
        })
        .await
    }
}
