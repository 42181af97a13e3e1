//! Request ids: every HTTP request, WebSocket command and bus message handled
//! runs inside a `request` span carrying `request_id`, so one id ties together
//! the log lines a single action causes in every service. The id travels in
//! the `X-Request-Id` HTTP header and in the `x-request-id` bus header.

use std::sync::Arc;

use tracing::Instrument;

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

/// Runs `work` as part of request `id`: inside its span, with `current()` set.
pub async fn scope<F: Future>(id: String, work: F) -> F::Output {
    let span = tracing::info_span!("request", request_id = %id);
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
    async fn the_current_id_is_scoped() {
        assert_eq!(current(), None);
        let inside = scope("r-1".into(), async { current() }).await;
        assert_eq!(inside.as_deref(), Some("r-1"));
        assert_eq!(current(), None);
    }
}
