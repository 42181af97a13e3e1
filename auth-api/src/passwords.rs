//! Password hashing: argon2id with the OWASP parameters (m = 19456 KiB, t = 2,
//! p = 1), computed on the blocking pool with a bounded number in flight, a
//! bounded queue and a bounded wait (then 503 with `Retry-After`), so a
//! burst of logins neither starves the async workers, nor grows memory, nor
//! stalls other endpoints.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{
        PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString, rand_core::OsRng,
    },
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use unhidra_core::Config;
use unhidra_runtime::ApiError;

/// Bounds the work an attacker can make argon2 do per request.
pub const MAX_PASSWORD_BYTES: usize = 1024;
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Refuses a password too long to be worth hashing, before any work.
pub fn check_length(password: &SecretString) -> Result<(), ApiError> {
    if password.expose_secret().len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::Invalid(format!(
            "password must be at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

fn argon2id() -> anyhow::Result<Argon2<'static>> {
    let params =
        Params::new(19_456, 2, 1, None).map_err(|e| anyhow::anyhow!("argon2 params: {e}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes and verifies passwords, at most `password_hash_concurrency` at a
/// time.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit, at most `max_waiting`.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    max_wait: Duration,
    /// Verified against when the email is unknown, so that both cases take
    /// the same time.
    decoy_hash: Arc<str>,
}

impl Passwords {
    pub async fn new(config: &Config) -> anyhow::Result<Self> {
        let mut passwords = Self {
            permits: Arc::new(Semaphore::new(config.password_hash_concurrency)),
            waiting: Arc::default(),
            max_waiting: config.password_hash_queue,
            max_wait: Duration::from_millis(config.password_hash_wait_ms),
            decoy_hash: Arc::from(""),
        };
        let decoy = SecretString::from(uuid::Uuid::new_v4().to_string());
        passwords.decoy_hash = Arc::from(passwords.hash(decoy).await?);
        Ok(passwords)
    }

    /// A hashing slot, after a bounded wait in a bounded queue.
    async fn permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(permit);
        }
        let busy = || ApiError::Overloaded {
            message: "too many password checks at once; retry shortly".to_owned(),
            retry_after: Duration::from_secs(1),
        };
        let waiting = Waiting::join(&self.waiting);
        if waiting.ahead >= self.max_waiting {
            tracing::warn!(waiting = waiting.ahead, "password hashing queue full");
            return Err(busy());
        }
        match tokio::time::timeout(self.max_wait, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(closed)) => Err(ApiError::Unexpected(closed.into())),
            Err(_) => {
                tracing::warn!(wait = ?self.max_wait, "no password hashing slot in time");
                Err(busy())
            }
        }
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
    pub async fn hash(&self, password: SecretString) -> Result<String, ApiError> {
        let _permit = self.permit().await?;
        let hashed = tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon2id()?
                .hash_password(password.expose_secret().as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("hashing: {e}"))
        })
        .await
        .context("hashing task")??;
        Ok(hashed)
    }

    /// Whether `password` matches `hash`; with no hash (unknown user) it does
    /// the same work against a decoy and answers false.
    pub async fn verify(
        &self,
        password: SecretString,
        hash: Option<String>,
    ) -> Result<bool, ApiError> {
        let _permit = self.permit().await?;
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

/// A place in the hashing queue, given up when dropped.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    /// How many were waiting before this one.
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn join(count: &'a AtomicUsize) -> Self {
        let ahead = count.fetch_add(1, Ordering::SeqCst);
        Self { count, ahead }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}
