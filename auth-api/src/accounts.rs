//! Users in the auth database: credentials, system role, lockout state.

use unhidra_core::{ids::UserId, users::SystemRole};
use unhidra_store::{Database, is_unique_violation, now_millis};

/// A new account.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub id: UserId,
    pub email: &'a str,
    pub display_name: &'a str,
    pub password_hash: &'a str,
    pub role: SystemRole,
    /// Registered while email verification is required: no login until the
    /// mailed link is followed.
    pub unverified: bool,
}

/// What an account may do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub role: SystemRole,
    /// Disabled by an admin: no login, no refresh.
    pub disabled: bool,
    /// Its email is still to be confirmed: no login.
    pub unverified: bool,
}

/// What a login checks a password against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: UserId,
    pub password_hash: String,
    /// Unix milliseconds until which the account is locked, if it was.
    pub locked_until: Option<i64>,
    pub standing: Standing,
}

/// An account as its owner and admins see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub id: UserId,
    pub email: String,
    pub display_name: String,
    pub role: SystemRole,
    /// Unix milliseconds.
    pub created_at: i64,
    pub disabled_at: Option<i64>,
    pub deletion_requested_at: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct ProfileRow {
    id: String,
    email: String,
    display_name: String,
    role: String,
    created_at: i64,
    disabled_at: Option<i64>,
    deletion_requested_at: Option<i64>,
}

impl TryFrom<ProfileRow> for Profile {
    type Error = anyhow::Error;

    fn try_from(row: ProfileRow) -> anyhow::Result<Self> {
        Ok(Self {
            id: row.id.parse()?,
            email: row.email,
            display_name: row.display_name,
            role: row.role.parse()?,
            created_at: row.created_at,
            disabled_at: row.disabled_at,
            deletion_requested_at: row.deletion_requested_at,
        })
    }
}

const PROFILE_COLUMNS: &str =
    "id, email, display_name, role, created_at, disabled_at, deletion_requested_at";

#[derive(sqlx::FromRow)]
struct CredentialsRow {
    id: String,
    password_hash: String,
    locked_until: Option<i64>,
    role: String,
    disabled_at: Option<i64>,
    unverified_since: Option<i64>,
}

pub fn standing(
    role: &str,
    disabled_at: Option<i64>,
    unverified_since: Option<i64>,
) -> anyhow::Result<Standing> {
    Ok(Standing {
        role: role.parse()?,
        disabled: disabled_at.is_some(),
        unverified: unverified_since.is_some(),
    })
}

impl Credentials {
    /// How long the account stays locked, if it is locked at `now_ms`.
    pub fn locked_for(&self, now_ms: i64) -> Option<std::time::Duration> {
        let left = self.locked_until?.checked_sub(now_ms)?;
        (left > 0).then(|| std::time::Duration::from_millis(left.unsigned_abs()))
    }
}

/// How failed logins lock an account: `failures` in a row lock it for
/// `first_ms`, doubled for each lock since its last successful login, up to
/// `max_ms`.
#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    pub failures: u32,
    pub first_ms: i64,
    pub max_ms: i64,
}

impl LockoutPolicy {
    fn lock_ms(&self, previous_locks: i64) -> i64 {
        let doublings = u32::try_from(previous_locks.clamp(0, 30)).unwrap_or(30);
        self.first_ms
            .saturating_mul(1_i64 << doublings)
            .min(self.max_ms)
    }
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
        let now = now_millis();
        let inserted = sqlx::query(
            "INSERT INTO users (id, email, display_name, password_hash, role, created_at, unverified_since)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(user.id.to_string())
        .bind(user.email)
        .bind(user.display_name)
        .bind(user.password_hash)
        .bind(user.role.as_str())
        .bind(now)
        .bind(user.unverified.then_some(now))
        .execute(&self.db.pool)
        .await;
        match inserted {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn credentials(&self, email: &str) -> anyhow::Result<Option<Credentials>> {
        let row: Option<CredentialsRow> = sqlx::query_as(
            "SELECT id, password_hash, locked_until, role, disabled_at, unverified_since
             FROM users WHERE email = $1",
        )
        .bind(email)
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|row| {
            Ok(Credentials {
                user: row.id.parse()?,
                password_hash: row.password_hash,
                locked_until: row.locked_until,
                standing: standing(&row.role, row.disabled_at, row.unverified_since)?,
            })
        })
        .transpose()
    }

    /// The email and password hash of `user`, if there is such a user.
    pub async fn password_of(&self, user: UserId) -> anyhow::Result<Option<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT email, password_hash FROM users WHERE id = $1")
                .bind(user.to_string())
                .fetch_optional(&self.db.pool)
                .await?,
        )
    }

    pub async fn set_password(&self, user: UserId, password_hash: &str) -> anyhow::Result<bool> {
        let updated = sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(password_hash)
            .bind(user.to_string())
            .execute(&self.db.pool)
            .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// The profile of `user`, unless there is none or it was deleted.
    pub async fn profile(&self, user: UserId) -> anyhow::Result<Option<Profile>> {
        let query =
            format!("SELECT {PROFILE_COLUMNS} FROM users WHERE id = $1 AND deleted_at IS NULL");
        let row: Option<ProfileRow> = sqlx::query_as(&query)
            .bind(user.to_string())
            .fetch_optional(&self.db.pool)
            .await?;
        row.map(Profile::try_from).transpose()
    }

    /// Accounts (deleted ones left out) whose email or display name
    /// contains `search` (any case), by id, after `after`, at most `limit`.
    pub async fn list(
        &self,
        search: &str,
        after: Option<UserId>,
        limit: u32,
    ) -> anyhow::Result<Vec<Profile>> {
        // LIKE with the user's text as a literal: its wildcards escaped.
        let pattern = format!(
            "%{}%",
            search
                .to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let query = format!(
            "SELECT {PROFILE_COLUMNS} FROM users
             WHERE deleted_at IS NULL AND id > $1
               AND (LOWER(email) LIKE $2 ESCAPE '\\' OR LOWER(display_name) LIKE $2 ESCAPE '\\')
             ORDER BY id LIMIT $3"
        );
        let rows: Vec<ProfileRow> = sqlx::query_as(&query)
            .bind(after.map(|a| a.to_string()).unwrap_or_default())
            .bind(pattern)
            .bind(i64::from(limit))
            .fetch_all(&self.db.pool)
            .await?;
        rows.into_iter().map(Profile::try_from).collect()
    }

    pub async fn set_display_name(&self, user: UserId, name: &str) -> anyhow::Result<bool> {
        let updated =
            sqlx::query("UPDATE users SET display_name = $1 WHERE id = $2 AND deleted_at IS NULL")
                .bind(name)
                .bind(user.to_string())
                .execute(&self.db.pool)
                .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Records that `user` asked for their account to be deleted (an admin
    /// carries it out); the time asked, kept from the first request.
    pub async fn request_deletion(&self, user: UserId) -> anyhow::Result<Option<i64>> {
        let at: Option<i64> = sqlx::query_scalar(
            "UPDATE users SET deletion_requested_at = COALESCE(deletion_requested_at, $1)
             WHERE id = $2 AND deleted_at IS NULL RETURNING deletion_requested_at",
        )
        .bind(now_millis())
        .bind(user.to_string())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(at)
    }

    /// Deletes `user`: the email, name and password are erased (the email
    /// is free again), the account can never log in, and its id stays so
    /// that what it sent keeps a sender. False when there is no such user.
    pub async fn delete(&self, user: UserId) -> anyhow::Result<bool> {
        let now = now_millis();
        let deleted = sqlx::query(
            "UPDATE users SET email = $1, display_name = 'deleted user', password_hash = '!',
                 role = 'guest', disabled_at = $2, deleted_at = $2
             WHERE id = $3 AND deleted_at IS NULL",
        )
        .bind(format!("deleted-{user}@deleted.invalid"))
        .bind(now)
        .bind(user.to_string())
        .execute(&self.db.pool)
        .await?;
        Ok(deleted.rows_affected() == 1)
    }

    /// What `user` may do now, if there is such a user.
    pub async fn standing(&self, user: UserId) -> anyhow::Result<Option<Standing>> {
        let row: Option<(String, Option<i64>, Option<i64>)> =
            sqlx::query_as("SELECT role, disabled_at, unverified_since FROM users WHERE id = $1")
                .bind(user.to_string())
                .fetch_optional(&self.db.pool)
                .await?;
        row.map(|(role, disabled_at, unverified)| standing(&role, disabled_at, unverified))
            .transpose()
    }

    /// Marks `user`'s email as confirmed.
    pub async fn verify_email(&self, user: UserId) -> anyhow::Result<()> {
        sqlx::query("UPDATE users SET unverified_since = NULL WHERE id = $1")
            .bind(user.to_string())
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Gives `user` the system role `role`; false when there is no such user.
    pub async fn set_role(&self, user: UserId, role: SystemRole) -> anyhow::Result<bool> {
        let updated = sqlx::query("UPDATE users SET role = $1 WHERE id = $2")
            .bind(role.as_str())
            .bind(user.to_string())
            .execute(&self.db.pool)
            .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Disables (or enables again) `user`; false when there is no such user.
    pub async fn set_disabled(&self, user: UserId, disabled: bool) -> anyhow::Result<bool> {
        let updated = sqlx::query("UPDATE users SET disabled_at = $1 WHERE id = $2")
            .bind(disabled.then(now_millis))
            .bind(user.to_string())
            .execute(&self.db.pool)
            .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Makes the account with `email` an admin; its id, if there is one.
    pub async fn promote(&self, email: &str) -> anyhow::Result<Option<UserId>> {
        let id: Option<String> =
            sqlx::query_scalar("UPDATE users SET role = $1 WHERE email = $2 RETURNING id")
                .bind(SystemRole::Admin.as_str())
                .bind(email)
                .fetch_optional(&self.db.pool)
                .await?;
        Ok(id.map(|id| id.parse()).transpose()?)
    }

    /// Counts a failed login; when it completes `policy.failures` in a row,
    /// locks the account and answers until when. Atomic per statement, so
    /// two auth-api replicas cannot both lock (or both miss) the account.
    pub async fn record_failure(
        &self,
        user: UserId,
        policy: LockoutPolicy,
        now_ms: i64,
    ) -> anyhow::Result<Option<i64>> {
        let counted: Option<(i64, i64)> = sqlx::query_as(
            "UPDATE users SET failed_logins = failed_logins + 1 WHERE id = $1
             RETURNING CAST(failed_logins AS BIGINT), CAST(lockouts AS BIGINT)",
        )
        .bind(user.to_string())
        .fetch_optional(&self.db.pool)
        .await?;
        let Some((failures, locks)) = counted else {
            return Ok(None);
        };
        if policy.failures == 0 || failures < i64::from(policy.failures) {
            return Ok(None);
        }
        let until = now_ms.saturating_add(policy.lock_ms(locks));
        let locked = sqlx::query(
            "UPDATE users SET failed_logins = 0, lockouts = lockouts + 1, locked_until = $1
             WHERE id = $2 AND failed_logins >= $3",
        )
        .bind(until)
        .bind(user.to_string())
        .bind(i64::from(policy.failures))
        .execute(&self.db.pool)
        .await?;
        Ok((locked.rows_affected() == 1).then_some(until))
    }

    /// A successful login: the failure count and the lock history start over.
    pub async fn record_success(&self, user: UserId) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE users SET failed_logins = 0, lockouts = 0, locked_until = NULL
             WHERE id = $1 AND (failed_logins <> 0 OR lockouts <> 0 OR locked_until IS NOT NULL)",
        )
        .bind(user.to_string())
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{MIGRATIONS, NAME};

    async fn open(url: &str) -> anyhow::Result<AccountRepo> {
        let database = Database::connect(url, 2).await?;
        database.migrate(NAME, MIGRATIONS).await?;
        Ok(AccountRepo::new(database))
    }

    /// A migrated auth database holding one member, `ann@example.com`: what
    /// the session and mailed-token suites start from.
    pub(crate) async fn with_ann(url: &str) -> anyhow::Result<(Database, UserId)> {
        let database = Database::connect(url, 2).await?;
        database.migrate(NAME, MIGRATIONS).await?;
        let user = UserId::new();
        AccountRepo::new(database.clone())
            .create_user(&NewUser {
                id: user,
                email: "ann@example.com",
                display_name: "ann",
                password_hash: "x",
                role: SystemRole::Member,
                unverified: false,
            })
            .await?;
        Ok((database, user))
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
                role: SystemRole::Member,
                unverified: false,
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
                    password_hash: user.password_hash.to_owned(),
                    locked_until: None,
                    standing: Standing {
                        role: SystemRole::Member,
                        disabled: false,
                        unverified: false,
                    },
                })
            );
            assert_eq!(accounts.credentials("nobody@example.com").await?, None);

            // Roles and disabling, as a login and a refresh read them.
            assert_eq!(accounts.promote(email).await?, Some(user.id));
            assert!(accounts.set_disabled(user.id, true).await?);
            let standing = accounts.credentials(email).await?.map(|c| c.standing);
            assert_eq!(
                standing,
                Some(Standing {
                    role: SystemRole::Admin,
                    disabled: true,
                    unverified: false,
                })
            );
            assert!(accounts.set_role(user.id, SystemRole::Guest).await?);
            assert!(accounts.set_disabled(user.id, false).await?);
            assert_eq!(
                accounts.standing(user.id).await?,
                Some(Standing {
                    role: SystemRole::Guest,
                    disabled: false,
                    unverified: false,
                })
            );
            assert!(!accounts.set_role(UserId::new(), SystemRole::Admin).await?);

            // Profiles, search (wildcards are literal), deletion.
            let profile = accounts
                .profile(user.id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("profile"))?;
            assert_eq!(
                (profile.email.as_str(), profile.role),
                (email, SystemRole::Guest)
            );
            assert!(accounts.set_display_name(user.id, "Conan O'Brien").await?);
            let found = accounts.list("o'BRIEN", None, 10).await?;
            assert_eq!(
                found.iter().map(|p| p.id).collect::<Vec<_>>(),
                vec![user.id]
            );
            assert!(
                accounts.list("%", None, 10).await?.is_empty(),
                "% is literal"
            );
            assert_eq!(accounts.list("", Some(user.id), 10).await?, vec![]);
            let asked = accounts.request_deletion(user.id).await?;
            assert!(asked.is_some());
            assert_eq!(
                accounts.request_deletion(user.id).await?,
                asked,
                "the first request counts"
            );
            assert!(accounts.delete(user.id).await?);
            assert!(!accounts.delete(user.id).await?, "once");
            assert_eq!(accounts.profile(user.id).await?, None);
            assert_eq!(
                accounts.credentials(email).await?,
                None,
                "the email is free"
            );
            assert!(accounts.list("", None, 10).await?.is_empty());
            assert_eq!(accounts.promote("nobody@example.com").await?, None);
            Ok(())
        })
        .await
    }

    #[tokio::test]
    async fn failed_logins_in_a_row_lock_with_growing_times() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let (database, user) = with_ann(db.url()).await?;
            let accounts = AccountRepo::new(database);
            let policy = LockoutPolicy {
                failures: 3,
                first_ms: 60_000,
                max_ms: 150_000,
            };
            let now = 1_000_000;
            let mut locks = Vec::new();
            for _ in 0..9 {
                locks.push(accounts.record_failure(user, policy, now).await?);
            }
            assert_eq!(
                locks,
                [
                    None,
                    None,
                    Some(now + 60_000),
                    None,
                    None,
                    Some(now + 120_000),
                    None,
                    None,
                    Some(now + 150_000)
                ],
                "3 in a row lock, each lock twice as long, up to the maximum"
            );
            let locked = accounts.credentials("ann@example.com").await?;
            assert_eq!(locked.and_then(|c| c.locked_until), Some(now + 150_000));
            accounts.record_success(user).await?;
            let unlocked = accounts.credentials("ann@example.com").await?;
            assert_eq!(unlocked.and_then(|c| c.locked_until), None);
            for _ in 0..2 {
                assert_eq!(accounts.record_failure(user, policy, now).await?, None);
            }
            assert_eq!(
                accounts.record_failure(user, policy, now).await?,
                Some(now + 60_000),
                "a success starts the lock times over"
            );
            Ok(())
        })
        .await
    }
}
