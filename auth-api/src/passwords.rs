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
pub const MAX_PASSWORD_CHARS: usize = 128;

/// Common and breached passwords, refused whatever their case.
const COMMON: &str = include_str!("../data/common-passwords.txt");

/// The password policy of registration, password change and reset: 8 to
/// 128 characters, not a common or breached password, not one character
/// repeated, not the account's own email. Each refusal has its own code.
pub fn check_policy(password: &SecretString, email: &str) -> Result<(), ApiError> {
    let password = password.expose_secret();
    let chars = password.chars().count();
    let refuse = |code, message: String| Err(ApiError::Unacceptable { code, message });
    if chars < MIN_PASSWORD_CHARS {
        return refuse(
            "password_too_short",
            format!("a password needs at least {MIN_PASSWORD_CHARS} characters"),
        );
    }
    if chars > MAX_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return refuse(
            "password_too_long",
            format!("a password has at most {MAX_PASSWORD_CHARS} characters"),
        );
    }
    let lower = password.to_lowercase();
    let local_part = email.split('@').next().unwrap_or_default();
    let repeated = password.chars().all(|c| password.starts_with(c));
    let common = COMMON
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|l| l == lower);
    if common || repeated || lower == email || lower == local_part {
        return refuse(
            "password_too_common",
            "this password is too common or too easy to guess; choose another".to_owned(),
        );
    }
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn code(password: &str) -> Option<&'static str> {
        check_policy(
            &SecretString::from(password.to_owned()),
            "ann.smith@example.com",
        )
        .err()
        .map(|e| e.code())
    }

    #[test]
    fn the_policy_refuses_short_long_common_and_guessable_passwords() {
        assert_eq!(code("correct horse battery"), None);
        assert_eq!(code("short"), Some("password_too_short"));
        assert_eq!(code(&"x".repeat(129)), Some("password_too_long"));
        assert_eq!(code(&"éa".repeat(64)), None, "128 characters, 192 bytes");
        for guessable in [
            "Password123",
            "QWERTYUIOP",
            "iloveyou",
            "zzzzzzzzzz",
            "ann.smith",
            "ANN.SMITH@example.com",
        ] {
            assert_eq!(code(guessable), Some("password_too_common"), "{guessable}");
        }
    }
}
