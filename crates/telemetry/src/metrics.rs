//! Every metric Unhidra exports, named once here (`unhidra_` prefix, base units,
//! `_total` for counters) and registered in the process-wide registry, next to
//! the standard `process_*` metrics. `docs/operations.md` explains each one.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once");
    registry
});

fn register<M: prometheus::core::Collector + Clone + 'static>(metric: M) -> M {
    REGISTRY
        .register(Box::new(metric.clone()))
        .expect("metric names are unique constants");
    metric
}

macro_rules! metric {
    ($static:ident: IntCounter = $name:literal, $help:literal) => {
        #[doc = $help]
        pub static $static: LazyLock<IntCounter> =
            LazyLock::new(|| register(IntCounter::new($name, $help).expect("valid metric")));
    };
    ($static:ident: IntGauge = $name:literal, $help:literal) => {
        #[doc = $help]
        pub static $static: LazyLock<IntGauge> =
            LazyLock::new(|| register(IntGauge::new($name, $help).expect("valid metric")));
    };
    ($static:ident: IntCounterVec = $name:literal, $help:literal, $labels:expr) => {
        #[doc = $help]
        pub static $static: LazyLock<IntCounterVec> = LazyLock::new(|| {
            register(IntCounterVec::new(Opts::new($name, $help), $labels).expect("valid metric"))
        });
    };
    ($static:ident: IntGaugeVec = $name:literal, $help:literal, $labels:expr) => {
        #[doc = $help]
        pub static $static: LazyLock<IntGaugeVec> = LazyLock::new(|| {
            register(IntGaugeVec::new(Opts::new($name, $help), $labels).expect("valid metric"))
        });
    };
    ($static:ident: HistogramVec = $name:literal, $help:literal, $labels:expr) => {
        #[doc = $help]
        pub static $static: LazyLock<HistogramVec> = LazyLock::new(|| {
            let opts = HistogramOpts::new($name, $help).buckets(LATENCY_BUCKETS.to_vec());
            register(HistogramVec::new(opts, $labels).expect("valid metric"))
        });
    };
}

/// Seconds, from 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

metric!(HTTP_REQUESTS: IntCounterVec = "unhidra_http_requests_total",
    "HTTP requests by route template, method and status.", &["route", "method", "status"]);
metric!(HTTP_DURATION: HistogramVec = "unhidra_http_request_duration_seconds",
    "HTTP request latency by route template and method.", &["route", "method"]);
metric!(WS_CONNECTIONS: IntGauge = "unhidra_ws_connections", "Open WebSocket connections.");
metric!(WS_FRAMES_IN: IntCounter = "unhidra_ws_frames_received_total",
    "WebSocket frames received from clients.");
metric!(WS_FRAMES_OUT: IntCounter = "unhidra_ws_frames_sent_total",
    "WebSocket frames written to clients.");
metric!(SLOW_CONSUMERS: IntCounter = "unhidra_ws_slow_consumer_disconnects_total",
    "Connections closed because their outbound queue was full.");
metric!(MESSAGES_ACCEPTED: IntCounter = "unhidra_messages_accepted_total",
    "Chat messages accepted by chat-service (durable in its outbox).");
metric!(MESSAGES_PUBLISHED: IntCounter = "unhidra_messages_published_total",
    "Chat messages published to the rooms stream (relayed retries included).");
metric!(MESSAGES_DELIVERED: IntCounter = "unhidra_messages_delivered_total",
    "Message frames queued to member connections by gateways.");
metric!(MESSAGES_STORED: IntCounter = "unhidra_history_messages_stored_total",
    "Room messages committed to history (duplicates excluded).");
metric!(AUDIT_EVENTS_STORED: IntCounter = "unhidra_audit_events_stored_total",
    "Security events committed to the audit log (duplicates excluded).");
metric!(BUS_PUBLISH_DURATION: HistogramVec = "unhidra_bus_publish_duration_seconds",
    "Bus publish latency: `core` publishes, `durable` until the stream stored it.", &["kind"]);
metric!(CONSUMER_PENDING: IntGaugeVec = "unhidra_consumer_pending_messages",
    "Messages a durable consumer has not acknowledged yet (its lag).", &["consumer"]);
metric!(CONSUMER_REDELIVERIES: IntCounterVec = "unhidra_consumer_redeliveries_total",
    "Deliveries to a durable consumer that were not the first attempt.", &["consumer"]);
metric!(DB_POOL_CONNECTIONS: IntGaugeVec = "unhidra_db_pool_connections",
    "Database pool connections by service and state (`in_use`, `idle`).", &["service", "state"]);
metric!(LOGINS: IntCounterVec = "unhidra_logins_total", "Login attempts by outcome.", &["outcome"]);
metric!(TOKENS_ISSUED: IntCounter = "unhidra_tokens_issued_total", "Access tokens issued.");

/// The Prometheus text exposition of every registered metric. Metrics are
/// created on first use; this creates all of them, so a scrape always lists
/// every series family.
pub fn render() -> String {
    for counter in [
        &WS_FRAMES_IN,
        &WS_FRAMES_OUT,
        &SLOW_CONSUMERS,
        &MESSAGES_ACCEPTED,
        &MESSAGES_PUBLISHED,
        &MESSAGES_DELIVERED,
        &MESSAGES_STORED,
        &AUDIT_EVENTS_STORED,
        &TOKENS_ISSUED,
    ] {
        LazyLock::force(counter);
    }
    LazyLock::force(&WS_CONNECTIONS);
    for outcome in ["success", "failure"] {
        LOGINS.with_label_values(&[outcome]);
    }
    LazyLock::force(&HTTP_REQUESTS);
    LazyLock::force(&CONSUMER_REDELIVERIES);
    LazyLock::force(&CONSUMER_PENDING);
    LazyLock::force(&DB_POOL_CONNECTIONS);
    LazyLock::force(&HTTP_DURATION);
    for kind in ["core", "durable"] {
        BUS_PUBLISH_DURATION.with_label_values(&[kind]);
    }
    let mut buffer = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut buffer) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_family_is_exported_with_help() {
        let text = super::render();
        for family in [
            "unhidra_ws_connections",
            "unhidra_messages_accepted_total",
            "unhidra_logins_total",
            "unhidra_tokens_issued_total",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
        }
    }
}
