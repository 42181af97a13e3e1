//! Running a durable consumer until shutdown: each delivery goes to a handler
//! (which acks or naks it) inside the request scope named by its
//! `x-request-id` header; if the delivery stream ends, the consumer resumes.
//! Redeliveries are counted and the consumer's lag is sampled as metrics.

use std::{future::Future, time::Duration};

use futures::StreamExt;
use prometheus::{IntCounterVec, IntGaugeVec};
use tokio::task::JoinHandle;
use unhidra_bus::{Bus, Delivery};
use unhidra_core::streams::ConsumerSpec;
use unhidra_telemetry::{metrics::Metrics, request_id};

use crate::ServiceContext;

const RESUME_DELAY: Duration = Duration::from_secs(1);
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Lag and redeliveries of every durable consumer of the process.
#[derive(Clone, Debug)]
pub struct ConsumerMetrics {
    pending: IntGaugeVec,
    redeliveries: IntCounterVec,
}

impl ConsumerMetrics {
    pub fn register(metrics: &Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            pending: metrics.gauge_vec(
                "unhidra_consumer_pending_messages",
                "Messages a durable consumer has not acknowledged yet (its lag).",
                &["consumer"],
            )?,
            redeliveries: metrics.counter_vec(
                "unhidra_consumer_redeliveries_total",
                "Deliveries to a durable consumer that were not the first attempt.",
                &["consumer"],
                &[],
            )?,
        })
    }
}

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
    let metrics = ctx.consumer_metrics.clone();
    // Exported from the start, at 0.
    metrics.redeliveries.with_label_values(&[&spec.durable]);
    let bus = ctx.bus.clone();
    let shutdown = ctx.shutdown.clone();
    Ok(tokio::spawn(async move {
        let mut lag_sample = tokio::time::interval(LAG_SAMPLE_INTERVAL);
        let span_name = format!("consume {}", spec.durable);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = lag_sample.tick() => {
                    sample_lag(bus.as_ref(), &spec, &metrics.pending).await;
                    continue;
                }
                next = deliveries.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    if delivery.attempt > 1 {
                        metrics
                            .redeliveries
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

async fn sample_lag(bus: &dyn Bus, spec: &ConsumerSpec, gauge: &IntGaugeVec) {
    match bus.consumer_pending(spec).await {
        Ok(pending) => gauge
            .with_label_values(&[&spec.durable])
            .set(i64::try_from(pending).unwrap_or(i64::MAX)),
        Err(e) => tracing::debug!(consumer = %spec.durable, error = %e, "lag not sampled"),
    }
}
