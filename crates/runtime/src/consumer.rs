//! Running a durable consumer until shutdown: each delivery goes to a handler
//! (which acks or naks it) inside the request scope named by its
//! `x-request-id` header; if the delivery stream ends, the consumer resumes.
//! Redeliveries are counted and the consumer's lag is sampled as metrics.

use std::{future::Future, time::Duration};

use futures::StreamExt;
use tokio::task::JoinHandle;
use unhidra_bus::{Bus, ConsumerSpec, Delivery};
use unhidra_telemetry::{metrics, request_id};

use crate::ServiceContext;

const RESUME_DELAY: Duration = Duration::from_secs(1);
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Creates (or resumes) the durable consumer `spec`, then hands deliveries to
/// `handle` one at a time until shutdown. Creation errors are returned, so a
/// service refuses to start without its stream.
pub async fn spawn_consumer<F, Fut>(
    ctx: &ServiceContext,
    spec: ConsumerSpec,
    handle: F,
) -> anyhow::Result<JoinHandle<()>>
where
    F: Fn(Delivery) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let mut deliveries = ctx.bus.consume(&spec).await?;
    // Exported from the start, at 0.
    metrics::CONSUMER_REDELIVERIES.with_label_values(&[&spec.durable]);
    let bus = ctx.bus.clone();
    let shutdown = ctx.shutdown.clone();
    Ok(tokio::spawn(async move {
        let mut lag_sample = tokio::time::interval(LAG_SAMPLE_INTERVAL);
        let span_name = format!("consume {}", spec.durable);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = lag_sample.tick() => {
                    sample_lag(bus.as_ref(), &spec).await;
                    continue;
                }
                next = deliveries.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    if delivery.attempt > 1 {
                        metrics::CONSUMER_REDELIVERIES
                            .with_label_values(&[&spec.durable])
                            .inc();
                    }
                    let headers = delivery.message.headers.clone();
                    request_id::scope_from(&span_name, &headers, handle(delivery)).await;
                }
                Some(Err(e)) => {
                    tracing::warn!(consumer = %spec.durable, error = %e, "delivery failed")
                }
                None => loop {
                    tracing::warn!(consumer = %spec.durable, "delivery stream ended; resuming");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(RESUME_DELAY) => {}
                    }
                    match bus.consume(&spec).await {
                        Ok(resumed) => {
                            deliveries = resumed;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(consumer = %spec.durable, error = %e, "cannot resume")
                        }
                    }
                },
            }
        }
    }))
}

async fn sample_lag(bus: &dyn Bus, spec: &ConsumerSpec) {
    match bus.consumer_pending(spec).await {
        Ok(pending) => metrics::CONSUMER_PENDING
            .with_label_values(&[&spec.durable])
            .set(i64::try_from(pending).unwrap_or(i64::MAX)),
        Err(e) => tracing::debug!(consumer = %spec.durable, error = %e, "lag not sampled"),
    }
}

/// Acknowledges, logging (not failing) when the ack is lost: the message then
/// comes back and the idempotent handler absorbs it.
pub async fn ack(delivery: Delivery) {
    if let Err(e) = delivery.ack().await {
        tracing::warn!(error = %e, "ack failed; the message will be redelivered");
    }
}

/// Asks for redelivery after `delay`.
pub async fn retry(delivery: Delivery, delay: Duration) {
    if let Err(e) = delivery.nak(delay).await {
        tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
    }
}
