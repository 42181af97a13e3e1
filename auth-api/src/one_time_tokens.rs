//! One-time tokens (password resets and email verifications sent by mail,
//! the second step of an MFA login): 256 random bits, stored as SHA-256 in a
//! table per kind, each valid for a while and used once.

use std::time::Duration;

use unhidra_core::{clock::SharedClock, ids::UserId};
use unhidra_store::Database;

pub use crate::sessions::{hash_refresh_token as hash_token, new_refresh_token as new_token};

/// One kind of one-time token, in its own table.
#[derive(Clone, Debug)]
pub struct OneTimeTokenRepo {
    db: Database,
    clock: SharedClock,
    table: &'static str,
    ttl: Duration,
}

impl OneTimeTokenRepo {
    /// Password resets: 15 minutes.
    pub fn password_resets(db: Database, clock: SharedClock) -> Self {
        Self {
            db,
            clock,
            table: "password_resets",
            ttl: Duration::from_secs(15 * 60),
        }
    }

    /// The second step of a login with MFA: five minutes.
    pub fn mfa_challenges(db: Database, clock: SharedClock) -> Self {
        Self {
            db,
            clock,
            table: "mfa_challenges",
            ttl: Duration::from_secs(5 * 60),
        }
    }

    /// Email verifications: a day.
    pub fn email_verifications(db: Database, clock: SharedClock) -> Self {
        Self {
            db,
            clock,
            table: "email_verifications",
            ttl: Duration::from_secs(24 * 3600),
        }
    }

    pub async fn create(&self, user: UserId, token_hash: &str) -> anyhow::Result<()> {
        let now = self.clock.now_millis();
        let ttl = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let insert = format!(
            "INSERT INTO {} (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
            self.table
        );
        sqlx::query(&insert)
            .bind(token_hash)
            .bind(user.to_string())
            .bind(now)
            .bind(now.saturating_add(ttl))
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// The user a live, unused token belongs to, without using it.
    pub async fn peek(&self, token_hash: &str) -> anyhow::Result<Option<UserId>> {
        let select = format!(
            "SELECT user_id FROM {} WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2",
            self.table
        );
        let user: Option<String> = sqlx::query_scalar(&select)
            .bind(token_hash)
            .bind(self.clock.now_millis())
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(user.map(|u| u.parse()).transpose()?)
    }

    /// Uses the token up; its user, if it was live and unused (in one
    /// statement, so a token works once even when raced).
    pub async fn redeem(&self, token_hash: &str) -> anyhow::Result<Option<UserId>> {
        let now = self.clock.now_millis();
        let update = format!(
            "UPDATE {} SET used_at = $1
             WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1
             RETURNING user_id",
            self.table
        );
        let user: Option<String> = sqlx::query_scalar(&update)
            .bind(now)
            .bind(token_hash)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(user.map(|u| u.parse()).transpose()?)
    }
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use std::sync::Arc;

    use unhidra_core::clock::ManualClock;
    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::accounts::conformance::with_ann;

    #[tokio::test]
    async fn a_one_time_token_works_once_and_only_while_fresh() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let (database, user) = with_ann(db.url()).await?;
            let clock = Arc::new(ManualClock::starting_at(Duration::from_secs(1_800_000_000)));
            let resets = OneTimeTokenRepo::password_resets(database.clone(), clock.clone());
            resets.create(user, "fresh").await?;
            assert_eq!(resets.peek("fresh").await?, Some(user));
            assert_eq!(
                resets.peek("fresh").await?,
                Some(user),
                "peeking uses nothing"
            );
            assert_eq!(resets.redeem("fresh").await?, Some(user));
            assert_eq!(resets.redeem("fresh").await?, None, "once");
            assert_eq!(resets.peek("fresh").await?, None);

            resets.create(user, "stale").await?;
            clock.advance(Duration::from_secs(15 * 60 - 1));
            assert_eq!(resets.peek("stale").await?, Some(user), "15 minutes");
            clock.advance(Duration::from_secs(1));
            assert_eq!(resets.peek("stale").await?, None);
            assert_eq!(resets.redeem("stale").await?, None, "expired");
            assert_eq!(resets.redeem("unknown").await?, None);
            Ok(())
        })
        .await
    }
}
