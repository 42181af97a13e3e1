//! Signing keys, in the auth database.

use unhidra_store::{Database, now_millis};

/// One stored key of the token algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub kid: String,
    /// PKCS#8 DER, base64.
    pub private_pkcs8: String,
    /// The public key, base64url.
    pub public_x: String,
}

#[derive(Clone, Debug)]
pub struct SigningKeyRepo {
    db: Database,
}

impl SigningKeyRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The keys of `algorithm`, oldest first.
    pub async fn all(&self, algorithm: &str) -> anyhow::Result<Vec<StoredKey>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT kid, private_key_pkcs8, public_key FROM signing_keys
             WHERE algorithm = $1 ORDER BY created_at, kid",
        )
        .bind(algorithm)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(kid, private_pkcs8, public_x)| StoredKey {
                kid,
                private_pkcs8,
                public_x,
            })
            .collect())
    }

    /// Replaces a key's stored private part, if it is still `was` (another
    /// replica may have sealed it meanwhile).
    pub async fn reseal(&self, kid: &str, was: &str, sealed: &str) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE signing_keys SET private_key_pkcs8 = $1 WHERE kid = $2 AND private_key_pkcs8 = $3",
        )
        .bind(sealed)
        .bind(kid)
        .bind(was)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Stores a key; false when its `kid` is already stored.
    pub async fn insert(&self, algorithm: &str, key: &StoredKey) -> anyhow::Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO signing_keys (kid, algorithm, private_key_pkcs8, public_key, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&key.kid)
        .bind(algorithm)
        .bind(&key.private_pkcs8)
        .bind(&key.public_x)
        .bind(now_millis())
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{MIGRATIONS, NAME};

    #[tokio::test]
    async fn keys_are_kept_once_each_oldest_first_per_algorithm() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = Database::connect(db.url(), 2).await?;
            database.migrate(NAME, MIGRATIONS).await?;
            let keys = SigningKeyRepo::new(database);
            let key = |kid: &str| StoredKey {
                kid: kid.to_owned(),
                private_pkcs8: format!("private-{kid}"),
                public_x: format!("public-{kid}"),
            };
            assert_eq!(keys.all("EdDSA").await?, vec![]);
            assert!(keys.insert("EdDSA", &key("k1")).await?);
            assert!(!keys.insert("EdDSA", &key("k1")).await?);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert!(keys.insert("EdDSA", &key("k0")).await?);
            assert!(keys.insert("RS256", &key("r1")).await?);
            assert_eq!(keys.all("EdDSA").await?, vec![key("k1"), key("k0")]);
            Ok(())
        })
        .await
    }
}
