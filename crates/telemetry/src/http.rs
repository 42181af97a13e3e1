//! The HTTP middleware of every service: request id (kept from `X-Request-Id`
//! or made, echoed in the response), one log line per request, and the
//! request counter and latency histogram by route template.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::HeaderValue,
    middleware::Next,
    response::Response,
};

use crate::{metrics, request_id};

pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().as_str().to_owned();
    let sent = request
        .headers()
        .get(request_id::HEADER)
        .and_then(|v| v.to_str().ok());
    let id = request_id::accept(sent);
    let started = Instant::now();
    let mut response = request_id::scope(id.clone(), async {
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
    metrics::HTTP_REQUESTS
        .with_label_values(&[&route, &method, &status])
        .inc();
    metrics::HTTP_DURATION
        .with_label_values(&[&route, &method])
        .observe(started.elapsed().as_secs_f64());
    response
}
