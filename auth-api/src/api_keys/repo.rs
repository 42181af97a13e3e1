//! API keys in the auth database: only the hash of each key is stored.

use unhidra_core::{
    api_keys::ApiScopes,
    ids::{ApiKeyId, UserId},
};
use unhidra_store::Database;

/// A key as its owner sees it (never its secret or hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub user: UserId,
    pub name: String,
    pub prefix: String,
    pub scopes: ApiScopes,
    /// Unix milliseconds.
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
}

/// A key about to be stored.
#[derive(Debug, Clone)]
pub struct NewApiKey<'a> {
    pub id: ApiKeyId,
    pub user: UserId,
    pub name: &'a str,
    pub prefix: &'a str,
    pub key_hash: &'a str,
    pub scopes: ApiScopes,
    pub created_at: i64,
    pub expires_at: i64,
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
);
/// A row and the stored hash.
type RowWithHash = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    String,
);

const COLUMNS: &str = "id, user_id, name, prefix, scopes, created_at, expires_at, last_used_at";

fn key_of(row: Row) -> anyhow::Result<ApiKey> {
    let (id, user, name, prefix, scopes, created_at, expires_at, last_used_at) = row;
    Ok(ApiKey {
        id: id.parse()?,
        user: user.parse()?,
        name,
        prefix,
        scopes: ApiScopes::from_names(&scopes)?,
        created_at,
        expires_at,
        last_used_at,
    })
}

#[derive(Clone, Debug)]
pub struct ApiKeyRepo {
    db: Database,
}

impl ApiKeyRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn insert(&self, key: &NewApiKey<'_>) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, scopes, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(key.id.to_string())
        .bind(key.user.to_string())
        .bind(key.name)
        .bind(key.prefix)
        .bind(key.key_hash)
        .bind(key.scopes.to_names())
        .bind(key.created_at)
        .bind(key.expires_at)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// The live key with `prefix` and its stored hash (the caller compares
    /// the hash).
    pub async fn live_by_prefix(
        &self,
        prefix: &str,
        now: i64,
    ) -> anyhow::Result<Option<(ApiKey, String)>> {
        let row: Option<RowWithHash> = sqlx::query_as(&format!(
            "SELECT {COLUMNS}, key_hash FROM api_keys
                 WHERE prefix = $1 AND revoked_at IS NULL AND expires_at > $2"
        ))
        .bind(prefix)
        .bind(now)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some((id, user, name, prefix, scopes, created_at, expires_at, last_used_at, hash)) =
            row
        else {
            return Ok(None);
        };
        let key = key_of((
            id,
            user,
            name,
            prefix,
            scopes,
            created_at,
            expires_at,
            last_used_at,
        ))?;
        Ok(Some((key, hash)))
    }

    /// Records that key `id` was used at `now`.
    pub async fn mark_used(&self, id: ApiKeyId, now: i64) -> anyhow::Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_string())
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// `user`'s keys that are neither revoked nor expired at `now`, oldest
    /// first.
    pub async fn live_of(&self, user: UserId, now: i64) -> anyhow::Result<Vec<ApiKey>> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM api_keys
             WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY id"
        ))
        .bind(user.to_string())
        .bind(now)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter().map(key_of).collect()
    }

    /// `user`'s live key `id`.
    pub async fn live(
        &self,
        user: UserId,
        id: ApiKeyId,
        now: i64,
    ) -> anyhow::Result<Option<ApiKey>> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM api_keys
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL AND expires_at > $3"
        ))
        .bind(id.to_string())
        .bind(user.to_string())
        .bind(now)
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(key_of).transpose()
    }

    /// Ends `user`'s key `id` at `until` (at once when `until` is now);
    /// false when it was not live.
    pub async fn end(
        &self,
        user: UserId,
        id: ApiKeyId,
        now: i64,
        until: i64,
    ) -> anyhow::Result<bool> {
        let ended = if until <= now {
            sqlx::query(
                "UPDATE api_keys SET revoked_at = $1
                 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL AND expires_at > $1",
            )
            .bind(now)
            .bind(id.to_string())
            .bind(user.to_string())
            .execute(&self.db.pool)
            .await?
        } else {
            sqlx::query(
                "UPDATE api_keys SET expires_at = CASE WHEN expires_at < $4 THEN expires_at ELSE $4 END
                 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL AND expires_at > $1",
            )
            .bind(now)
            .bind(id.to_string())
            .bind(user.to_string())
            .bind(until)
            .execute(&self.db.pool)
            .await?
        };
        Ok(ended.rows_affected() == 1)
    }

    /// Revokes every live key of `user`; their ids.
    pub async fn revoke_all(&self, user: UserId, now: i64) -> anyhow::Result<Vec<ApiKeyId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE api_keys SET revoked_at = $1
             WHERE user_id = $2 AND revoked_at IS NULL AND expires_at > $1 RETURNING id",
        )
        .bind(now)
        .bind(user.to_string())
        .fetch_all(&self.db.pool)
        .await?;
        ids.iter().map(|id| Ok(id.parse()?)).collect()
    }
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_core::api_keys::ApiScope;
    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{
        MIGRATIONS, NAME,
        accounts::{AccountRepo, NewUser},
    };

    #[tokio::test]
    async fn keys_live_until_they_expire_or_are_ended() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = Database::connect(db.url(), 2).await?;
            database.migrate(NAME, MIGRATIONS).await?;
            let user = UserId::new();
            AccountRepo::new(database.clone())
                .create_user(&NewUser {
                    id: user,
                    email: "keys@example.com",
                    display_name: "keys",
                    password_hash: "!",
                    role: unhidra_core::users::SystemRole::Member,
                    unverified: false,
                })
                .await?;
            let keys = ApiKeyRepo::new(database);
            let (one, two) = (ApiKeyId::new(), ApiKeyId::new());
            for (id, prefix) in [(one, "aaaaaaaa"), (two, "bbbbbbbb")] {
                keys.insert(&NewApiKey {
                    id,
                    user,
                    name: "bot",
                    prefix,
                    key_hash: &format!("hash-{prefix}"),
                    scopes: ApiScopes::from(vec![ApiScope::Read]),
                    created_at: 1_000,
                    expires_at: 10_000,
                })
                .await?;
            }
            let (found, hash) = keys
                .live_by_prefix("aaaaaaaa", 2_000)
                .await?
                .ok_or_else(|| anyhow::anyhow!("key one"))?;
            assert_eq!((found.id, hash.as_str()), (one, "hash-aaaaaaaa"));
            assert_eq!(
                keys.live(user, one, 3_000)
                    .await?
                    .and_then(|k| k.last_used_at),
                None,
                "looked up is not used"
            );
            keys.mark_used(one, 2_000).await?;
            assert_eq!(
                keys.live(user, one, 3_000)
                    .await?
                    .and_then(|k| k.last_used_at),
                Some(2_000)
            );
            assert!(
                keys.live_by_prefix("aaaaaaaa", 10_000).await?.is_none(),
                "expired"
            );
            assert!(
                keys.live(UserId::new(), one, 3_000).await?.is_none(),
                "not theirs"
            );

            // Ended later (a grace period), never extended; or at once.
            assert!(keys.end(user, one, 3_000, 5_000).await?);
            assert!(keys.live(user, one, 4_999).await?.is_some());
            assert!(keys.live(user, one, 5_000).await?.is_none());
            assert!(keys.end(user, two, 3_000, 20_000).await?);
            assert_eq!(
                keys.live(user, two, 3_000).await?.map(|k| k.expires_at),
                Some(10_000)
            );
            assert!(keys.end(user, two, 3_000, 3_000).await?);
            assert!(
                keys.live_by_prefix("bbbbbbbb", 3_001).await?.is_none(),
                "revoked"
            );
            assert!(!keys.end(user, two, 3_000, 3_000).await?, "once");
            assert_eq!(keys.live_of(user, 3_001).await?.len(), 1);
            assert_eq!(keys.revoke_all(user, 3_002).await?, vec![one]);
            assert_eq!(keys.live_of(user, 3_003).await?, vec![]);
            Ok(())
        })
        .await
    }
}
