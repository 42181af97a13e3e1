//! `/healthz` (the process runs), `/readyz` (its bus and databases answer;
//! each failing check is named; where rate limits are kept is named too,
//! and a Redis outage leaves the node ready, on local limits) and `/metrics` (the process's registry).

use std::sync::Arc;

use axum::{Json, Router, http::StatusCode, response::IntoResponse, routing::get};
use serde_json::json;
use unhidra_bus::Bus;
use unhidra_store::Database;
use unhidra_telemetry::metrics::Metrics;

use crate::Limits;

pub fn routes(
    bus: Arc<dyn Bus>,
    databases: Vec<(&'static str, Database)>,
    limits: Limits,
    metrics: Metrics,
) -> Router {
    let databases = Arc::new(databases);
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(move || {
                let bus = Arc::clone(&bus);
                let databases = Arc::clone(&databases);
                let limits = limits.clone();
                async move {
                    let mut checks = serde_json::Map::new();
                    let mut ready = bus.healthy().await;
                    checks.insert("bus".into(), json!(if ready { "ok" } else { "unreachable" }));
                    for (service, db) in databases.iter() {
                        let ok = db.ping().await;
                        ready &= ok;
                        checks.insert(
                            format!("database:{service}"),
                            json!(if ok { "ok" } else { "unreachable" }),
                        );
                    }
                    checks.insert("rate_limits".into(), json!(limits.backend().as_str()));
                    let status = if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let body = json!({"status": if ready { "ready" } else { "not_ready" }, "checks": checks});
                    (status, Json(body))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    metrics.render(),
                )
                    .into_response()
            }),
        )
}
