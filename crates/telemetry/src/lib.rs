//! Logs, request ids and metrics shared by every Unhidra service: the tracing
//! subscriber (pretty or JSON lines), the `request` span that carries a request
//! id across services, the HTTP middleware, and the Prometheus metrics served
//! at `/metrics`.

pub mod http;
pub mod metrics;
pub mod request_id;
pub mod traces;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How a process reports: log format and filter, and where traces go.
#[derive(Debug, Clone, Default)]
pub struct Reporting<'a> {
    /// One JSON object per line instead of human-readable lines.
    pub json: bool,
    /// A tracing directive such as `info` or `info,chat_service=debug`.
    pub filter: &'a str,
    /// OTLP/HTTP collector for traces; `None` records no traces at all.
    pub otlp_endpoint: Option<&'a str>,
    /// The `service.name` of exported spans.
    pub service: &'a str,
}

/// Installs the global tracing subscriber. JSON lines carry the fields of the
/// enclosing spans (so `request_id`). Keep the returned guard alive while the
/// process runs: dropping it flushes the last spans.
pub fn init(reporting: &Reporting<'_>) -> anyhow::Result<Option<traces::TracerGuard>> {
    let filter = EnvFilter::try_new(reporting.filter)
        .map_err(|e| anyhow::anyhow!("invalid log filter `{}`: {e}", reporting.filter))?;
    let (otel, guard) = match reporting.otlp_endpoint {
        Some(endpoint) => {
            let (layer, guard) = traces::otlp_layer(endpoint, reporting.service)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if reporting.json {
        registry
            .with(fmt::layer().json().flatten_event(true).with_span_list(true))
            .try_init()?;
    } else {
        registry.with(fmt::layer()).try_init()?;
    }
    Ok(guard)
}
