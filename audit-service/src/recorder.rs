//! Stores each security event once (idempotent on its id), acknowledging only
//! after the commit.

use std::time::Duration;

use unhidra_bus::Delivery;
use unhidra_core::events::AuditEvent;
use unhidra_runtime::consumer::{ack, retry};
use unhidra_store::{Database, now_millis};
use unhidra_telemetry::metrics;

const RETRY_DELAY: Duration = Duration::from_secs(1);

pub async fn handle(db: Database, delivery: Delivery) {
    let event: AuditEvent = match serde_json::from_slice(&delivery.message.payload) {
        Ok(event) => event,
        Err(e) => {
            tracing::error!(subject = %delivery.message.subject, error = %e, "undecodable audit event dropped");
            return ack(delivery).await;
        }
    };
    let stored = sqlx::query(
        "INSERT INTO audit_events (id, kind, actor, subject, detail, occurred_at, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(event.id.to_string())
    .bind(event.kind.as_str())
    .bind(event.actor.map(|a| a.to_string()))
    .bind(event.subject.clone())
    .bind(event.detail.to_string())
    .bind(event.at.timestamp_millis())
    .bind(now_millis())
    .execute(&db.pool)
    .await;
    match stored {
        Ok(result) => {
            if result.rows_affected() == 1 {
                metrics::AUDIT_EVENTS_STORED.inc();
            }
            ack(delivery).await;
        }
        Err(e) => {
            tracing::warn!(event_id = %event.id, error = %e, "storing failed; will retry");
            retry(delivery, RETRY_DELAY).await;
        }
    }
}
