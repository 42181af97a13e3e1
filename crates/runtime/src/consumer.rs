//! Running a durable consumer until shutdown: deliveries go to a handler
//! (which acks or naks each) in batches: whatever arrived while the previous
//! batch was handled, up to `MAX_BATCH`. If the delivery stream ends, the
//! consumer resumes. Redeliveries are counted and the consumer's lag is
//! sampled as metrics. On a bus whose streams end with the process (the
//! in-process bus) a consumer goes on at shutdown until its deliveries end,
//! which they do once the streams are closed and it has handled everything
//! they held; the shutdown deadline bounds that.

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
/// `handle`, a batch at a time, until shutdown (on the in-process bus: until
/// it has handled what the closed streams held). Creation errors are
/// returned, so a service refuses to start without its stream.
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
    // Otherwise it goes on at shutdown until its deliveries end.
    let stop_at_shutdown = bus.streams_outlive_process();
    Ok(tokio::spawn(async move {
        let mut lag_sample = tokio::time::interval(LAG_SAMPLE_INTERVAL);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled(), if stop_at_shutdown => return,
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
                if shutdown.is_cancelled() {
                    return;
                }
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

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use axum::Router;
    use tokio::net::TcpListener;
    use unhidra_bus::{BusError, Headers};
    use unhidra_core::{Config, streams::StreamSpec};

    use super::*;
    use crate::Service;

    #[tokio::test]
    async fn on_the_in_process_bus_shutdown_waits_until_the_consumer_handled_everything()
    -> anyhow::Result<()> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ctx = ServiceContext::connect("test", Config::default(), async {
            let _ = stopped.await;
        })
        .await?;
        let consumer = ConsumerSpec {
            stream: "T_EVENTS".into(),
            durable: "store".into(),
            filter: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
        };
        ctx.bus
            .ensure_stream(&StreamSpec {
                name: "T_EVENTS".into(),
                subjects: vec!["t.events.>".into()],
                max_age: Duration::from_secs(600),
                max_bytes: 1024 * 1024,
                duplicate_window: Duration::from_secs(60),
                consumers: vec![consumer.clone()],
            })
            .await?;
        // The consumer holds its first batch until shutdown begins, so that
        // by then thousands of messages wait for it (more than a batch).
        let handled = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&handled);
        let shutdown = ctx.shutdown.clone();
        let task = spawn_consumer(&ctx, consumer, move |batch| {
            let (count, shutdown) = (Arc::clone(&count), shutdown.clone());
            async move {
                shutdown.cancelled().await;
                for delivery in batch {
                    if delivery.ack().await.is_ok() {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
        .await?;
        let published = 3_000;
        for i in 0..published {
            let id = format!("m{i}");
            ctx.bus
                .publish_durable("t.events.x", &id, Headers::new(), id.clone().into())
                .await?;
        }
        let _ = stop.send(());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let service = Service {
            name: "test",
            router: Router::new(),
            openapi: utoipa::openapi::OpenApi::default(),
            database: None,
            tasks: vec![task],
            fallback: None,
        };
        ctx.serve(listener, vec![service]).await?;
        assert_eq!(
            handled.load(Ordering::SeqCst),
            published,
            "every message the stream held was handled before shutdown ended"
        );
        let late = ctx
            .bus
            .publish_durable("t.events.x", "late", Headers::new(), "late".into())
            .await;
        assert!(matches!(late, Err(BusError::Closed)), "{late:?}");
        Ok(())
    }
}
