//! A recorder: a durable consumer that decodes events and stores them
//! idempotently, a batch at a time (one multi-row insert of up to 512),
//! acknowledging each only after it is stored. history-service and
//! audit-service are recorders of their streams; each implements [`Record`]
//! for what differs (the event type, its insert).

use std::{future::Future, sync::Arc, time::Duration};

use prometheus::IntCounter;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use unhidra_bus::Delivery;
use unhidra_core::streams::ConsumerSpec;
use unhidra_telemetry::request_id;

use crate::{ServiceContext, consumer::spawn_consumer};

/// How long a failed insert waits before its redelivery.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// What a recorder stores.
pub trait Record: Send + Sync + 'static {
    type Event: DeserializeOwned + Send + Sync + 'static;

    /// Stores `events`, skipping those already stored; returns how many were
    /// new.
    fn store(&self, events: &[Self::Event]) -> impl Future<Output = anyhow::Result<u64>> + Send;

    /// Called for each stored event, inside the request scope (request id,
    /// trace) of the action that caused it.
    fn stored(&self, event: &Self::Event);
}

/// Consumes `spec` until shutdown, storing every event with `record`; new
/// events count in `stored`. When a batch fails, its events are stored one by
/// one, so one event that cannot be stored (and is redelivered) does not hold
/// back the others; an event that cannot be decoded is logged and dropped,
/// since no redelivery could fix it.
pub async fn spawn_recorder<R: Record>(
    ctx: &ServiceContext,
    spec: ConsumerSpec,
    stored: IntCounter,
    record: R,
) -> anyhow::Result<JoinHandle<()>> {
    let recorder = Arc::new(Recorder {
        span_name: format!("consume {}", spec.durable),
        durable: spec.durable.clone(),
        stored,
        record,
    });
    spawn_consumer(ctx, spec, move |batch| {
        let recorder = Arc::clone(&recorder);
        async move { recorder.handle(batch).await }
    })
    .await
}

struct Recorder<R> {
    durable: String,
    span_name: String,
    stored: IntCounter,
    record: R,
}

impl<R: Record> Recorder<R> {
    async fn handle(&self, batch: Vec<Delivery>) {
        let mut decoded = Vec::with_capacity(batch.len());
        for delivery in batch {
            match serde_json::from_slice::<R::Event>(&delivery.message.payload) {
                Ok(event) => decoded.push((delivery, event)),
                Err(e) => {
                    tracing::error!(consumer = %self.durable, subject = %delivery.message.subject, error = %e, "undecodable event dropped");
                    ack(delivery).await;
                }
            }
        }
        if decoded.is_empty() {
            return;
        }
        let (deliveries, events): (Vec<Delivery>, Vec<R::Event>) = decoded.into_iter().unzip();
        match self.store(&events).await {
            Ok(()) => {
                for (delivery, event) in deliveries.iter().zip(&events) {
                    self.report_stored(delivery, event).await;
                }
                for delivery in deliveries {
                    ack(delivery).await;
                }
            }
            Err(e) if events.len() == 1 => {
                for delivery in deliveries {
                    self.retry(delivery, &e).await;
                }
            }
            Err(e) => {
                tracing::warn!(consumer = %self.durable, count = events.len(), error = ?e, "batch not stored; storing one by one");
                for (delivery, event) in deliveries.into_iter().zip(&events) {
                    match self.store(std::slice::from_ref(event)).await {
                        Ok(()) => {
                            self.report_stored(&delivery, event).await;
                            ack(delivery).await;
                        }
                        Err(e) => self.retry(delivery, &e).await,
                    }
                }
            }
        }
    }

    async fn store(&self, events: &[R::Event]) -> anyhow::Result<()> {
        let new = self.record.store(events).await?;
        self.stored.inc_by(new);
        Ok(())
    }

    async fn report_stored(&self, delivery: &Delivery, event: &R::Event) {
        request_id::scope_from(&self.span_name, &delivery.message.headers, async {
            self.record.stored(event);
        })
        .await;
    }

    async fn retry(&self, delivery: Delivery, error: &anyhow::Error) {
        tracing::warn!(consumer = %self.durable, subject = %delivery.message.subject, attempt = delivery.attempt, error = ?error, "storing failed; will retry");
        if let Err(e) = delivery.nak(RETRY_DELAY).await {
            tracing::warn!(error = %e, "nak failed; the event will be redelivered after ack_wait");
        }
    }
}

/// Acknowledges, logging (not failing) when the ack is lost: the event then
/// comes back and the idempotent store absorbs it.
async fn ack(delivery: Delivery) {
    if let Err(e) = delivery.ack().await {
        tracing::warn!(error = %e, "ack failed; the event will be redelivered");
    }
}
