//! What an operator sees of one real scenario: metrics that moved by exactly
//! the right amounts, and one request id in the gateway, chat and history log
//! lines of one message. Each stack has its own metric registry; this test
//! still has a binary of its own because it captures logs and spans with the
//! process-wide subscriber (a thread-scoped one misses events whose callsite
//! another test's thread registered first: tokio-rs/tracing#3531).

#[allow(dead_code)]
#[path = "e2e/harness.rs"]
mod harness;

use std::{
    collections::HashMap,
    io::Write,
    sync::{Arc, Mutex},
};

use harness::*;
use serde_json::{Value, json};
use tracing_subscriber::{EnvFilter, fmt::MakeWriter, prelude::*};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::ErrorKind::Other)?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn lines(&self) -> Vec<Value> {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The lines, once history-service logged every message of `ids` stored.
    async fn lines_once_stored(&self, ids: &[String]) -> Result<Vec<Value>, Error> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let lines = self.lines();
            if ids.iter().all(|id| stored_request_id(&lines, id).is_ok())
                || tokio::time::Instant::now() > deadline
            {
                return Ok(lines);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// `name{labels}` → value, from the Prometheus text exposition.
async fn scrape(base: &str) -> Result<HashMap<String, f64>, Error> {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

fn request_id_of(line: &Value) -> Option<&str> {
    line["spans"]
        .as_array()?
        .iter()
        .find_map(|span| span["request_id"].as_str())
}

#[tokio::test]
async fn one_scenario_moves_the_metrics_and_shares_one_request_id_across_services() -> TestResult {
    let logs = Captured::default();
    let spans = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    tracing_subscriber::registry()
        .with(unhidra_telemetry::traces::layer_for(&provider))
        .with(EnvFilter::new(
            "info,gateway_service=debug,chat_service=debug,history_service=debug",
        ))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_span_list(true)
                .with_writer(logs.clone()),
        )
        .try_init()?;

    let stack = Embedded::start().await?;
    let base = stack.app.http();
    let api = stack.api();
    let before = scrape(&base).await?;

    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let room = api.create_room(&alice, "public").await?;
    api.join(&bob, &room).await?;
    let mut alice_ws = connect(&stack.app.ws(), &alice.token).await?;
    let mut bob_ws = connect(&stack.app.ws(), &bob.token).await?;
    let mut acked = Vec::new();
    for i in 0..3 {
        send(
            &mut alice_ws,
            json!({"type": "send", "id": format!("m{i}"), "room": room, "body": "hi"}),
        )
        .await?;
        acked.push(str_of(&next_of(&mut alice_ws, "ack").await?, "message_id")?);
    }
    // Alice has read her 3 acks; her 3 own messages and Bob's 3 are read here.
    for _ in 0..3 {
        next_of(&mut bob_ws, "message").await?;
    }
    wait_for_history(&api, &bob, &room, 3).await?;

    let after = scrape(&base).await?;
    for (series, expected) in [
        (r#"unhidra_logins_total{outcome="success"}"#, 2.0),
        ("unhidra_tokens_issued_total", 2.0),
        ("unhidra_messages_accepted_total", 3.0),
        ("unhidra_messages_published_total", 3.0),
        ("unhidra_history_messages_stored_total", 3.0),
        ("unhidra_messages_delivered_total", 6.0),
        ("unhidra_ws_frames_received_total", 3.0),
        ("unhidra_ws_connections", 2.0),
        (
            r#"unhidra_http_requests_total{method="POST",route="/api/v1/auth/register",status="201"}"#,
            2.0,
        ),
        (
            r#"unhidra_http_requests_total{method="POST",route="/api/v1/rooms/{room_id}/join",status="200"}"#,
            1.0,
        ),
        (
            r#"unhidra_http_requests_total{method="GET",route="/ws",status="101"}"#,
            2.0,
        ),
        ("unhidra_audit_events_stored_total", 5.0),
        // Alice waited for each ack before the next send: three requests,
        // each its own group of one message.
        (
            r#"unhidra_bus_request_duration_seconds_count{request="chat.send"}"#,
            3.0,
        ),
        ("unhidra_ws_send_answer_seconds_count", 3.0),
        ("unhidra_group_commit_wait_seconds_count", 3.0),
        ("unhidra_group_commit_duration_seconds_count", 3.0),
        ("unhidra_group_commit_messages_sum", 3.0),
        (r#"unhidra_group_commit_messages_bucket{le="1"}"#, 3.0),
    ] {
        assert_eq!(delta(&before, &after, series), expected, "{series}");
    }
    // Alice's 3 acks and 3 messages, Bob's 3 messages; frames are counted as
    // they are written, so at least these.
    assert!(delta(&before, &after, "unhidra_ws_frames_sent_total") >= 9.0);
    assert!(
        delta(
            &before,
            &after,
            r#"unhidra_bus_publish_duration_seconds_count{kind="durable"}"#
        ) >= 3.0
    );
    assert!(
        after
            .contains_key(r#"unhidra_db_pool_connections{service="history-service",state="idle"}"#)
    );

    // The HTTP response echoes a request id, and keeps one the client sent.
    let response = http()
        .get(format!("{base}/healthz"))
        .header("x-request-id", "ops-check-1")
        .send()
        .await?;
    assert_eq!(
        response.headers().get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"ops-check-1"[..])
    );

    // One message: its history line names a request id that the gateway's and
    // chat-service's lines for the same message carry too. (History may
    // answer a page an instant before its consumer logs the stored lines.)
    let lines = logs.lines_once_stored(&acked).await?;
    let message_id = &acked[1];
    let id = stored_request_id(&lines, message_id)?;
    for service in ["gateway_service", "chat_service"] {
        assert!(
            lines.iter().any(|l| {
                l["target"].as_str().is_some_and(|t| t.starts_with(service))
                    && l["message_id"] == message_id.as_str()
                    && request_id_of(l) == Some(id)
            }),
            "no {service} line with request id {id}"
        );
    }
    // With tracing on, the same message is one trace.
    assert_one_trace(&spans, id, "unhidra")?;

    // Other messages have other ids.
    assert_ne!(stored_request_id(&lines, &acked[0])?, id);
    stack.app.stop().await?;

    // Scaled out, the trace context crosses real NATS in message headers.
    if let Some((message_id, prefix)) = scaled_out_message().await? {
        let lines = logs
            .lines_once_stored(std::slice::from_ref(&message_id))
            .await?;
        let id = stored_request_id(&lines, &message_id)?;
        assert_one_trace(&spans, id, &prefix)?;
    }
    Ok(())
}

/// The request id of history-service's "message stored" line for a message.
fn stored_request_id<'a>(lines: &'a [Value], message_id: &str) -> Result<&'a str, Error> {
    let stored = lines
        .iter()
        .find(|l| l["message"] == "message stored" && l["message_id"] == message_id)
        .ok_or_else(|| format!("no history log line for message {message_id}"))?;
    request_id_of(stored).ok_or_else(|| "history line without request id".into())
}

/// The gateway's frame span, chat-service's request span under it, and
/// history's consumer span under that, all in one trace.
fn assert_one_trace(
    spans: &opentelemetry_sdk::trace::InMemorySpanExporter,
    request_id: &str,
    prefix: &str,
) -> TestResult {
    let finished = spans.get_finished_spans()?;
    let of_message: HashMap<String, &opentelemetry_sdk::trace::SpanData> = finished
        .iter()
        .filter(|span| {
            span.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "request_id" && kv.value.as_str() == request_id)
        })
        .map(|span| (span.name.to_string(), span))
        .collect();
    let gateway = of_message.get("ws frame").ok_or("no gateway span")?;
    let chat = of_message
        .get(&format!("{prefix}.rpc.chat.send"))
        .ok_or("no chat span")?;
    let history = of_message.get("consume history").ok_or("no history span")?;
    let trace_id = gateway.span_context.trace_id();
    assert_eq!(chat.span_context.trace_id(), trace_id);
    assert_eq!(history.span_context.trace_id(), trace_id);
    assert_eq!(chat.parent_span_id, gateway.span_context.span_id());
    assert_eq!(history.parent_span_id, chat.span_context.span_id());
    Ok(())
}

/// Sends one message through the services scaled out over NATS and Postgres
/// (each on its own listener with its own NATS connection); its message id
/// and the bus prefix, or None when NATS or Postgres is missing outside CI.
async fn scaled_out_message() -> Result<Option<(String, String)>, Error> {
    let Some(stack) = Scaled::start().await? else {
        return Ok(None);
    };
    let api = stack.api();
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "public").await?;
    let mut ws = connect(&stack.gateway.ws(), &alice.token).await?;
    send(
        &mut ws,
        json!({"type": "send", "id": "s1", "room": room, "body": "over NATS"}),
    )
    .await?;
    let message_id = str_of(&next_of(&mut ws, "ack").await?, "message_id")?;
    wait_for_history(&api, &alice, &room, 1).await?;
    let prefix = stack.config.bus_prefix.clone();
    stack.stop().await?;
    Ok(Some((message_id, prefix)))
}
