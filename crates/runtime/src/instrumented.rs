//! The bus every service actually uses: the configured one, wrapped to time
//! publishes and requests and to stamp outgoing messages with the current
//! request id and trace context.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use prometheus::Histogram;
use unhidra_bus::{Bus, Deliveries, Headers, Message, Outgoing, Result, Subscription};
use unhidra_core::{
    rpc,
    streams::{ConsumerSpec, StreamSpec},
    subjects::Subjects,
};
use unhidra_telemetry::{metrics::Metrics, request_id};

pub struct InstrumentedBus {
    inner: Arc<dyn Bus>,
    /// Core publishes, each.
    core_publish: Histogram,
    /// Durable publishes, each until the stream stored it.
    durable_publish: Histogram,
    /// The round trip of each request/reply contract, by subject.
    request_duration: HashMap<String, Histogram>,
}

impl InstrumentedBus {
    pub fn new(
        inner: Arc<dyn Bus>,
        subjects: &Subjects,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let requests = rpc::contracts(subjects);
        let names: Vec<[&str; 1]> = requests.iter().map(|(_, name)| [name.as_str()]).collect();
        let series: Vec<&[&str]> = names.iter().map(|name| &name[..]).collect();
        let request_duration = metrics.latency_vec(
            "unhidra_bus_request_duration_seconds",
            "Request/reply round trips as the caller waits for them (timeouts included).",
            &["request"],
            &series,
        )?;
        let publish_duration = metrics.latency_vec(
            "unhidra_bus_publish_duration_seconds",
            "Bus publish latency: `core` publishes, `durable` until the stream stored it.",
            &["kind"],
            &[&["core"], &["durable"]],
        )?;
        Ok(Self {
            inner,
            core_publish: publish_duration.with_label_values(&["core"]),
            durable_publish: publish_duration.with_label_values(&["durable"]),
            request_duration: requests
                .iter()
                .map(|(subject, name)| {
                    (subject.clone(), request_duration.with_label_values(&[name]))
                })
                .collect(),
        })
    }
}

fn stamped(mut headers: Headers) -> Headers {
    request_id::stamp(&mut headers);
    headers
}

#[async_trait]
impl Bus for InstrumentedBus {
    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.publish(subject, stamped(headers), payload).await;
        self.core_publish.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn publish_durable(
        &self,
        subject: &str,
        msg_id: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<()> {
        let started = Instant::now();
        let result = self
            .inner
            .publish_durable(subject, msg_id, stamped(headers), payload)
            .await;
        self.durable_publish
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn publish_durable_batch(&self, mut messages: Vec<Outgoing>) -> Result<()> {
        let started = Instant::now();
        let count = messages.len();
        for m in &mut messages {
            request_id::stamp(&mut m.headers);
        }
        let result = self.inner.publish_durable_batch(messages).await;
        // Each message was stored within the batch's time.
        let took = started.elapsed().as_secs_f64();
        for _ in 0..count {
            self.durable_publish.observe(took);
        }
        result
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription> {
        self.inner.subscribe(pattern).await
    }

    async fn subscribe_queue(&self, pattern: &str, group: &str) -> Result<Subscription> {
        self.inner.subscribe_queue(pattern, group).await
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        let started = Instant::now();
        let reply = self
            .inner
            .request(subject, stamped(headers), payload, timeout)
            .await;
        if let Some(duration) = self.request_duration.get(subject) {
            duration.observe(started.elapsed().as_secs_f64());
        }
        reply
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<()> {
        self.inner.ensure_stream(spec).await
    }

    async fn consume(&self, spec: &ConsumerSpec) -> Result<Deliveries> {
        self.inner.consume(spec).await
    }

    async fn consumer_pending(&self, spec: &ConsumerSpec) -> Result<u64> {
        self.inner.consumer_pending(spec).await
    }

    async fn consumed(&self, stream: &str) -> Result<()> {
        self.inner.consumed(stream).await
    }

    async fn healthy(&self) -> bool {
        self.inner.healthy().await
    }

    fn streams_outlive_process(&self) -> bool {
        self.inner.streams_outlive_process()
    }

    async fn close_streams(&self) {
        self.inner.close_streams().await;
    }
}
