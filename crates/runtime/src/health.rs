//! `/healthz` (the process runs), `/readyz` (its bus and databases answer;
//! each failing check is named; where rate limits are kept is named too,
//! and a Redis outage leaves the node ready, on local limits) and `/metrics` (the process's registry).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;
use unhidra_bus::Bus;
use unhidra_store::Database;
use unhidra_telemetry::metrics::Metrics;

use crate::Limits;

#[derive(Clone)]
struct Health {
    bus: Arc<dyn Bus>,
    databases: Arc<Vec<(&'static str, Database)>>,
    limits: Limits,
    metrics: Metrics,
}

pub fn routes(
    bus: Arc<dyn Bus>,
    databases: Vec<(&'static str, Database)>,
    limits: Limits,
    metrics: Metrics,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .with_state(Health {
            bus,
            databases: Arc::new(databases),
            limits,
            metrics,
        })
}

/// Liveness: the process runs.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = serde_json::Value)))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the bus and every database of the process answer.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "`{\"status\": \"ready\", \"checks\": {...}}`", body = serde_json::Value),
    (status = 503, description = "`{\"status\": \"not_ready\", \"checks\": {...}}`: the failing checks say `unreachable`", body = serde_json::Value),
))]
async fn readyz(State(health): State<Health>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = health.bus.healthy().await;
    checks.insert(
        "bus".into(),
        json!(if ready { "ok" } else { "unreachable" }),
    );
    for (service, db) in health.databases.iter() {
        let ok = db.ping().await;
        ready &= ok;
        checks.insert(
            format!("database:{service}"),
            json!(if ok { "ok" } else { "unreachable" }),
        );
    }
    checks.insert(
        "rate_limits".into(),
        json!(health.limits.backend().as_str()),
    );
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"status": if ready { "ready" } else { "not_ready" }, "checks": checks});
    (status, Json(body)).into_response()
}

/// The process's metrics, in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain")))]
async fn metrics(State(health): State<Health>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        health.metrics.render(),
    )
        .into_response()
}
