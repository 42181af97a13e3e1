//! The durable consumer: every room event is inserted (a repeat of a stored
//! `message_id` is a no-op) and acknowledged only after the insert committed;
//! a failed insert is redelivered.

use std::time::Duration;

use unhidra_bus::Delivery;
use unhidra_core::events::RoomMessage;
use unhidra_runtime::consumer::{ack, retry};
use unhidra_store::{Database, now_millis};
use unhidra_telemetry::metrics;

const RETRY_DELAY: Duration = Duration::from_secs(1);

pub async fn handle(db: Database, delivery: Delivery) {
    let event: RoomMessage = match serde_json::from_slice(&delivery.message.payload) {
        Ok(event) => event,
        Err(e) => {
            // Redelivering cannot fix it; it is logged and dropped.
            tracing::error!(subject = %delivery.message.subject, error = %e, "undecodable room event dropped");
            return ack(delivery).await;
        }
    };
    match store(&db, &event).await {
        Ok(inserted) => {
            if inserted {
                metrics::MESSAGES_STORED.inc();
            }
            tracing::debug!(room_id = %event.room, seq = event.seq, message_id = %event.message_id, inserted, "message stored");
            ack(delivery).await;
        }
        Err(e) => {
            tracing::warn!(message_id = %event.message_id, error = %e, "storing failed; will retry");
            retry(delivery, RETRY_DELAY).await;
        }
    }
}

/// Inserts the event; false when it was already stored.
async fn store(db: &Database, event: &RoomMessage) -> anyhow::Result<bool> {
    let result = sqlx::query(
        "INSERT INTO messages (message_id, room_id, seq, sender, body, sent_at, stored_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(event.message_id.to_string())
    .bind(event.room.to_string())
    .bind(i64::try_from(event.seq)?)
    .bind(event.sender.to_string())
    .bind(&event.body)
    .bind(event.sent_at.timestamp_millis())
    .bind(now_millis())
    .execute(&db.pool)
    .await?;
    Ok(result.rows_affected() == 1)
}
