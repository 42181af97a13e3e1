//! The migration runner and the shared SQL dialect, on SQLite and Postgres.

use unhidra_store::{Backend, Database, Migration, is_unique_violation};
use unhidra_testkit::TestDatabase;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "notes",
        sql: "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT NOT NULL, at BIGINT NOT NULL);",
        only_on: None,
    },
    Migration {
        version: 2,
        name: "notes_index",
        sql: "CREATE INDEX notes_at ON notes (at); ALTER TABLE notes ADD COLUMN author TEXT;",
        only_on: None,
    },
    Migration {
        version: 3,
        name: "sqlite_only",
        sql: "CREATE TABLE embedded_notes (id INTEGER PRIMARY KEY);",
        only_on: Some(Backend::Sqlite),
    },
];

async fn exercise(db: &Database) -> anyhow::Result<()> {
    db.migrate("notes-service", MIGRATIONS).await?;
    // Applying again is a no-op, as at every restart.
    db.migrate("notes-service", MIGRATIONS).await?;
    let applied: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM unhidra_migrations WHERE service = $1 ORDER BY version",
    )
    .bind("notes-service")
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(applied, vec![1, 2, 3]);
    // A migration for the other backend is recorded, not run.
    let sqlite_only = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM embedded_notes")
        .fetch_one(&db.pool)
        .await;
    assert_eq!(
        sqlite_only.is_ok(),
        db.backend == Backend::Sqlite,
        "{sqlite_only:?}"
    );

    let hostile = "'); DROP TABLE notes; --";
    sqlx::query("INSERT INTO notes (id, body, at, author) VALUES ($1, $2, $3, NULL)")
        .bind("n1")
        .bind(hostile)
        .bind(i64::MAX)
        .execute(&db.pool)
        .await?;
    let duplicate = sqlx::query("INSERT INTO notes (id, body, at) VALUES ($1, $2, $3)")
        .bind("n1")
        .bind("again")
        .bind(1_i64)
        .execute(&db.pool)
        .await
        .err();
    assert!(
        duplicate.as_ref().is_some_and(is_unique_violation),
        "{duplicate:?}"
    );
    let inserted =
        sqlx::query("INSERT INTO notes (id, body, at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind("n1")
            .bind("again")
            .bind(1_i64)
            .execute(&db.pool)
            .await?
            .rows_affected();
    assert_eq!(inserted, 0);
    let (body, at): (String, i64) = sqlx::query_as("SELECT body, at FROM notes WHERE id = $1")
        .bind("n1")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!((body.as_str(), at), (hostile, i64::MAX));
    assert!(db.ping().await);
    Ok(())
}

#[tokio::test]
async fn migrations_and_dialect_on_sqlite() -> anyhow::Result<()> {
    let db = TestDatabase::sqlite().await?;
    exercise(&Database::connect(db.url(), 2).await?).await
}

#[tokio::test]
async fn migrations_and_dialect_on_postgres() -> anyhow::Result<()> {
    let Some(db) = TestDatabase::postgres().await? else {
        return Ok(());
    };
    exercise(&Database::connect(db.url(), 2).await?).await
}

#[tokio::test]
async fn concurrent_migrators_on_postgres_apply_once() -> anyhow::Result<()> {
    let Some(db) = TestDatabase::postgres().await? else {
        return Ok(());
    };
    let a = Database::connect(db.url(), 2).await?;
    let b = Database::connect(db.url(), 2).await?;
    let (ra, rb) = tokio::join!(
        a.migrate("notes-service", MIGRATIONS),
        b.migrate("notes-service", MIGRATIONS)
    );
    ra?;
    rb?;
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM unhidra_migrations")
        .fetch_one(&a.pool)
        .await?;
    assert_eq!(count, i64::try_from(MIGRATIONS.len())?);
    Ok(())
}

#[tokio::test]
async fn concurrent_migrators_on_one_sqlite_file_apply_once() -> anyhow::Result<()> {
    for _ in 0..10 {
        let db = TestDatabase::sqlite().await?;
        let mut migrators = Vec::new();
        for _ in 0..4 {
            let database = Database::connect(db.url(), 1).await?;
            migrators.push(tokio::spawn(async move {
                database.migrate("notes-service", MIGRATIONS).await?;
                anyhow::Ok(database)
            }));
        }
        let mut last = None;
        for migrator in migrators {
            last = Some(migrator.await??);
        }
        let database = last.ok_or_else(|| anyhow::anyhow!("no migrator"))?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM unhidra_migrations")
            .fetch_one(&database.pool)
            .await?;
        assert_eq!(count, i64::try_from(MIGRATIONS.len())?);
    }
    Ok(())
}

#[tokio::test]
async fn generated_parameter_lists_bind_in_order_on_both_databases() -> anyhow::Result<()> {
    unhidra_testkit::on_each_database(|db| async move {
        let database = Database::connect(db.url(), 1).await?;
        database.migrate("notes-service", MIGRATIONS).await?;
        let sql = format!(
            "INSERT INTO notes (id, body, at) VALUES {}",
            database.value_rows(3, 3)
        );
        let mut insert = sqlx::query(&sql);
        for i in 0..3_i64 {
            insert = insert
                .bind(format!("n{i}"))
                .bind(format!("body {i}"))
                .bind(i);
        }
        insert.execute(&database.pool).await?;
        let sql = format!(
            "SELECT body FROM notes WHERE id IN ({}) AND at < {}",
            database.placeholders(1, 3),
            database.placeholders(4, 1)
        );
        let bodies: Vec<String> = sqlx::query_scalar(&sql)
            .bind("n2")
            .bind("n0")
            .bind("nothing")
            .bind(2_i64)
            .fetch_all(&database.pool)
            .await?;
        assert_eq!(bodies, vec!["body 0".to_owned()]);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn inserted_rows_are_exactly_the_given_ones_on_both_databases() -> anyhow::Result<()> {
    unhidra_testkit::on_each_database(|db| async move {
        let database = Database::connect(db.url(), 1).await?;
        database.migrate("notes-service", MIGRATIONS).await?;
        let insert = |rows: Vec<(String, i64)>| {
            let database = database.clone();
            async move {
                let mut write = database.begin_write().await?;
                let inserted = database
                    .insert_rows(
                        write.conn(),
                        "notes (id, body, at)",
                        3,
                        "ON CONFLICT DO NOTHING",
                        &rows,
                        |query, (id, at)| Ok(query.bind(id.as_str()).bind("body").bind(*at)),
                    )
                    .await?;
                write.commit().await?;
                anyhow::Ok(inserted)
            }
        };
        // Three rows (padded to four), then 1,300 (statements of 512, 512
        // and 276 padded to 512), then five of which two are there already.
        let three: Vec<(String, i64)> = (0..3).map(|i| (format!("a{i}"), i)).collect();
        assert_eq!(insert(three).await?, 3);
        let many: Vec<(String, i64)> = (0..1300).map(|i| (format!("b{i:04}"), i)).collect();
        assert_eq!(insert(many).await?, 1300);
        let again: Vec<(String, i64)> = ["a1", "a2", "c0", "c1", "c2"]
            .iter()
            .map(|id| ((*id).to_owned(), 7))
            .collect();
        assert_eq!(insert(again).await?, 3);
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT id, at FROM notes ORDER BY id")
            .fetch_all(&database.pool)
            .await?;
        let mut expected: Vec<(String, i64)> = (0..3).map(|i| (format!("a{i}"), i)).collect();
        expected.extend((0..1300).map(|i| (format!("b{i:04}"), i)));
        expected.extend((0..3).map(|i| (format!("c{i}"), 7)));
        assert_eq!(rows, expected);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_write_dropped_before_commit_leaves_nothing_on_both_databases() -> anyhow::Result<()> {
    unhidra_testkit::on_each_database(|db| async move {
        let database = Database::connect(db.url(), 1).await?;
        database.migrate("notes-service", MIGRATIONS).await?;
        let note = |id: &'static str| {
            sqlx::query("INSERT INTO notes (id, body, at) VALUES ($1, 'body', 1)").bind(id)
        };
        let mut dropped = database.begin_write().await?;
        note("dropped").execute(dropped.conn()).await?;
        drop(dropped);
        // The next writer (on SQLite the same connection) starts clean.
        let mut committed = database.begin_write().await?;
        note("committed").execute(committed.conn()).await?;
        committed.commit().await?;
        let mut single = database.write_connection().await?;
        note("single").execute(single.conn()).await?;
        drop(single);
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM notes ORDER BY id")
            .fetch_all(&database.pool)
            .await?;
        assert_eq!(ids, ["committed", "single"]);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn readiness_fails_while_the_sqlite_writer_is_held_too_long() -> anyhow::Result<()> {
    let db = TestDatabase::sqlite().await?;
    let database = Database::connect(db.url(), 1).await?;
    assert!(database.ping().await);
    // Every write of the process waits while this transaction is open.
    let stuck = database.begin_write().await?;
    assert!(!database.ping().await, "ready while no write can start");
    drop(stuck);
    assert!(database.ping().await);
    Ok(())
}
