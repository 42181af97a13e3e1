//! TOTP secrets and recovery codes in the auth database. A secret is
//! pending until confirmed with a first code; each code step is accepted
//! once (`last_step` only grows), each recovery code once.

use unhidra_core::ids::UserId;
use unhidra_store::{Database, now_millis};

/// A user's TOTP secret (base32) and whether it is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totp {
    pub secret: String,
    pub confirmed: bool,
}

#[derive(Clone, Debug)]
pub struct MfaRepo {
    db: Database,
}

impl MfaRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Stores a pending secret for `user`, replacing a pending one; false
    /// when TOTP is already in force (it must be disabled first).
    pub async fn enrol(&self, user: UserId, secret: &str) -> anyhow::Result<bool> {
        let mut write = self.db.begin_write().await?;
        sqlx::query("DELETE FROM totp WHERE user_id = $1 AND confirmed_at IS NULL")
            .bind(user.to_string())
            .execute(write.conn())
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO totp (user_id, secret) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(user.to_string())
        .bind(secret)
        .execute(write.conn())
        .await?;
        write.commit().await?;
        Ok(inserted.rows_affected() == 1)
    }

    pub async fn totp(&self, user: UserId) -> anyhow::Result<Option<Totp>> {
        let row: Option<(String, Option<i64>)> =
            sqlx::query_as("SELECT secret, confirmed_at FROM totp WHERE user_id = $1")
                .bind(user.to_string())
                .fetch_optional(&self.db.pool)
                .await?;
        Ok(row.map(|(secret, confirmed_at)| Totp {
            secret,
            confirmed: confirmed_at.is_some(),
        }))
    }

    /// Puts the pending secret in force, with the step of the code that
    /// confirmed it (used up) and the hashes of the recovery codes.
    pub async fn confirm(
        &self,
        user: UserId,
        step: i64,
        recovery_hashes: &[String],
    ) -> anyhow::Result<bool> {
        let mut write = self.db.begin_write().await?;
        let confirmed = sqlx::query(
            "UPDATE totp SET confirmed_at = $1, last_step = $2
             WHERE user_id = $3 AND confirmed_at IS NULL",
        )
        .bind(now_millis())
        .bind(step)
        .bind(user.to_string())
        .execute(write.conn())
        .await?;
        if confirmed.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(user.to_string())
            .execute(write.conn())
            .await?;
        for hash in recovery_hashes {
            sqlx::query("INSERT INTO recovery_codes (code_hash, user_id) VALUES ($1, $2)")
                .bind(hash)
                .bind(user.to_string())
                .execute(write.conn())
                .await?;
        }
        write.commit().await?;
        Ok(true)
    }

    /// Uses up a code step: true once per step, and only for steps after
    /// the last one used.
    pub async fn use_step(&self, user: UserId, step: i64) -> anyhow::Result<bool> {
        let used = sqlx::query(
            "UPDATE totp SET last_step = $1
             WHERE user_id = $2 AND confirmed_at IS NOT NULL AND last_step < $1",
        )
        .bind(step)
        .bind(user.to_string())
        .execute(&self.db.pool)
        .await?;
        Ok(used.rows_affected() == 1)
    }

    /// Uses up a recovery code: true once.
    pub async fn use_recovery_code(&self, user: UserId, hash: &str) -> anyhow::Result<bool> {
        let used = sqlx::query(
            "UPDATE recovery_codes SET used_at = $1
             WHERE code_hash = $2 AND user_id = $3 AND used_at IS NULL",
        )
        .bind(now_millis())
        .bind(hash)
        .bind(user.to_string())
        .execute(&self.db.pool)
        .await?;
        Ok(used.rows_affected() == 1)
    }

    /// Removes TOTP and the recovery codes of `user`.
    pub async fn disable(&self, user: UserId) -> anyhow::Result<()> {
        let mut write = self.db.begin_write().await?;
        for table in ["recovery_codes", "totp"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE user_id = $1"))
                .bind(user.to_string())
                .execute(write.conn())
                .await?;
        }
        write.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::accounts::conformance::with_ann;

    #[tokio::test]
    async fn steps_and_recovery_codes_are_used_once() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let (database, user) = with_ann(db.url()).await?;
            let mfa = MfaRepo::new(database);
            assert!(mfa.enrol(user, "FIRST").await?);
            assert!(
                mfa.enrol(user, "SECOND").await?,
                "a pending secret is replaced"
            );
            assert_eq!(
                mfa.totp(user).await?,
                Some(Totp {
                    secret: "SECOND".into(),
                    confirmed: false
                })
            );
            assert!(!mfa.use_step(user, 5).await?, "not in force yet");
            assert!(mfa.confirm(user, 10, &["r1".into(), "r2".into()]).await?);
            assert!(!mfa.confirm(user, 11, &[]).await?, "confirmed once");
            assert!(!mfa.enrol(user, "THIRD").await?, "in force: disable first");
            assert!(
                !mfa.use_step(user, 10).await?,
                "the confirming step is used"
            );
            assert!(mfa.use_step(user, 11).await?);
            assert!(!mfa.use_step(user, 11).await?, "once");
            assert!(!mfa.use_step(user, 9).await?, "never backwards");
            assert!(mfa.use_recovery_code(user, "r1").await?);
            assert!(!mfa.use_recovery_code(user, "r1").await?, "once");
            assert!(
                !mfa.use_recovery_code(UserId::new(), "r2").await?,
                "not theirs"
            );
            mfa.disable(user).await?;
            assert_eq!(mfa.totp(user).await?, None);
            assert!(!mfa.use_recovery_code(user, "r2").await?, "gone with it");
            Ok(())
        })
        .await
    }
}
