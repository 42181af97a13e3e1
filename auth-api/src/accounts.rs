//! Users and their sessions, in the auth database. Only hashes of refresh
//! tokens are stored.

use unhidra_core::ids::{SessionId, UserId};
use unhidra_store::{Database, is_unique_violation, now_millis};

/// A new account.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub id: UserId,
    pub email: &'a str,
    pub display_name: &'a str,
    pub password_hash: &'a str,
}

/// What a login checks a password against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: UserId,
    pub password_hash: String,
}

#[derive(Clone, Debug)]
pub struct AccountRepo {
    db: Database,
}

impl AccountRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn email_taken(&self, email: &str) -> anyhow::Result<bool> {
        let existing: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(existing.is_some())
    }

    /// Stores the user; false when the email is taken (the unique index
    /// decides races).
    pub async fn create_user(&self, user: &NewUser<'_>) -> anyhow::Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO users (id, email, display_name, password_hash, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(user.id.to_string())
        .bind(user.email)
        .bind(user.display_name)
        .bind(user.password_hash)
        .bind(now_millis())
        .execute(&self.db.pool)
        .await;
        match inserted {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn credentials(&self, email: &str) -> anyhow::Result<Option<Credentials>> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1")
                .bind(email)
                .fetch_optional(&self.db.pool)
                .await?;
        row.map(|(id, password_hash)| {
            Ok(Credentials {
                user: id.parse()?,
                password_hash,
            })
        })
        .transpose()
    }

    /// Opens a session whose refresh token hashes to `refresh_hash`, valid
    /// for `ttl_ms`.
    pub async fn open_session(
        &self,
        session: SessionId,
        user: UserId,
        refresh_hash: &str,
        ttl_ms: i64,
    ) -> anyhow::Result<()> {
        let now = now_millis();
        sqlx::query(
            "INSERT INTO sessions (id, user_id, refresh_token_hash, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(session.to_string())
        .bind(user.to_string())
        .bind(refresh_hash)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Replaces the refresh token of the live session holding `old_hash`, in
    /// one statement, so a refresh token works exactly once. `None` when no
    /// live session holds it.
    pub async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new_hash: &str,
    ) -> anyhow::Result<Option<(SessionId, UserId)>> {
        let row: Option<(String, String)> = sqlx::query_as(
            "UPDATE sessions SET refresh_token_hash = $1
             WHERE refresh_token_hash = $2 AND revoked_at IS NULL AND expires_at > $3
             RETURNING id, user_id",
        )
        .bind(new_hash)
        .bind(old_hash)
        .bind(now_millis())
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|(session, user)| Ok((session.parse()?, user.parse()?)))
            .transpose()
    }
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{MIGRATIONS, NAME};

    async fn open(url: &str) -> anyhow::Result<AccountRepo> {
        let database = Database::connect(url, 2).await?;
        database.migrate(NAME, MIGRATIONS).await?;
        Ok(AccountRepo::new(database))
    }

    #[tokio::test]
    async fn users_are_unique_by_email_and_credentials_read_back() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let accounts = open(db.url()).await?;
            let email = "o'brien@example.com";
            let user = NewUser {
                id: UserId::new(),
                email,
                display_name: "'); DROP TABLE users; --",
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
            };
            assert!(!accounts.email_taken(email).await?);
            assert!(accounts.create_user(&user).await?);
            assert!(accounts.email_taken(email).await?);
            let again = NewUser {
                id: UserId::new(),
                ..user.clone()
            };
            assert!(!accounts.create_user(&again).await?, "email taken");
            assert_eq!(
                accounts.credentials(email).await?,
                Some(Credentials {
                    user: user.id,
                    password_hash: user.password_hash.to_owned()
                })
            );
            assert_eq!(accounts.credentials("nobody@example.com").await?, None);
            Ok(())
        })
        .await
    }

    #[tokio::test]
    async fn a_refresh_token_rotates_once_and_never_after_expiry() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let accounts = open(db.url()).await?;
            let user = UserId::new();
            accounts
                .create_user(&NewUser {
                    id: user,
                    email: "ann@example.com",
                    display_name: "ann",
                    password_hash: "x",
                })
                .await?;
            let session = SessionId::new();
            accounts.open_session(session, user, "h1", 60_000).await?;
            assert_eq!(
                accounts.rotate_refresh_token("h1", "h2").await?,
                Some((session, user))
            );
            assert_eq!(accounts.rotate_refresh_token("h1", "h3").await?, None);
            assert_eq!(
                accounts.rotate_refresh_token("h2", "h3").await?,
                Some((session, user))
            );

            let expired = SessionId::new();
            accounts.open_session(expired, user, "old", -1).await?;
            assert_eq!(accounts.rotate_refresh_token("old", "new").await?, None);
            Ok(())
        })
        .await
    }
}
