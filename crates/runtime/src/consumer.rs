//! Running a durable consumer until shutdown: deliveries go to a handler
//! (which acks or naks each) in batches: whatever arrived while the previous
//! batch was handled, up to `MAX_BATCH`. If the delivery stream ends, the
//! consumer resumes. Redeliveries are counted and the consumer's lag is
//! sampled as metrics.

use std::{future::Future, time::Duration};

use futures::{FutureExt, StreamExt};
use prometheus::{IntCounterVec, IntGaugeVec};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use unhidra_bus::{Bus, Deliveries, Delivery};
use unhidra_core::streams::ConsumerSpec;
use unhidra_telemetry::metrics::Metrics;

use crate::ServiceContext;

const RESUME_DELAY: Duration = Duration::from_secs(1);
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Deliveries handed to the handler at once at most.
const MAX_BATCH: usize = 512;

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
/// `handle`, a batch at a time, until shutdown. Creation errors are returned,
/// so a service refuses to start without its stream.
pub async fn spawn_consumer<F, Fut>(
    ctx: &ServiceContext,
    spec: ConsumerSpec,
    handle: F,
) -> anyhow::Result<JoinHandle<()>>
where
    F: Fn(Vec<Delivery>) -> Fut + Send + 'static,
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
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = lag_sample.tick() => {
                    sample_lag(bus.as_ref(), &spec, &metrics.pending).await;
                    continue;
                }
                next = deliveries.next() => next,
            };
            let mut ended = false;
            let mut batch = Vec::new();
            let mut next = next;
            loop {
                match next {
                    Some(Ok(delivery)) => batch.push(delivery),
                    Some(Err(e)) => {
                        tracing::warn!(consumer = %spec.durable, error = %e, "delivery failed")
                    }
                    None => {
                        ended = true;
                        break;
                    }
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                // More that already arrived joins the batch; nothing waits.
                match deliveries.next().now_or_never() {
                    Some(more) => next = more,
                    None => break,
                }
            }
            let redelivered = batch.iter().filter(|d| d.attempt > 1).count();
            metrics
                .redeliveries
                .with_label_values(&[&spec.durable])
                .inc_by(redelivered as u64);
            if !batch.is_empty() {
                handle(batch).await;
            }
            if ended {
                match resume(bus.as_ref(), &spec, &shutdown).await {
                    Some(resumed) => deliveries = resumed,
                    None => return,
                }
            }
        }
    }))
}

/// Consumes `spec` again after its delivery stream ended; `None` at shutdown.
async fn resume(
    bus: &dyn Bus,
    spec: &ConsumerSpec,
    shutdown: &CancellationToken,
) -> Option<Deliveries> {
    loop {
        tracing::warn!(consumer = %spec.durable, "delivery stream ended; resuming");
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(RESUME_DELAY) => {}
        }
        match bus.consume(spec).await {
            Ok(resumed) => return Some(resumed),
            Err(e) => tracing::warn!(consumer = %spec.durable, error = %e, "cannot resume"),
        }
    }
}

async fn sample_lag(bus: &dyn Bus, spec: &ConsumerSpec, gauge: &IntGaugeVec) {
    match bus.consumer_pending(spec).await {
        Ok(pending) => gauge
            .with_label_values(&[&spec.durable])
            .set(i64::try_from(pending).unwrap_or(i64::MAX)),
        Err(e) => tracing::debug!(consumer = %spec.durable, error = %e, "lag not sampled"),
    }
}
