//! Accepted messages and the outbox: taking a room's next sequence number and
//! queueing the event for publication happen in one transaction, so sequences
//! have no gaps and an accepted message is never lost.

use anyhow::Context;
use chrono::{DateTime, Utc};
use unhidra_core::{
    events::{RoomMessage, SCHEMA_VERSION},
    ids::{MessageId, RoomId, UserId},
};
use unhidra_store::{Database, now_millis};

/// An accepted message waiting to be published: its event, serialised once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub message_id: MessageId,
    pub room: RoomId,
    pub payload: String,
}

#[derive(Clone, Debug)]
pub struct OutboxRepo {
    db: Database,
}

impl OutboxRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Gives `body` the room's next sequence number and queues its event.
    pub async fn accept(
        &self,
        room: RoomId,
        sender: UserId,
        body: String,
        sent_at: DateTime<Utc>,
    ) -> anyhow::Result<(RoomMessage, Pending)> {
        let message_id = MessageId::new();
        let mut tx = self.db.pool.begin().await?;
        let seq: i64 = sqlx::query_scalar(
            "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
        )
        .bind(room.to_string())
        .fetch_one(&mut *tx)
        .await?;
        let event = RoomMessage {
            v: SCHEMA_VERSION,
            room,
            seq: u64::try_from(seq)?,
            message_id,
            sender,
            body,
            sent_at,
        };
        let payload = serde_json::to_string(&event)?;
        sqlx::query(
            "INSERT INTO outbox (message_id, room_id, payload, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(message_id.to_string())
        .bind(room.to_string())
        .bind(&payload)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            event,
            Pending {
                message_id,
                room,
                payload,
            },
        ))
    }

    /// Removes a message from the outbox once the stream stored it.
    pub async fn published(&self, message_id: MessageId) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM outbox WHERE message_id = $1")
            .bind(message_id.to_string())
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Up to `limit` messages queued before `before_ms` (Unix milliseconds),
    /// oldest first. A row that does not parse is logged and left out.
    pub async fn unpublished(&self, before_ms: i64, limit: i64) -> anyhow::Result<Vec<Pending>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT message_id, room_id, payload FROM outbox WHERE created_at < $1
             ORDER BY created_at LIMIT $2",
        )
        .bind(before_ms)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(message_id, room, payload)| {
                let parsed = (|| {
                    anyhow::Ok(Pending {
                        message_id: message_id.parse().context("message id")?,
                        room: room.parse().context("room id")?,
                        payload,
                    })
                })();
                parsed
                    .inspect_err(|e| tracing::error!(%message_id, error = ?e, "malformed outbox row skipped"))
                    .ok()
            })
            .collect())
    }
}
