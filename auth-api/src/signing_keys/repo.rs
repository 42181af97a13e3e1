//! Signing keys, in the auth database.

use unhidra_store::Database;

/// One stored key of the token algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub kid: String,
    /// 1 for the first key of its algorithm, then one more per rotation.
    pub generation: i64,
    /// PKCS#8 DER, base64.
    pub private_pkcs8: String,
    /// The public key, base64url.
    pub public_x: String,
    /// Unix milliseconds.
    pub created_at: i64,
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
        let rows: Vec<(String, i64, String, String, i64)> = sqlx::query_as(
            "SELECT kid, generation, private_key_pkcs8, public_key, created_at FROM signing_keys
             WHERE algorithm = $1 ORDER BY generation",
        )
        .bind(algorithm)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(kid, generation, private_pkcs8, public_x, created_at)| StoredKey {
                    kid,
                    generation,
                    private_pkcs8,
                    public_x,
                    created_at,
                },
            )
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

    /// Stores a key under its generation; false when that generation (or
    /// the `kid`) is already stored: another replica got there first.
    pub async fn insert(&self, algorithm: &str, key: &StoredKey) -> anyhow::Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO signing_keys
                 (kid, algorithm, generation, private_key_pkcs8, public_key, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&key.kid)
        .bind(algorithm)
        .bind(key.generation)
        .bind(&key.private_pkcs8)
        .bind(&key.public_x)
        .bind(key.created_at)
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Deletes the keys of `algorithm` older than `generation`; how many.
    pub async fn delete_before(&self, algorithm: &str, generation: i64) -> anyhow::Result<u64> {
        Ok(
            sqlx::query("DELETE FROM signing_keys WHERE algorithm = $1 AND generation < $2")
                .bind(algorithm)
                .bind(generation)
                .execute(&self.db.pool)
                .await?
                .rows_affected(),
        )
    }
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{MIGRATIONS, NAME};

    #[tokio::test]
    async fn one_key_per_generation_oldest_first_per_algorithm() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = Database::connect(db.url(), 2).await?;
            database.migrate(NAME, MIGRATIONS).await?;
            let keys = SigningKeyRepo::new(database);
            let key = |kid: &str, generation| StoredKey {
                kid: kid.to_owned(),
                generation,
                private_pkcs8: format!("private-{kid}"),
                public_x: format!("public-{kid}"),
                created_at: 1000 * generation,
            };
            assert_eq!(keys.all("EdDSA").await?, vec![]);
            assert!(keys.insert("EdDSA", &key("k1", 1)).await?);
            assert!(!keys.insert("EdDSA", &key("k1", 2)).await?, "a kid once");
            assert!(
                !keys.insert("EdDSA", &key("k9", 1)).await?,
                "a generation once"
            );
            assert!(keys.insert("EdDSA", &key("k0", 2)).await?);
            assert!(keys.insert("RS256", &key("r1", 1)).await?);
            assert_eq!(keys.all("EdDSA").await?, vec![key("k1", 1), key("k0", 2)]);
            assert_eq!(keys.delete_before("EdDSA", 2).await?, 1);
            assert_eq!(keys.all("EdDSA").await?, vec![key("k0", 2)]);
            assert_eq!(keys.all("RS256").await?, vec![key("r1", 1)]);
            Ok(())
        })
        .await
    }
}
