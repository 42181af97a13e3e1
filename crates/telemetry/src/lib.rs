//! Logs, request ids and metrics shared by every Unhidra service: the tracing
//! subscriber (pretty or JSON lines), the `request` span that carries a request
//! id across services, the HTTP middleware, and the Prometheus metrics served
//! at `/metrics`.

pub mod http;
pub mod metrics;
pub mod request_id;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global tracing subscriber; `filter` is a tracing directive such
/// as `info` or `info,chat_service=debug`. JSON lines carry the fields of the
/// enclosing spans (so `request_id`). Calling it twice is harmless.
pub fn init_logging(json: bool, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(fmt::layer().json().flatten_event(true).with_span_list(true))
            .try_init()
    } else {
        registry.with(fmt::layer()).try_init()
    };
    if result.is_err() {
        tracing::debug!("logging was already initialised");
    }
}
