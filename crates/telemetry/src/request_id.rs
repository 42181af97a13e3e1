//! Request ids and trace context: every HTTP request, WebSocket command and
//! bus message handled runs inside a `request` span carrying `request_id`, so
//! one id ties together the log lines a single action causes in every service,
//! and (with tracing on) one trace holds its spans. The id travels in the
//! `X-Request-Id` HTTP header and the `x-request-id` bus header, the trace
//! context in `traceparent`/`tracestate`.

use std::{collections::BTreeMap, sync::Arc};

use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::traces;

/// Header name, on HTTP and on the bus.
pub const HEADER: &str = "x-request-id";
const MAX_LEN: usize = 128;

tokio::task_local! {
    static CURRENT: Arc<str>;
}

/// A fresh id (a UUIDv7, so ids sort by time).
pub fn generate() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The id a client or peer sent, if it is safe to log and echo; else a new one.
pub fn accept(sent: Option<&str>) -> String {
    match sent {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_LEN
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_owned()
        }
        _ => generate(),
    }
}

/// The id of the request being handled, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(|id| id.to_string()).ok()
}

/// Adds the current request id and trace context to outgoing headers.
pub fn stamp(headers: &mut BTreeMap<String, String>) {
    if let Some(id) = current() {
        headers.entry(HEADER.to_owned()).or_insert(id);
    }
    traces::inject(headers);
}

/// Runs `work` as a new request `id`, in a span called `name`.
pub async fn scope<F: Future>(name: &str, id: String, work: F) -> F::Output {
    run(name, id, None, work).await
}

/// Runs `work` as the continuation of the request whose headers arrived: same
/// request id (or a new one) and, with tracing on, same trace.
pub async fn scope_from<F: Future>(
    name: &str,
    headers: &BTreeMap<String, String>,
    work: F,
) -> F::Output {
    let id = accept(headers.get(HEADER).map(String::as_str));
    run(name, id, Some(traces::extract(headers)), work).await
}

async fn run<F: Future>(
    name: &str,
    id: String,
    parent: Option<opentelemetry::Context>,
    work: F,
) -> F::Output {
    let span = tracing::info_span!("request", otel.name = %name, request_id = %id);
    if let Some(parent) = parent {
        // Fails only when no tracing layer is installed; nothing to link then.
        let _ = span.set_parent(parent);
    }
    CURRENT.scope(Arc::from(id), work.instrument(span)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_are_replaced() {
        assert_eq!(accept(Some("abc-123")), "abc-123");
        for bad in ["", "has space", "new\nline", &"x".repeat(200)] {
            let id = accept(Some(bad));
            assert_ne!(id, bad);
            assert!(uuid::Uuid::parse_str(&id).is_ok());
        }
    }

    #[tokio::test]
    async fn the_current_id_is_scoped_and_stamped() {
        assert_eq!(current(), None);
        let headers = scope("test", "r-1".into(), async {
            let mut headers = BTreeMap::new();
            stamp(&mut headers);
            headers
        })
        .await;
        assert_eq!(headers.get(HEADER).map(String::as_str), Some("r-1"));
        let continued = scope_from("test", &headers, async { current() }).await;
        assert_eq!(continued.as_deref(), Some("r-1"));
        assert_eq!(current(), None);
    }
}
