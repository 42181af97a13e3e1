//! The stored history of every room.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use unhidra_core::{
    events::RoomMessage,
    ids::{MessageId, RoomId, UserId},
};
use unhidra_store::{
    Database, MAX_ROWS_PER_STATEMENT, WriteConnection, is_unique_violation_in, now_millis,
};

/// One message as history serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StoredMessage {
    pub seq: u64,
    pub message_id: MessageId,
    pub sender: UserId,
    pub body: String,
    pub sent_at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct HistoryRepo {
    db: Database,
}

impl HistoryRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Stores room events, skipping those whose `message_id` is already
    /// stored; returns how many were new. Each statement (of up to 512
    /// events) commits on its own: what one that failed left out is stored
    /// when the events come again, and the rest is skipped then.
    ///
    /// Events seldom come again (a redelivery), so each chunk is inserted
    /// plainly first, and only if that fails on a stored one with `ON
    /// CONFLICT DO NOTHING`: on Postgres that clause makes every insert a
    /// speculative one, a look-up in each unique index before it and a
    /// record in the log after it.
    pub async fn insert(&self, events: &[RoomMessage]) -> anyhow::Result<u64> {
        let now = now_millis();
        let mut write = self.db.write_connection().await?;
        let mut inserted = 0;
        for chunk in events.chunks(MAX_ROWS_PER_STATEMENT) {
            let plain = self.insert_chunk(&mut write, chunk, "", now).await;
            inserted += match plain {
                Err(e) if is_unique_violation_in(&e) => {
                    self.insert_chunk(&mut write, chunk, "ON CONFLICT DO NOTHING", now)
                        .await?
                }
                other => other?,
            };
        }
        Ok(inserted)
    }

    async fn insert_chunk(
        &self,
        write: &mut WriteConnection,
        events: &[RoomMessage],
        suffix: &str,
        now: i64,
    ) -> anyhow::Result<u64> {
        self.db
            .insert_rows(
                write.conn(),
                "messages (message_id, room_id, seq, sender, body, sent_at, stored_at)",
                7,
                suffix,
                events,
                |query, event| {
                    Ok(query
                        .bind(event.message_id.to_string())
                        .bind(event.room.to_string())
                        .bind(i64::try_from(event.seq)?)
                        .bind(event.sender.to_string())
                        .bind(event.body.as_str())
                        .bind(event.sent_at.timestamp_millis())
                        .bind(now))
                },
            )
            .await
    }

    /// Up to `limit` messages of `room` with a sequence below `before`,
    /// newest first.
    pub async fn page(
        &self,
        room: RoomId,
        before: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<StoredMessage>> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, message_id, sender, body, sent_at FROM messages
             WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
        )
        .bind(room.to_string())
        .bind(before)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        stored(rows)
    }

    /// The stored messages of `room` with `after < seq <= up_to`, in order.
    pub async fn range(
        &self,
        room: RoomId,
        after: u64,
        up_to: u64,
    ) -> anyhow::Result<Vec<StoredMessage>> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, message_id, sender, body, sent_at FROM messages
             WHERE room_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
        )
        .bind(room.to_string())
        .bind(i64::try_from(after)?)
        .bind(i64::try_from(up_to)?)
        .fetch_all(&self.db.pool)
        .await?;
        stored(rows)
    }
}

/// seq, message_id, sender, body, sent_at.
type Row = (i64, String, String, String, i64);

fn stored(rows: Vec<Row>) -> anyhow::Result<Vec<StoredMessage>> {
    rows.into_iter()
        .map(|(seq, message_id, sender, body, sent_at)| {
            Ok(StoredMessage {
                seq: u64::try_from(seq)?,
                message_id: message_id.parse()?,
                sender: sender.parse()?,
                body,
                sent_at: DateTime::from_timestamp_millis(sent_at)
                    .with_context(|| format!("stored time {sent_at} out of range"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_core::events::SCHEMA_VERSION;
    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{MIGRATIONS, NAME};

    fn event(room: RoomId, seq: u64, body: &str) -> RoomMessage {
        RoomMessage {
            v: SCHEMA_VERSION,
            room,
            seq,
            message_id: MessageId::new(),
            sender: UserId::new(),
            body: body.to_owned(),
            sent_at: DateTime::from_timestamp_millis(1_700_000_000_123).unwrap_or_default(),
        }
    }

    #[tokio::test]
    async fn events_are_stored_once_and_paged_newest_first() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = Database::connect(db.url(), 2).await?;
            database.migrate(NAME, MIGRATIONS).await?;
            let history = HistoryRepo::new(database);
            let (room, other) = (RoomId::new(), RoomId::new());
            let events: Vec<RoomMessage> = (1..=5)
                .map(|seq| event(room, seq, &format!("'); DELETE FROM messages; -- {seq}")))
                .collect();
            assert_eq!(history.insert(&events[..2]).await?, 2);
            // Redeliveries are absorbed, in a batch with new events too.
            assert_eq!(history.insert(&events).await?, 3);
            assert_eq!(history.insert(&events[2..3]).await?, 0);
            assert_eq!(history.insert(&[event(other, 1, "elsewhere")]).await?, 1);
            // A batch larger than one statement holds.
            let many: Vec<RoomMessage> = (1..=1200)
                .map(|seq| event(other, seq + 1, "bulk"))
                .collect();
            assert_eq!(history.insert(&many).await?, 1200);
            // Over two statements: the first's chunk mixes new events and
            // redeliveries, the second's holds only redeliveries.
            let mixed: Vec<RoomMessage> = (1202..=1301)
                .map(|seq| event(other, seq, "new"))
                .chain(many[400..].iter().cloned())
                .collect();
            assert_eq!(history.insert(&mixed).await?, 100);
            assert_eq!(history.page(other, i64::MAX, 1).await?[0].seq, 1301);

            let page = history.page(room, i64::MAX, 2).await?;
            let stored = |e: &RoomMessage| StoredMessage {
                seq: e.seq,
                message_id: e.message_id,
                sender: e.sender,
                body: e.body.clone(),
                sent_at: e.sent_at,
            };
            assert_eq!(page, vec![stored(&events[4]), stored(&events[3])]);
            let older = history.page(room, 4, 10).await?;
            assert_eq!(
                older.iter().map(|m| m.seq).collect::<Vec<_>>(),
                vec![3, 2, 1]
            );
            assert_eq!(history.page(room, 1, 10).await?, vec![]);
            assert_eq!(history.page(RoomId::new(), i64::MAX, 10).await?, vec![]);

            // A range, oldest first, after one sequence and up to another.
            let range = history.range(room, 1, 4).await?;
            assert_eq!(
                range.iter().map(|m| m.seq).collect::<Vec<_>>(),
                vec![2, 3, 4]
            );
            assert_eq!(history.range(room, 5, 9).await?, vec![]);
            Ok(())
        })
        .await
    }
}
