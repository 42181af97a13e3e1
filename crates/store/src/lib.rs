//! Database access shared by the services: sqlx `Any` pools over SQLite (the
//! embedded default) or Postgres, and per-service migrations applied at start.
//! Services write one SQL dialect that both accept (TEXT ids, BIGINT times in
//! Unix milliseconds, `$n` parameters, `ON CONFLICT`, `RETURNING`); each
//! service keeps that SQL in its repositories, one small type per aggregate.
//! A pool reports its own connection counts as a metric ([`PoolCollector`]).

mod pool_metrics;

use std::{fmt::Write as _, path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use futures::future::BoxFuture;
use sqlx::{
    Any, AnyConnection, AnyPool, Connection, Executor, TransactionManager,
    any::{AnyPoolOptions, install_default_drivers},
    pool::PoolConnection,
};
use tokio::sync::OwnedMutexGuard;

/// Which database a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            anyhow::bail!("unsupported database URL scheme (expected sqlite: or postgres://)")
        }
    }
}

pub use pool_metrics::PoolCollector;

/// A connection pool and the backend behind it.
#[derive(Debug, Clone)]
pub struct Database {
    pub pool: AnyPool,
    pub backend: Backend,
    /// SQLite takes one writer at a time: this process writes through one
    /// connection of its own, outside the pool, and its writers queue here
    /// for it rather than in SQLite's busy handler, which sleeps for
    /// milliseconds at a time. (A pooled connection also costs a round trip
    /// to its worker thread each time it goes back to the pool.) On Postgres
    /// only a clone made by [`Self::with_own_writer`] has one.
    writer: Option<Arc<tokio::sync::Mutex<AnyConnection>>>,
}

/// How transactions begin, commit and roll back on a connection of either
/// database.
type Transactions = <Any as sqlx::Database>::TransactionManager;

/// A connection held for writing: the writer connection (its turn held
/// until dropped), else one from the pool.
enum Held {
    Pooled(PoolConnection<Any>),
    Writer(OwnedMutexGuard<AnyConnection>),
}

impl Held {
    fn conn(&mut self) -> &mut AnyConnection {
        match self {
            Self::Pooled(conn) => conn,
            Self::Writer(conn) => conn,
        }
    }
}

/// A write transaction, rolled back if dropped before it commits. On
/// SQLite it begins `IMMEDIATE`, taking the database's write lock at once:
/// what it reads stays true until it commits, and no other process's writer
/// can make it fail when it comes to write.
pub struct Write {
    held: Held,
    open: bool,
}

impl Write {
    /// The transaction's connection, to run its statements on.
    pub fn conn(&mut self) -> &mut AnyConnection {
        self.held.conn()
    }

    pub async fn commit(mut self) -> sqlx::Result<()> {
        Transactions::commit(self.conn()).await?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Write {
    fn drop(&mut self) {
        if self.open {
            // Queued on the connection, ahead of whatever runs on it next.
            Transactions::start_rollback(self.conn());
        }
    }
}

/// A connection for writes outside a transaction, each statement committing
/// on its own (one round trip, where `BEGIN` and `COMMIT` would add two).
pub struct WriteConnection(Held);

impl WriteConnection {
    pub fn conn(&mut self) -> &mut AnyConnection {
        self.0.conn()
    }
}

/// One schema change of one service, applied once, in version order.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
    /// The one backend the change is for; on the other it is recorded as
    /// applied and not run (its schema differs there by design).
    pub only_on: Option<Backend>,
}

/// The SQLite URL of a service's own database file under `data_dir`.
pub fn sqlite_url(data_dir: &Path, service: &str) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        data_dir.join(format!("{service}.db")).display()
    )
}

/// Whether `error` is the database being too busy to give a connection in
/// time (every pooled connection in use for the whole acquire timeout): a
/// moment's overload, worth a retry, not a fault.
pub fn is_busy(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| matches!(cause.downcast_ref(), Some(sqlx::Error::PoolTimedOut)))
}

impl Database {
    /// Opens a pool; SQLite files (and their directory) are created if missing
    /// and use write-ahead logging.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        install_default_drivers();
        let backend = Backend::of_url(url)?;
        if backend == Backend::Sqlite {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:")
                .split('?')
                .next()
                .unwrap_or_default();
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating data directory {}", dir.display()))?;
            }
        }
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // A SQLite connection is a file handle that does not go stale:
            // no round trip to its worker thread before each use.
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Statement journals (a multi-row statement's undo
                        // within a transaction) stay in memory: on disk they
                        // were a temporary file written and dropped with
                        // every group, as many bytes as the log itself.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000;
                             PRAGMA temp_store = MEMORY;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .context("connecting to the database")?;
        let writer = match backend {
            Backend::Sqlite => {
                let conn = pool.acquire().await.context("connecting to the database")?;
                Some(Arc::new(tokio::sync::Mutex::new(conn.detach())))
            }
            Backend::Postgres => None,
        };
        Ok(Self {
            pool,
            backend,
            writer,
        })
    }

    /// This database with a writer connection of its own, for a task that
    /// writes all the time (the group commit): its transactions then skip
    /// the pool, which on Postgres costs two round trips per use (sqlx pings
    /// a connection when it is taken and again when it is given back). On
    /// SQLite, where the process's writer is shared already, a clone.
    pub async fn with_own_writer(&self) -> sqlx::Result<Self> {
        if self.writer.is_some() {
            return Ok(self.clone());
        }
        let conn = self.pool.acquire().await?.detach();
        Ok(Self {
            writer: Some(Arc::new(tokio::sync::Mutex::new(conn))),
            ..self.clone()
        })
    }

    /// After a failed write: replaces the writer connection with a new one
    /// from the pool if it does not answer within two seconds (the database
    /// restarted, the connection broke), so later writes do not fail with
    /// it. A pooled connection needs none of this: the pool tests it.
    pub async fn mend_writer(&self) {
        let Some(writer) = &self.writer else {
            return;
        };
        let mut conn = writer.lock().await;
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), conn.ping()).await {
            return;
        }
        match self.pool.acquire().await {
            Ok(fresh) => {
                *conn = fresh.detach();
                tracing::warn!("the writer connection was broken; replaced");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the writer connection is broken, and no new one could be opened")
            }
        }
    }

    /// Applies `service`'s migrations that are not applied yet, each in its own
    /// transaction. Safe to run from several replicas at once on Postgres.
    ///
    /// Boxed so callers' futures stay `Send` (rust-lang/rust#100013).
    pub fn migrate<'a>(
        &'a self,
        service: &'a str,
        migrations: &'a [Migration],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.migrate_now(service, migrations))
    }

    async fn migrate_now(&self, service: &str, migrations: &[Migration]) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            // Serialises concurrent migrators (released below, or when the
            // connection closes).
            sqlx::query("SELECT pg_advisory_lock(7325481)")
                .execute(&mut *conn)
                .await?;
        }
        let result = apply(&mut conn, self.backend, service, migrations).await;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_unlock(7325481)")
                .execute(&mut *conn)
                .await?;
        }
        result
    }

    /// Begins a transaction that writes; see [`Write`].
    pub async fn begin_write(&self) -> sqlx::Result<Write> {
        let mut held = self.hold_for_write().await?;
        let begin = match self.backend {
            Backend::Sqlite => Some("BEGIN IMMEDIATE".into()),
            Backend::Postgres => None,
        };
        Transactions::begin(held.conn(), begin).await?;
        Ok(Write { held, open: true })
    }

    /// A connection for writes that need no transaction; see
    /// [`WriteConnection`].
    pub async fn write_connection(&self) -> sqlx::Result<WriteConnection> {
        Ok(WriteConnection(self.hold_for_write().await?))
    }

    async fn hold_for_write(&self) -> sqlx::Result<Held> {
        Ok(match &self.writer {
            Some(writer) => Held::Writer(Arc::clone(writer).lock_owned().await),
            None => Held::Pooled(self.pool.acquire().await?),
        })
    }

    /// Whether the database answers within two seconds, through the pool
    /// and, on SQLite, through the writer connection too (for readiness
    /// checks): a writer that is gone, or held that long, stops every write.
    pub async fn ping(&self) -> bool {
        let ping = async {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            if let Some(writer) = &self.writer {
                sqlx::query("SELECT 1")
                    .execute(&mut *writer.lock().await)
                    .await?;
            }
            Ok::<_, sqlx::Error>(())
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), ping).await,
            Ok(Ok(()))
        )
    }
}

async fn apply(
    conn: &mut AnyConnection,
    backend: Backend,
    service: &str,
    migrations: &[Migration],
) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS unhidra_migrations (
            service TEXT NOT NULL,
            version BIGINT NOT NULL,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL,
            PRIMARY KEY (service, version)
        )",
    )
    .execute(&mut *conn)
    .await
    .context("creating the migrations table")?;
    for migration in migrations {
        let applied: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM unhidra_migrations WHERE service = $1 AND version = $2",
        )
        .bind(service)
        .bind(migration.version)
        .fetch_optional(&mut *conn)
        .await?;
        if applied.is_some() {
            continue;
        }
        // The claim is the transaction's first statement, a write: a second
        // migrator (another replica on the same SQLite file) waits for this
        // one to commit, then finds the claim taken and skips the migration.
        let mut tx = conn.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO unhidra_migrations (service, version, name, applied_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(service)
        .bind(migration.version)
        .bind(migration.name)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            continue;
        }
        if migration.only_on.is_some_and(|only| only != backend) {
            tx.commit().await?;
            tracing::info!(
                service,
                migration = migration.name,
                "migration not for this database, recorded as applied"
            );
            continue;
        }
        tx.execute(migration.sql)
            .await
            .with_context(|| format!("{service} migration {}", migration.name))?;
        tx.commit().await?;
        tracing::info!(service, migration = migration.name, "migration applied");
    }
    Ok(())
}

impl Database {
    /// `count` parameters for `IN (...)`, numbered from `first`: `$3, $4` on
    /// Postgres; on SQLite plain `?`s (bound in order), since SQLite looks
    /// numbered parameters up one by one and a long list costs quadratic time.
    /// A statement that uses these takes every parameter from them, in order.
    pub fn placeholders(&self, first: usize, count: usize) -> String {
        let mut sql = String::with_capacity(count * 4);
        self.push_placeholders(&mut sql, first, count);
        sql
    }

    /// `rows` tuples of `columns` parameters, for a multi-row `VALUES`.
    pub fn value_rows(&self, columns: usize, rows: usize) -> String {
        self.value_rows_from(1, columns, rows)
    }

    /// [`Self::value_rows`], numbered from `first`.
    pub fn value_rows_from(&self, first: usize, columns: usize, rows: usize) -> String {
        let mut sql = String::with_capacity(rows * (columns * 4 + 4));
        for row in 0..rows {
            if row > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            self.push_placeholders(&mut sql, first + row * columns, columns);
            sql.push(')');
        }
        sql
    }

    /// Appends [`Self::placeholders`] to `sql`, written in place: a group's
    /// statements take thousands.
    fn push_placeholders(&self, sql: &mut String, first: usize, count: usize) {
        for n in first..first + count {
            if n > first {
                sql.push_str(", ");
            }
            match self.backend {
                Backend::Postgres => {
                    // Writing to a String cannot fail.
                    let _ = write!(sql, "${n}");
                }
                Backend::Sqlite => sql.push('?'),
            }
        }
    }
}

/// Rows per multi-row statement at most: well under both databases'
/// parameter limits.
pub const MAX_ROWS_PER_STATEMENT: usize = 512;

/// `items` with its last item repeated up to the next power of two, for a
/// statement over a list where a repeated item changes nothing (`IN (...)`,
/// a `VALUES` list joined with or deleted by). Statements over lists then
/// come in a few sizes, each prepared once per connection and found in its
/// statement cache after: preparing a statement of hundreds of parameters
/// costs more than running it, and every group's lists differ in length.
pub fn padded<T>(items: &[T]) -> Vec<&T> {
    let size = items.len().next_power_of_two();
    let last = items.last();
    items
        .iter()
        .chain(std::iter::repeat_n(last, size - items.len()).flatten())
        .collect()
}

/// A query on either database, as `sqlx::query` builds it.
pub type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

impl Database {
    /// Inserts `rows` on `conn` (a [`Write`]'s transaction, or a
    /// [`WriteConnection`] where each statement may commit on its own), up
    /// to [`MAX_ROWS_PER_STATEMENT`] in one statement; `bind` binds one
    /// row's `columns` values in order. Returns how many rows were inserted
    /// (with `ON CONFLICT DO NOTHING` in `suffix`, the new ones).
    ///
    /// Each statement's `VALUES` list is padded (see [`padded`]) with copies
    /// of its last row marked as padding, which the statement leaves out:
    /// `INSERT INTO <into> SELECT column1, .. FROM (VALUES (.., 1), ..,
    /// (.., 0)) AS v WHERE v.column<n> = 1 <suffix>`. So a group of any size
    /// takes one statement (one round trip to the database) and statements
    /// come in a few sizes, each prepared once per connection.
    pub async fn insert_rows<T, F>(
        &self,
        conn: &mut AnyConnection,
        into: &str,
        columns: usize,
        suffix: &str,
        rows: &[T],
        bind: F,
    ) -> anyhow::Result<u64>
    where
        F: for<'q> Fn(AnyQuery<'q>, &'q T) -> anyhow::Result<AnyQuery<'q>>,
    {
        let mut inserted = 0;
        for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
            let sql = self.insert_statement(into, columns, suffix, chunk.len(), 1);
            let query = bind_rows(sqlx::query(&sql), chunk, &bind)?;
            inserted += query.execute(&mut *conn).await?.rows_affected();
        }
        Ok(inserted)
    }

    /// The statement [`Self::insert_rows`] runs for a chunk of `rows` rows
    /// (at most [`MAX_ROWS_PER_STATEMENT`]), its parameters numbered from
    /// `first`; [`bind_rows`] binds them. For a statement that inserts into
    /// two tables at once (on Postgres, as a `WITH` query's parts).
    pub fn insert_statement(
        &self,
        into: &str,
        columns: usize,
        suffix: &str,
        rows: usize,
        first: usize,
    ) -> String {
        let selected = (1..=columns)
            .map(|n| format!("v.column{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        // `WHERE` also tells SQLite that an `ON CONFLICT` in `suffix`
        // belongs to the insert, not to a join.
        format!(
            "INSERT INTO {into} SELECT {selected} FROM (VALUES {}) AS v
             WHERE v.column{} = 1 {suffix}",
            self.value_rows_from(first, columns + 1, rows.next_power_of_two()),
            columns + 1,
        )
    }
}

/// Binds `chunk`'s rows to a statement of [`Database::insert_statement`],
/// padded, `bind` binding one row's values in order: the parameters
/// numbered from its `first` on.
pub fn bind_rows<'q, T, F>(
    mut query: AnyQuery<'q>,
    chunk: &'q [T],
    bind: &F,
) -> anyhow::Result<AnyQuery<'q>>
where
    F: Fn(AnyQuery<'q>, &'q T) -> anyhow::Result<AnyQuery<'q>>,
{
    for (i, row) in padded(chunk).into_iter().enumerate() {
        query = bind(query, row)?.bind(i64::from(i < chunk.len()));
    }
    Ok(query)
}

/// Whether an error is a unique-constraint violation.
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// Whether an error, or one it was caused by, is a unique-constraint
/// violation.
pub fn is_unique_violation_in(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref().is_some_and(is_unique_violation))
}

/// The current time in Unix milliseconds, how every table stores time.
pub fn now_millis() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use unhidra_testkit::TestDatabase;

    use super::*;

    /// The backend process serving the writer connection.
    async fn writer_pid(db: &Database) -> anyhow::Result<i32> {
        let mut write = db.begin_write().await?;
        let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(write.conn())
            .await?;
        write.commit().await?;
        Ok(pid)
    }

    #[tokio::test]
    async fn a_broken_writer_connection_is_replaced() -> anyhow::Result<()> {
        let Some(test_db) = TestDatabase::postgres().await? else {
            return Ok(());
        };
        let db = Database::connect(test_db.url(), 4).await?;
        let own = db.with_own_writer().await?;
        let pid = writer_pid(&own).await?;
        assert_eq!(
            writer_pid(&own).await?,
            pid,
            "the same connection each time"
        );
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&db.pool)
            .await?;
        assert!(
            writer_pid(&own).await.is_err(),
            "a write on the broken connection"
        );
        own.mend_writer().await;
        let replaced = writer_pid(&own).await?;
        assert_ne!(replaced, pid);
        own.mend_writer().await;
        assert_eq!(
            writer_pid(&own).await?,
            replaced,
            "a working connection is kept"
        );
        Ok(())
    }

    #[test]
    fn lists_are_padded_to_a_power_of_two_with_their_last_item() {
        assert_eq!(padded(&[1, 2, 3]), [&1, &2, &3, &3]);
        assert_eq!(padded(&[1, 2, 3, 4]), [&1, &2, &3, &4]);
        assert_eq!(padded(&[7]), [&7]);
        assert!(padded::<u8>(&[]).is_empty());
    }
}
