//! A recorder: a durable consumer that decodes each event and stores it
//! idempotently, acknowledging only after the commit. history-service and
//! audit-service are recorders of their streams; each passes in what differs
//! (the event type and its insert).

use std::{future::Future, sync::Arc, time::Duration};

use prometheus::IntCounter;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use unhidra_bus::Delivery;
use unhidra_core::streams::ConsumerSpec;

use crate::{ServiceContext, consumer::spawn_consumer};

/// How long a failed insert waits before its redelivery.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Consumes `spec` until shutdown: every delivery is decoded as `E` and
/// handed to `store`, which answers whether it inserted the event (false for
/// one already stored). Stored events count in `stored`; a failed store is
/// redelivered; an event that cannot be decoded is logged and dropped, since
/// no redelivery could fix it.
pub async fn spawn_recorder<E, F, Fut>(
    ctx: &ServiceContext,
    spec: ConsumerSpec,
    stored: IntCounter,
    store: F,
) -> anyhow::Result<JoinHandle<()>>
where
    E: DeserializeOwned + Send + 'static,
    F: Fn(E) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<bool>> + Send + 'static,
{
    let store = Arc::new(store);
    let durable: Arc<str> = Arc::from(spec.durable.as_str());
    spawn_consumer(ctx, spec, move |delivery| {
        let (store, stored, durable) = (Arc::clone(&store), stored.clone(), Arc::clone(&durable));
        async move { record(&durable, delivery, &stored, store.as_ref()).await }
    })
    .await
}

async fn record<E, F, Fut>(durable: &str, delivery: Delivery, stored: &IntCounter, store: &F)
where
    E: DeserializeOwned,
    F: Fn(E) -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let event: E = match serde_json::from_slice(&delivery.message.payload) {
        Ok(event) => event,
        Err(e) => {
            tracing::error!(consumer = durable, subject = %delivery.message.subject, error = %e, "undecodable event dropped");
            return ack(delivery).await;
        }
    };
    match store(event).await {
        Ok(inserted) => {
            if inserted {
                stored.inc();
            }
            ack(delivery).await;
        }
        Err(e) => {
            tracing::warn!(consumer = durable, subject = %delivery.message.subject, attempt = delivery.attempt, error = ?e, "storing failed; will retry");
            retry(delivery).await;
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

async fn retry(delivery: Delivery) {
    if let Err(e) = delivery.nak(RETRY_DELAY).await {
        tracing::warn!(error = %e, "nak failed; the event will be redelivered after ack_wait");
    }
}
