//! Token signing keys: Ed25519, generated at first start and kept in the auth
//! database (sealed with `UNHIDRA_SIGNING_KEY_SECRET` when it is set),
//! published as a JWKS (`kid` = RFC 7638 thumbprint, `alg`, `use`).
//!
//! Access tokens are signed with the newest key. Rotation adds a key of the
//! next generation; the one it replaces stays published (and verifying) for
//! [`SigningKeys::keep_for`] after that, long enough for the last token it
//! signed to expire, and is then deleted. Each generation is stored once, so
//! replicas starting (or rotating) together make one key, and every replica
//! reloads the keys every [`RELOAD_EVERY`] to follow a rotation made elsewhere.

mod repo;
mod sealed;

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::{
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair},
};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use unhidra_core::{
    clock::SharedClock,
    token::{AccessClaims, JWT_ALG, Jwk, Jwks},
};
use unhidra_runtime::ServiceContext;

pub use self::repo::{SigningKeyRepo, StoredKey};

/// How often each replica reloads the keys from the database.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// The keys of one moment: the one that signs, and every published one.
struct KeySet {
    kid: String,
    encoding: EncodingKey,
    jwks: Jwks,
}

/// The signing keys, shared by the handlers of one replica.
#[derive(Clone)]
pub struct SigningKeys {
    store: Arc<Store>,
    current: Arc<RwLock<Arc<KeySet>>>,
}

impl SigningKeys {
    /// Loads the stored keys, generating the first one if there is none;
    /// with a `secret`, new keys are sealed and keys stored as they are get
    /// sealed now. A replaced key stays published for `keep_for`.
    pub async fn load_or_create(
        repo: SigningKeyRepo,
        secret: Option<&secrecy::SecretString>,
        clock: SharedClock,
        keep_for: Duration,
    ) -> anyhow::Result<Self> {
        let sealer = secret.map(sealed::Sealer::from_secret).transpose()?;
        let store = Store {
            repo,
            sealer,
            clock,
            keep_for,
        };
        if store.repo.all(JWT_ALG).await?.is_empty() && store.add_generation(1).await? {
            tracing::info!("generated the first signing key");
        }
        let set = store.load().await?;
        Ok(Self {
            store: Arc::new(store),
            current: Arc::new(RwLock::new(Arc::new(set))),
        })
    }

    /// How long a replaced key stays published.
    pub fn keep_for(&self) -> Duration {
        self.store.keep_for
    }

    /// Adds a new key that signs from now on; its `kid`. A rotation made at
    /// the same moment by another replica counts as this one.
    pub async fn rotate(&self) -> anyhow::Result<String> {
        let newest = self
            .store
            .repo
            .all(JWT_ALG)
            .await?
            .last()
            .map_or(0, |k| k.generation);
        if self.store.add_generation(newest + 1).await? {
            tracing::info!(generation = newest + 1, "signing key rotated");
        }
        self.reload().await?;
        Ok(self.signing_kid())
    }

    /// Reads the keys again (to follow a rotation made by another replica,
    /// and to retire replaced keys).
    pub async fn reload(&self) -> anyhow::Result<()> {
        let set = self.store.load().await?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(())
    }

    pub fn sign(&self, claims: &AccessClaims) -> anyhow::Result<String> {
        let set = self.set();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(set.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &set.encoding)?)
    }

    /// Every published key.
    pub fn jwks(&self) -> Jwks {
        self.set().jwks.clone()
    }

    /// The `kid` new tokens carry.
    pub fn signing_kid(&self) -> String {
        self.set().kid.clone()
    }

    fn set(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Where the keys are kept and how they are sealed.
struct Store {
    repo: SigningKeyRepo,
    sealer: Option<sealed::Sealer>,
    clock: SharedClock,
    keep_for: Duration,
}

impl Store {
    /// The stored keys: the newest signs, keys replaced longer than
    /// `keep_for` ago are deleted, and keys stored as they are get sealed
    /// when a secret is set.
    async fn load(&self) -> anyhow::Result<KeySet> {
        let mut keys = self.repo.all(JWT_ALG).await?;
        if let Some(sealer) = &self.sealer {
            for key in keys
                .iter_mut()
                .filter(|k| !sealed::is_sealed(&k.private_pkcs8))
            {
                let sealed = sealer.seal(&key.kid, &key.private_pkcs8)?;
                self.repo
                    .reseal(&key.kid, &key.private_pkcs8, &sealed)
                    .await?;
                key.private_pkcs8 = sealed;
                tracing::info!(kid = %key.kid, "signing key sealed");
            }
        }
        let now = self.clock.now_millis();
        let keep_ms = i64::try_from(self.keep_for.as_millis()).unwrap_or(i64::MAX);
        // A key is published until its successor is `keep_for` old.
        let first_kept = keys
            .windows(2)
            .position(|pair| pair[1].created_at.saturating_add(keep_ms) > now)
            .unwrap_or(keys.len().saturating_sub(1));
        if first_kept > 0 {
            let retired = self
                .repo
                .delete_before(JWT_ALG, keys[first_kept].generation)
                .await?;
            tracing::info!(retired, "replaced signing keys deleted");
            keys.drain(..first_kept);
        }
        let newest = keys.last().context("no signing key stored")?;
        let der = sealed::unseal(self.sealer.as_ref(), &newest.kid, &newest.private_pkcs8)?;
        let der = STANDARD.decode(der).context("stored signing key")?;
        Ok(KeySet {
            kid: newest.kid.clone(),
            encoding: EncodingKey::from_ed_der(&der),
            jwks: Jwks {
                keys: keys
                    .iter()
                    .map(|key| jwk(&key.kid, &key.public_x))
                    .collect(),
            },
        })
    }

    /// Generates and stores a key of `generation`; false when another
    /// replica stored that generation first.
    async fn add_generation(&self, generation: i64) -> anyhow::Result<bool> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("generating an Ed25519 key"))?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("reading the generated key"))?;
        let public_x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        let kid = thumbprint(&public_x);
        let der = STANDARD.encode(pkcs8.as_ref());
        let private_pkcs8 = match &self.sealer {
            Some(sealer) => sealer.seal(&kid, &der)?,
            None => der,
        };
        let key = StoredKey {
            kid,
            generation,
            private_pkcs8,
            public_x,
            created_at: self.clock.now_millis(),
        };
        self.repo.insert(JWT_ALG, &key).await
    }
}

/// Reloads `keys` every [`RELOAD_EVERY`] until shutdown, announcing them
/// when they changed.
pub fn spawn_reloads(ctx: &ServiceContext, keys: SigningKeys) -> JoinHandle<()> {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RELOAD_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                _ = every.tick() => {
                    let before = keys.jwks();
                    match keys.reload().await {
                        Ok(()) if keys.jwks() != before => announce(&ctx, &keys).await,
                        Ok(()) => {}
                        Err(e) => tracing::warn!(error = %e, "signing keys not reloaded; signing with the ones loaded before"),
                    }
                }
            }
        }
    })
}

/// Tells every process that verifies tokens about the published keys (this
/// one at once, whatever the bus does).
pub async fn announce(ctx: &ServiceContext, keys: &SigningKeys) {
    let jwks = keys.jwks();
    ctx.verifier.install_keys(&jwks);
    let subject = ctx.subjects.signing_keys_changed();
    if let Err(e) = ctx.announce(&subject, &jwks).await {
        tracing::warn!(error = %e, "signing keys not announced; verifiers fetch them within a minute");
    }
}

fn jwk(kid: &str, x: &str) -> Jwk {
    Jwk {
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x: x.to_owned(),
        kid: kid.to_owned(),
        alg: JWT_ALG.into(),
        use_: "sig".into(),
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
    use unhidra_core::clock::{ManualClock, SystemClock};
    use unhidra_store::Database;
    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{MIGRATIONS, NAME};

    const KEEP: Duration = Duration::from_secs(600);

    fn secret(byte: u8) -> SecretString {
        SecretString::from(STANDARD.encode([byte; 32]))
    }

    async fn migrated(url: &str) -> anyhow::Result<Database> {
        let database = Database::connect(url, 4).await?;
        database.migrate(NAME, MIGRATIONS).await?;
        Ok(database)
    }

    async fn load(
        database: &Database,
        secret: Option<&SecretString>,
        clock: SharedClock,
    ) -> anyhow::Result<SigningKeys> {
        SigningKeys::load_or_create(SigningKeyRepo::new(database.clone()), secret, clock, KEEP)
            .await
    }

    #[tokio::test]
    async fn keys_are_sealed_with_the_secret_and_refuse_to_load_without_it() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = migrated(db.url()).await?;
            let clock: SharedClock = Arc::new(SystemClock);
            let stored = || async {
                let value: String =
                    sqlx::query_scalar("SELECT private_key_pkcs8 FROM signing_keys")
                        .fetch_one(&database.pool)
                        .await?;
                anyhow::Ok(value)
            };

            // Without a secret, a key kept as is; with one, the same key sealed.
            let plain = load(&database, None, clock.clone()).await?;
            let clear = stored().await?;
            assert!(!clear.starts_with("xc20p1:"));
            let sealed = load(&database, Some(&secret(7)), clock.clone()).await?;
            assert!(stored().await?.starts_with("xc20p1:"), "sealed at start");
            assert_eq!(plain.jwks(), sealed.jwks(), "the same key");
            assert!(
                !stored()
                    .await?
                    .contains(&STANDARD.encode([0x30_u8, 0x2e, 0x02, 0x01])),
                "no DER in the clear"
            );
            let again = load(&database, Some(&secret(7)), clock.clone()).await?;
            assert_eq!(again.jwks(), sealed.jwks());

            let refused = load(&database, None, clock.clone()).await.err();
            assert!(
                refused.is_some_and(|e| e.to_string().contains("UNHIDRA_SIGNING_KEY_SECRET")),
                "a sealed key needs the secret"
            );
            assert!(
                load(&database, Some(&secret(8)), clock).await.is_err(),
                "another secret opens nothing"
            );
            Ok(())
        })
        .await
    }

    #[tokio::test]
    async fn replicas_starting_together_publish_one_key() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = migrated(db.url()).await?;
            let clock: SharedClock = Arc::new(SystemClock);
            let replicas = tokio::try_join!(
                load(&database, None, clock.clone()),
                load(&database, None, clock.clone()),
                load(&database, None, clock.clone()),
                load(&database, None, clock.clone()),
            )?;
            let replicas = [replicas.0, replicas.1, replicas.2, replicas.3];
            let first = replicas[0].jwks();
            assert_eq!(first.keys.len(), 1, "{first:?}");
            for replica in &replicas {
                assert_eq!(replica.jwks(), first);
                assert_eq!(replica.signing_kid(), first.keys[0].kid);
            }
            Ok(())
        })
        .await
    }

    #[tokio::test]
    async fn a_rotated_key_signs_and_the_replaced_one_is_published_until_its_tokens_expire()
    -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = migrated(db.url()).await?;
            let clock = Arc::new(ManualClock::starting_at(Duration::from_secs(1_800_000_000)));
            let one = load(&database, Some(&secret(3)), clock.clone()).await?;
            let other = load(&database, Some(&secret(3)), clock.clone()).await?;
            let old = one.signing_kid();

            clock.advance(Duration::from_secs(5));
            let new = one.rotate().await?;
            assert_ne!(new, old);
            let kids = |keys: &SigningKeys| -> Vec<String> {
                keys.jwks().keys.into_iter().map(|k| k.kid).collect()
            };
            assert_eq!(kids(&one), vec![old.clone(), new.clone()]);
            assert_eq!(other.signing_kid(), old, "until it reloads");
            other.reload().await?;
            assert_eq!(other.signing_kid(), new);
            assert_eq!(kids(&other), kids(&one));

            // Published until the new key is `KEEP` old, then deleted.
            clock.advance(KEEP - Duration::from_secs(1));
            one.reload().await?;
            assert_eq!(kids(&one), vec![old.clone(), new.clone()]);
            clock.advance(Duration::from_secs(1));
            one.reload().await?;
            assert_eq!(kids(&one), vec![new.clone()]);
            let stored: Vec<String> = sqlx::query_scalar("SELECT kid FROM signing_keys")
                .fetch_all(&database.pool)
                .await?;
            assert_eq!(stored, vec![new.clone()]);

            // Replicas rotating from the same key make one new key: the
            // generation is stored once.
            assert!(one.store.add_generation(3).await?);
            assert!(!other.store.add_generation(3).await?);
            other.reload().await?;
            assert_eq!(kids(&other).len(), 2);
            Ok(())
        })
        .await
    }
}
