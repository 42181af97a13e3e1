//! OpenTelemetry traces. With an OTLP endpoint configured, every `request`
//! span is exported over OTLP/HTTP; the W3C trace context (`traceparent`,
//! `tracestate`) travels in bus headers, so one chat message makes one trace
//! across gateway, chat-service and history-service. Without an endpoint no
//! exporter or propagator is installed and nothing is recorded.

use std::collections::BTreeMap;

use opentelemetry::{
    Context, global,
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Layer, registry::LookupSpan};

/// Keeps the exporter running; flushes buffered spans when dropped.
pub struct TracerGuard(SdkTracerProvider);

impl Drop for TracerGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// A tracing layer exporting spans of `service` to the OTLP/HTTP collector at
/// `endpoint` (`http://collector:4318`), and installs the W3C propagator.
pub fn otlp_layer<S>(endpoint: &str, service: &str) -> anyhow::Result<(impl Layer<S>, TracerGuard)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let endpoint = endpoint.trim_end_matches('/');
    let url = if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    Ok((layer_for(&provider), TracerGuard(provider)))
}

/// A tracing layer recording into `provider` (also how tests capture spans).
pub fn layer_for<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_opentelemetry::layer().with_tracer(provider.tracer("unhidra"))
}

struct Headers<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct ReadHeaders<'a>(&'a BTreeMap<String, String>);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the current span's trace context into outgoing headers.
pub fn inject(headers: &mut BTreeMap<String, String>) {
    let context = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&context, &mut Headers(headers)));
}

/// The trace context incoming headers carry (empty if none).
pub fn extract(headers: &BTreeMap<String, String>) -> Context {
    global::get_text_map_propagator(|p| p.extract(&ReadHeaders(headers)))
}
