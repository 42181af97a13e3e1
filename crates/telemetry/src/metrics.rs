//! Every metric Unhidra exports, named once here (`unhidra_` prefix, base units,
//! `_total` for counters) and registered in the process-wide registry.

use std::sync::LazyLock;

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<M: prometheus::core::Collector + Clone + 'static>(metric: M) -> M {
    REGISTRY
        .register(Box::new(metric.clone()))
        .expect("metric names are unique constants");
    metric
}

macro_rules! counter {
    ($static:ident, $name:literal, $help:literal) => {
        #[doc = $help]
        pub static $static: LazyLock<IntCounter> =
            LazyLock::new(|| register(IntCounter::new($name, $help).expect("valid metric name")));
    };
}

counter!(
    WS_FRAMES_IN,
    "unhidra_ws_frames_received_total",
    "WebSocket frames received from clients."
);
counter!(
    WS_FRAMES_OUT,
    "unhidra_ws_frames_sent_total",
    "WebSocket frames queued to clients."
);
counter!(
    SLOW_CONSUMERS,
    "unhidra_ws_slow_consumer_disconnects_total",
    "Connections closed because their outbound queue was full."
);
counter!(
    MESSAGES_ACCEPTED,
    "unhidra_messages_accepted_total",
    "Chat messages accepted and published to the rooms stream."
);
counter!(
    MESSAGES_DELIVERED,
    "unhidra_messages_delivered_total",
    "Message frames handed to member connections by gateways."
);
counter!(
    MESSAGES_STORED,
    "unhidra_history_messages_stored_total",
    "Room events committed to history (duplicates excluded)."
);
counter!(
    AUDIT_EVENTS_STORED,
    "unhidra_audit_events_stored_total",
    "Security events committed to the audit log (duplicates excluded)."
);
counter!(
    TOKENS_ISSUED,
    "unhidra_tokens_issued_total",
    "Access tokens issued."
);

/// Open WebSocket connections.
pub static WS_CONNECTIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new("unhidra_ws_connections", "Open WebSocket connections.")
            .expect("valid metric name"),
    )
});

/// Login attempts by outcome (`success`, `failure`).
pub static LOGINS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("unhidra_logins_total", "Login attempts by outcome."),
            &["outcome"],
        )
        .expect("valid metric name"),
    )
});

/// The Prometheus text exposition of every registered metric.
pub fn render() -> String {
    for metric in [
        &WS_FRAMES_IN,
        &WS_FRAMES_OUT,
        &SLOW_CONSUMERS,
        &MESSAGES_ACCEPTED,
        &MESSAGES_DELIVERED,
        &MESSAGES_STORED,
        &AUDIT_EVENTS_STORED,
        &TOKENS_ISSUED,
    ] {
        LazyLock::force(metric);
    }
    LazyLock::force(&WS_CONNECTIONS);
    LazyLock::force(&LOGINS);
    let mut buffer = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut buffer) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    String::from_utf8(buffer).unwrap_or_default()
}
