//! Signing keys at rest: XChaCha20-Poly1305 under `UNHIDRA_SIGNING_KEY_SECRET`,
//! a random 24-byte nonce per key, the `kid` as associated data (a sealed key
//! cannot be moved to another row). Stored as `xc20p1:<base64(nonce ‖
//! ciphertext)>`; a stored value without that prefix is a key kept as is.

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD};
use chacha20poly1305::{
    Key, XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};

const PREFIX: &str = "xc20p1:";
const NONCE_BYTES: usize = 24;

/// The cipher of `UNHIDRA_SIGNING_KEY_SECRET`.
pub struct Sealer(XChaCha20Poly1305);

impl Sealer {
    pub fn from_secret(secret: &SecretString) -> anyhow::Result<Self> {
        let bytes = STANDARD
            .decode(secret.expose_secret().trim())
            .context("signing_key_secret is not base64")?;
        if bytes.len() != 32 {
            anyhow::bail!("signing_key_secret must be 32 bytes (base64 of `openssl rand 32`)");
        }
        Ok(Self(XChaCha20Poly1305::new(Key::from_slice(&bytes))))
    }

    /// `pkcs8` (the key's base64 DER) sealed for the row of `kid`.
    pub fn seal(&self, kid: &str, pkcs8: &str) -> anyhow::Result<String> {
        let mut nonce = [0_u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: pkcs8.as_bytes(),
                    aad: kid.as_bytes(),
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing the signing key"))?;
        Ok(format!(
            "{PREFIX}{}",
            STANDARD.encode([nonce.as_slice(), &sealed].concat())
        ))
    }

    fn open(&self, kid: &str, sealed: &str) -> anyhow::Result<String> {
        let bytes = STANDARD.decode(sealed).context("sealed signing key")?;
        if bytes.len() <= NONCE_BYTES {
            anyhow::bail!("sealed signing key {kid} is truncated");
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        let plain = self
            .0
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: kid.as_bytes(),
                },
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "signing key {kid} does not open with UNHIDRA_SIGNING_KEY_SECRET (another secret, or a tampered row)"
                )
            })?;
        Ok(String::from_utf8(plain)?)
    }
}

/// Whether a stored value is sealed.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

/// The key's base64 DER from its stored value.
pub fn unseal(sealer: Option<&Sealer>, kid: &str, stored: &str) -> anyhow::Result<String> {
    match (stored.strip_prefix(PREFIX), sealer) {
        (Some(sealed), Some(sealer)) => sealer.open(kid, sealed),
        (Some(_), None) => anyhow::bail!(
            "signing key {kid} is encrypted: set UNHIDRA_SIGNING_KEY_SECRET to the secret it was sealed with"
        ),
        (None, _) => Ok(stored.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> anyhow::Result<Sealer> {
        Sealer::from_secret(&SecretString::from(STANDARD.encode([byte; 32])))
    }

    #[test]
    fn sealed_keys_open_with_their_secret_and_kid_only() -> anyhow::Result<()> {
        let (right, wrong) = (sealer(1)?, sealer(2)?);
        let sealed = right.seal("kid-1", "MC4CAQAwBQYDK2VwBCIEI")?;
        assert!(is_sealed(&sealed) && !sealed.contains("MC4CAQAw"));
        assert_eq!(
            unseal(Some(&right), "kid-1", &sealed)?,
            "MC4CAQAwBQYDK2VwBCIEI"
        );
        assert!(
            unseal(Some(&wrong), "kid-1", &sealed).is_err(),
            "another secret"
        );
        assert!(
            unseal(Some(&right), "kid-2", &sealed).is_err(),
            "another row"
        );
        assert!(unseal(None, "kid-1", &sealed).is_err(), "no secret");
        assert_eq!(unseal(None, "kid-1", "plain")?, "plain", "kept as is");
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push('A');
        assert!(unseal(Some(&right), "kid-1", &tampered).is_err());
        assert!(Sealer::from_secret(&SecretString::from("c2hvcnQ=".to_owned())).is_err());
        Ok(())
    }
}
