//! Login sessions in the auth database. A session holds the hash of its
//! current refresh token; the hashes it held before are kept as retired, so
//! that a refresh token used twice is recognised and its whole session
//! revoked (a stolen token and its rightful owner cannot both go on).

use unhidra_core::ids::{DeviceId, SessionId, UserId};
use unhidra_store::{Database, now_millis};

use crate::accounts::{Standing, standing};

/// A live session, as its user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: SessionId,
    /// Unix milliseconds.
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// It was the session's current token; the new one replaces it.
    Rotated { session: SessionId, user: UserId },
    /// It had been used already: the session is revoked now.
    Reused { session: SessionId, user: UserId },
    /// Unknown, expired or revoked.
    Refused,
}

#[derive(Clone, Debug)]
pub struct SessionRepo {
    db: Database,
}

impl SessionRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Opens a session (on `device`, if given) whose refresh token hashes
    /// to `refresh_hash`, valid for `ttl_ms`.
    pub async fn open(
        &self,
        session: SessionId,
        user: UserId,
        device: Option<DeviceId>,
        refresh_hash: &str,
        ttl_ms: i64,
    ) -> anyhow::Result<()> {
        let now = now_millis();
        sqlx::query(
            "INSERT INTO sessions (id, user_id, device_id, refresh_token_hash, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(session.to_string())
        .bind(user.to_string())
        .bind(device.map(|d| d.to_string()))
        .bind(refresh_hash)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// The device a session was opened on, if any.
    pub async fn device_of(&self, session: SessionId) -> anyhow::Result<Option<DeviceId>> {
        let device: Option<Option<String>> =
            sqlx::query_scalar("SELECT device_id FROM sessions WHERE id = $1")
                .bind(session.to_string())
                .fetch_optional(&self.db.pool)
                .await?;
        Ok(device.flatten().map(|d| d.parse()).transpose()?)
    }

    /// Revokes every live session of `user` opened on `device`.
    pub async fn revoke_device(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> anyhow::Result<Vec<SessionId>> {
        let revoked: Vec<(String,)> = sqlx::query_as(
            "UPDATE sessions SET revoked_at = $1
             WHERE user_id = $2 AND device_id = $3 AND revoked_at IS NULL
             RETURNING id",
        )
        .bind(now_millis())
        .bind(user.to_string())
        .bind(device.to_string())
        .fetch_all(&self.db.pool)
        .await?;
        revoked.into_iter().map(|(id,)| Ok(id.parse()?)).collect()
    }

    /// The user of the live session whose current refresh token hashes to
    /// `hash`, and what that user may do now.
    pub async fn owner(&self, hash: &str) -> anyhow::Result<Option<(UserId, Standing)>> {
        let row: Option<(String, String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT u.id, u.role, u.disabled_at, u.unverified_since
             FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.refresh_token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > $2",
        )
        .bind(hash)
        .bind(now_millis())
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|(id, role, disabled_at, unverified)| {
            Ok((id.parse()?, standing(&role, disabled_at, unverified)?))
        })
        .transpose()
    }

    /// Presents the refresh token hashing to `old_hash`: rotates it to
    /// `new_hash` if it is its session's current token, revokes the session
    /// if it was used before. One transaction, writing first.
    pub async fn rotate(&self, old_hash: &str, new_hash: &str) -> anyhow::Result<Rotation> {
        let now = now_millis();
        let mut write = self.db.begin_write().await?;
        let rotated: Option<(String, String)> = sqlx::query_as(
            "UPDATE sessions SET refresh_token_hash = $1, last_used_at = $3
             WHERE refresh_token_hash = $2 AND revoked_at IS NULL AND expires_at > $3
             RETURNING id, user_id",
        )
        .bind(new_hash)
        .bind(old_hash)
        .bind(now)
        .fetch_optional(write.conn())
        .await?;
        if let Some((session, user)) = rotated {
            sqlx::query(
                "INSERT INTO retired_refresh_tokens (hash, session_id, retired_at)
                 VALUES ($1, $2, $3)",
            )
            .bind(old_hash)
            .bind(&session)
            .bind(now)
            .execute(write.conn())
            .await?;
            write.commit().await?;
            return Ok(Rotation::Rotated {
                session: session.parse()?,
                user: user.parse()?,
            });
        }
        let reused: Option<(String, String)> = sqlx::query_as(
            "UPDATE sessions SET revoked_at = $2
             WHERE revoked_at IS NULL
               AND id = (SELECT session_id FROM retired_refresh_tokens WHERE hash = $1)
             RETURNING id, user_id",
        )
        .bind(old_hash)
        .bind(now)
        .fetch_optional(write.conn())
        .await?;
        write.commit().await?;
        Ok(match reused {
            Some((session, user)) => Rotation::Reused {
                session: session.parse()?,
                user: user.parse()?,
            },
            None => Rotation::Refused,
        })
    }

    /// Revokes `session` if it is a live session of `user`; whether it was.
    pub async fn revoke(&self, user: UserId, session: SessionId) -> anyhow::Result<bool> {
        let revoked = sqlx::query(
            "UPDATE sessions SET revoked_at = $1
             WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
        )
        .bind(now_millis())
        .bind(session.to_string())
        .bind(user.to_string())
        .execute(&self.db.pool)
        .await?;
        Ok(revoked.rows_affected() == 1)
    }

    /// Revokes every live session of `user`; the ones it revoked.
    pub async fn revoke_all(&self, user: UserId) -> anyhow::Result<Vec<SessionId>> {
        self.revoke_all_but(user, None).await
    }

    /// Revokes every live session of `user` except `keep`; the ones it
    /// revoked.
    pub async fn revoke_all_but(
        &self,
        user: UserId,
        keep: Option<SessionId>,
    ) -> anyhow::Result<Vec<SessionId>> {
        let revoked: Vec<(String,)> = sqlx::query_as(
            "UPDATE sessions SET revoked_at = $1
             WHERE user_id = $2 AND revoked_at IS NULL AND expires_at > $1 AND id <> $3
             RETURNING id",
        )
        .bind(now_millis())
        .bind(user.to_string())
        .bind(keep.map(|k| k.to_string()).unwrap_or_default())
        .fetch_all(&self.db.pool)
        .await?;
        revoked.into_iter().map(|(id,)| Ok(id.parse()?)).collect()
    }

    /// Sessions revoked since `since_ms` (Unix milliseconds), with their
    /// user and when they were revoked.
    pub async fn revoked_since(
        &self,
        since_ms: i64,
    ) -> anyhow::Result<Vec<(SessionId, UserId, i64)>> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT id, user_id, revoked_at FROM sessions WHERE revoked_at > $1")
                .bind(since_ms)
                .fetch_all(&self.db.pool)
                .await?;
        rows.into_iter()
            .map(|(id, user, at)| Ok((id.parse()?, user.parse()?, at)))
            .collect()
    }

    /// The live sessions of `user`, newest first.
    pub async fn live(&self, user: UserId) -> anyhow::Result<Vec<SessionInfo>> {
        let rows: Vec<(String, i64, i64, Option<i64>)> = sqlx::query_as(
            "SELECT id, created_at, expires_at, last_used_at FROM sessions
             WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2
             ORDER BY created_at DESC, id DESC",
        )
        .bind(user.to_string())
        .bind(now_millis())
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter()
            .map(|(id, created_at, expires_at, last_used_at)| {
                Ok(SessionInfo {
                    id: id.parse()?,
                    created_at,
                    expires_at,
                    last_used_at,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::accounts::conformance::with_ann;

    async fn open(url: &str) -> anyhow::Result<(SessionRepo, UserId)> {
        let (database, user) = with_ann(url).await?;
        Ok((SessionRepo::new(database), user))
    }

    #[tokio::test]
    async fn a_refresh_token_rotates_once_and_a_reused_one_revokes_its_session()
    -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let (sessions, user) = open(db.url()).await?;
            let session = SessionId::new();
            sessions.open(session, user, None, "h1", 60_000).await?;
            assert!(sessions.owner("h1").await?.is_some());
            assert_eq!(
                sessions.rotate("h1", "h2").await?,
                Rotation::Rotated { session, user }
            );
            assert_eq!(
                sessions.rotate("h2", "h3").await?,
                Rotation::Rotated { session, user }
            );
            // h1 again: a thief or the owner, one of them has h3. Revoked.
            assert_eq!(
                sessions.rotate("h1", "h4").await?,
                Rotation::Reused { session, user }
            );
            assert_eq!(sessions.rotate("h3", "h5").await?, Rotation::Refused);
            assert_eq!(sessions.owner("h3").await?, None);
            assert_eq!(
                sessions.rotate("h2", "h6").await?,
                Rotation::Refused,
                "once"
            );
            assert_eq!(sessions.rotate("nothing", "h7").await?, Rotation::Refused);

            let expired = SessionId::new();
            sessions.open(expired, user, None, "old", -1).await?;
            assert_eq!(sessions.rotate("old", "new").await?, Rotation::Refused);
            Ok(())
        })
        .await
    }

    #[tokio::test]
    async fn sessions_are_listed_and_revoked_by_their_user_only() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let (sessions, user) = open(db.url()).await?;
            let (first, second, third) = (SessionId::new(), SessionId::new(), SessionId::new());
            for (id, hash) in [(first, "a"), (second, "b"), (third, "c")] {
                sessions.open(id, user, None, hash, 60_000).await?;
            }
            let listed: Vec<SessionId> = sessions.live(user).await?.iter().map(|s| s.id).collect();
            assert_eq!(listed.len(), 3);
            assert!(!sessions.revoke(UserId::new(), first).await?, "not theirs");
            assert!(sessions.revoke(user, first).await?);
            assert!(!sessions.revoke(user, first).await?, "already revoked");
            assert_eq!(sessions.owner("a").await?, None);
            assert_eq!(
                sessions.revoke_all_but(user, Some(second)).await?,
                vec![third],
                "all but the one kept"
            );
            assert_eq!(sessions.revoke_all(user).await?, vec![second]);
            let phone = DeviceId::new();
            let on_phone = SessionId::new();
            sessions
                .open(on_phone, user, Some(phone), "p", 60_000)
                .await?;
            assert_eq!(sessions.device_of(on_phone).await?, Some(phone));
            assert_eq!(sessions.revoke_device(UserId::new(), phone).await?, vec![]);
            assert_eq!(sessions.revoke_device(user, phone).await?, vec![on_phone]);
            assert!(sessions.live(user).await?.is_empty());
            let revoked = sessions.revoked_since(0).await?;
            assert_eq!(revoked.len(), 4);
            assert!(revoked.iter().all(|(_, u, _)| *u == user));
            assert!(
                sessions
                    .revoked_since(now_millis() + 1000)
                    .await?
                    .is_empty()
            );
            Ok(())
        })
        .await
    }
}
