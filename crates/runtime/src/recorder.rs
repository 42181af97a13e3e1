//! A recorder: a durable consumer that decodes events and stores them
//! idempotently, many deliveries at a time (multi-row inserts), acknowledging
//! each delivery only after its events are stored. A delivery holds one event
//! or, where the publisher batches them, many. history-service and
//! audit-service are recorders of their streams; each implements [`Record`]
//! for what differs (the event type, its decoding, its insert).

use std::{future::Future, ops::Range, sync::Arc, time::Duration};

use prometheus::IntCounter;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use unhidra_bus::{Delivery, Headers, Message};
use unhidra_core::streams::ConsumerSpec;
use unhidra_telemetry::request_id;

use crate::{ServiceContext, consumer::spawn_consumer};

/// How long a failed insert waits before its redelivery.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Events stored together at most (a consumer's batch of deliveries that
/// each hold many is stored in parts).
const MAX_EVENTS: usize = 4096;

/// What a recorder stores.
pub trait Record: Send + Sync + 'static {
    type Event: DeserializeOwned + Send + Sync + 'static;

    /// The events `message` holds, each with the headers (request id,
    /// trace context) of the action that caused it: by default one, the
    /// message's payload.
    fn decode(&self, message: &Message) -> anyhow::Result<Vec<(Headers, Self::Event)>> {
        let event = serde_json::from_slice(&message.payload)?;
        Ok(vec![(message.headers.clone(), event)])
    }

    /// Stores `events`, skipping those already stored; returns how many were
    /// new.
    fn store(&self, events: &[Self::Event]) -> impl Future<Output = anyhow::Result<u64>> + Send;

    /// Called for each stored event, inside the request scope (request id,
    /// trace) of the action that caused it.
    fn stored(&self, event: &Self::Event);
}

/// Consumes `spec` until shutdown, storing every event with `record`; new
/// events count in `stored`. When a batch of deliveries fails, each
/// delivery's events are stored on their own, so one that cannot be stored
/// (and is redelivered) does not hold back the others; a delivery that
/// cannot be decoded is logged and dropped, since no redelivery could fix
/// it.
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

/// A decoded delivery.
struct Decoded<E> {
    delivery: Delivery,
    events: Vec<(Headers, E)>,
}

/// Deliveries whose events are stored together: the events in delivery
/// order, and each delivery's part of them.
struct Part {
    delivery: Delivery,
    headers: Vec<Headers>,
    events: Range<usize>,
}

impl<R: Record> Recorder<R> {
    async fn handle(&self, batch: Vec<Delivery>) {
        let mut decoded = Vec::with_capacity(batch.len());
        let mut events = 0;
        for delivery in batch {
            match self.record.decode(&delivery.message) {
                Ok(held) => {
                    events += held.len();
                    decoded.push(Decoded {
                        delivery,
                        events: held,
                    });
                    if events >= MAX_EVENTS {
                        self.store_together(std::mem::take(&mut decoded)).await;
                        events = 0;
                    }
                }
                Err(e) => {
                    tracing::error!(consumer = %self.durable, subject = %delivery.message.subject, error = %e, "undecodable event dropped");
                    ack(delivery).await;
                }
            }
        }
        if !decoded.is_empty() {
            self.store_together(decoded).await;
        }
    }

    /// Stores the events of `decoded` in one go, acknowledging each
    /// delivery once stored; if that fails, each delivery's on its own.
    async fn store_together(&self, decoded: Vec<Decoded<R::Event>>) {
        let mut events = Vec::new();
        let mut parts = Vec::with_capacity(decoded.len());
        for Decoded {
            delivery,
            events: held,
        } in decoded
        {
            let start = events.len();
            let mut headers = Vec::with_capacity(held.len());
            for (h, event) in held {
                headers.push(h);
                events.push(event);
            }
            parts.push(Part {
                delivery,
                headers,
                events: start..events.len(),
            });
        }
        match self.store(&events).await {
            Ok(()) => {
                for part in parts {
                    self.report_stored(&part.headers, &events[part.events])
                        .await;
                    ack(part.delivery).await;
                }
            }
            Err(e) if parts.len() == 1 => {
                for part in parts {
                    self.retry(part.delivery, &e).await;
                }
            }
            Err(e) => {
                tracing::warn!(consumer = %self.durable, count = events.len(), error = ?e, "batch not stored; storing each delivery on its own");
                for part in parts {
                    let mine = &events[part.events];
                    match self.store(mine).await {
                        Ok(()) => {
                            self.report_stored(&part.headers, mine).await;
                            ack(part.delivery).await;
                        }
                        Err(e) => self.retry(part.delivery, &e).await,
                    }
                }
            }
        }
    }

    async fn store(&self, events: &[R::Event]) -> anyhow::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let new = self.record.store(events).await?;
        self.stored.inc_by(new);
        Ok(())
    }

    async fn report_stored(&self, headers: &[Headers], events: &[R::Event]) {
        for (headers, event) in headers.iter().zip(events) {
            request_id::scope_from(&self.span_name, headers, async {
                self.record.stored(event);
            })
            .await;
        }
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
