//! What the gateway counts, registered with the process registry when the
//! gateway is built.

use prometheus::{Histogram, IntCounter, IntGauge};
use unhidra_telemetry::metrics::{LATENCY_BUCKETS, Metrics};

#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    pub connections: IntGauge,
    pub frames_in: IntCounter,
    pub frames_out: IntCounter,
    pub frames_limited: IntCounter,
    pub send_answers: Histogram,
    pub slow_consumers: IntCounter,
    pub revoked: IntCounter,
    pub delivered: IntCounter,
    pub rooms_followed: IntGauge,
}

impl GatewayMetrics {
    pub fn register(metrics: &Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            connections: metrics.gauge("unhidra_ws_connections", "Open WebSocket connections.")?,
            frames_in: metrics.counter(
                "unhidra_ws_frames_received_total",
                "WebSocket frames received from clients.",
            )?,
            frames_out: metrics.counter(
                "unhidra_ws_frames_sent_total",
                "WebSocket frames written to clients.",
            )?,
            frames_limited: metrics.counter(
                "unhidra_ws_frames_rate_limited_total",
                "WebSocket frames refused with rate_limited (frames or bytes per second).",
            )?,
            send_answers: metrics.histogram(
                "unhidra_ws_send_answer_seconds",
                "Per send frame: from the gateway reading it until its ack or error was ready to write (the wait behind the connection's batch in flight, for a chat.send request, and its round trip).",
                &LATENCY_BUCKETS,
            )?,
            slow_consumers: metrics.counter(
                "unhidra_ws_slow_consumer_disconnects_total",
                "Connections closed because their outbound queue was full.",
            )?,
            revoked: metrics.counter(
                "unhidra_ws_revoked_disconnects_total",
                "Connections closed with 4003 because their session was revoked.",
            )?,
            delivered: metrics.counter(
                "unhidra_messages_delivered_total",
                "Message frames queued to member connections by gateways.",
            )?,
            rooms_followed: metrics.gauge(
                "unhidra_gateway_rooms_followed",
                "Rooms this gateway is subscribed to on the bus: those a connection here is in.",
            )?,
        })
    }
}
