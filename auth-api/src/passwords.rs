//! Password hashing: argon2id with the OWASP parameters (m = 19456 KiB, t = 2,
//! p = 1), computed on the blocking pool with a bounded number in flight so a
//! burst of logins cannot starve the async workers or exhaust memory.

use std::sync::Arc;

use anyhow::Context;
use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{
        PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString, rand_core::OsRng,
    },
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

fn argon2id() -> anyhow::Result<Argon2<'static>> {
    let params =
        Params::new(19_456, 2, 1, None).map_err(|e| anyhow::anyhow!("argon2 params: {e}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes and verifies passwords, at most `concurrency` at a time.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Verified against when the email is unknown, so that both cases take
    /// the same time.
    decoy_hash: Arc<str>,
}

impl Passwords {
    pub async fn new(concurrency: usize) -> anyhow::Result<Self> {
        let mut passwords = Self {
            permits: Arc::new(Semaphore::new(concurrency)),
            decoy_hash: Arc::from(""),
        };
        let decoy = SecretString::from(uuid::Uuid::new_v4().to_string());
        passwords.decoy_hash = Arc::from(passwords.hash(decoy).await?);
        Ok(passwords)
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
    pub async fn hash(&self, password: SecretString) -> anyhow::Result<String> {
        let _permit = self.permits.acquire().await?;
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon2id()?
                .hash_password(password.expose_secret().as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("hashing: {e}"))
        })
        .await
        .context("hashing task")?
    }

    /// Whether `password` matches `hash`; with no hash (unknown user) it does
    /// the same work against a decoy and answers false.
    pub async fn verify(
        &self,
        password: SecretString,
        hash: Option<String>,
    ) -> anyhow::Result<bool> {
        let _permit = self.permits.acquire().await?;
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.decoy_hash.to_string());
        let matched = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
            let parsed =
                PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
            Ok(argon2id()?
                .verify_password(password.expose_secret().as_bytes(), &parsed)
                .is_ok())
        })
        .await
        .context("verification task")??;
        Ok(known && matched)
    }
}
