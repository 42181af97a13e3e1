//! The HTTP middleware of every service: request id (kept from `X-Request-Id`
//! or made, echoed in the response), one log line per request, and the
//! request counter and latency histogram by route template.

use std::{collections::BTreeMap, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, Method},
    middleware::Next,
    response::Response,
};
use prometheus::{HistogramVec, IntCounterVec};

use crate::{metrics::Metrics, request_id};

/// What the middleware counts.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    pub fn register(metrics: &Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            requests: metrics.counter_vec(
                "unhidra_http_requests_total",
                "HTTP requests by route template, method and status.",
                &["route", "method", "status"],
                &[],
            )?,
            duration: metrics.latency_vec(
                "unhidra_http_request_duration_seconds",
                "HTTP request latency by route template and method.",
                &["route", "method"],
                &[],
            )?,
        })
    }
}

/// The middleware; install with `axum::middleware::from_fn_with_state`.
pub async fn track(State(metrics): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = method_label(request.method()).to_owned();
    // The request id and trace context a client may send.
    let mut incoming: BTreeMap<String, String> = [request_id::HEADER, "traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| {
            let value = request.headers().get(name)?.to_str().ok()?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect();
    let id = request_id::accept(incoming.get(request_id::HEADER).map(String::as_str));
    incoming.insert(request_id::HEADER.to_owned(), id.clone());
    let started = Instant::now();
    let name = format!("{method} {route}");
    let mut response = request_id::scope_from(&name, &incoming, async {
        let response = next.run(request).await;
        tracing::info!(
            %method,
            %route,
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "http request"
        );
        response
    })
    .await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    let status = response.status().as_u16().to_string();
    metrics
        .requests
        .with_label_values(&[&route, &method, &status])
        .inc();
    metrics
        .duration
        .with_label_values(&[&route, &method])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The method as a metric label: clients can invent methods, and every label
/// value is a series kept in memory, so unknown ones share `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        let invented = Method::from_bytes(b"BREW").expect("a valid token");
        assert_eq!(method_label(&invented), "other");
    }
}
