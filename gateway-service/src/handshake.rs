//! `GET /ws`: connection attempts per IP, origin and credential (an access
//! token in the subprotocol or `Authorization`, or an `X-API-Key` with the
//! `read` scope) are checked before the upgrade, so a refused client gets a plain HTTP 429, 403 or 401
//! with the usual error body.

use std::sync::Arc;

use axum::{
    Json,
    extract::{
        Query, State,
        rejection::QueryRejection,
        ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};
use unhidra_core::{
    api_keys::ApiScope,
    error::ErrorBody,
    protocol::{BEARER_PROTOCOL_PREFIX, SUBPROTOCOL},
};
use unhidra_runtime::{ApiError, ClientIp, authenticate};

use crate::{Gateway, connection, feeds};

/// `GET /ws?resume=true`: the client will send `resume` first; no live
/// message reaches it before (for at most 10 s), so the replay comes first.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsParams {
    #[serde(default)]
    resume: bool,
}

#[utoipa::path(get, path = "/ws", tag = "websocket", security(("bearer" = []), ("api_key" = [])), params(WsParams), responses(
    (status = 101, description = "Switching to the `unhidra.v1` WebSocket protocol (docs/protocol.md); the token may also come in `Sec-WebSocket-Protocol: unhidra.v1, bearer.<token>`"),
    (status = 400, description = "`websocket_upgrade_required`: authenticated, but not a WebSocket upgrade", body = ErrorBody),
    (status = 403, description = "`forbidden` (origin not allowed), `insufficient_scope` or `ip_blocked`", body = ErrorBody),
    (status = 429, description = "`rate_limited` or `too_many_connections` (`Retry-After`)", body = ErrorBody)))]
pub async fn upgrade(
    State(gateway): State<Arc<Gateway>>,
    ip: ClientIp,
    params: Result<Query<WsParams>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let config = &gateway.ctx.config;
    let params = match params {
        Ok(Query(params)) => params,
        Err(rejection) => return ApiError::Invalid(rejection.body_text()).into_response(),
    };
    let attempts = gateway.limits.connect_ip.as_ref();
    if let Err(refused) = gateway.ctx.limits.enforce(attempts, &ip.key()).await {
        return refused.into_response();
    }
    if !origin_allowed(&headers, &config.allowed_origins) {
        tracing::warn!(origin = ?headers.get(header::ORIGIN), "WebSocket refused: origin not allowed");
        return ApiError::Forbidden("origin not allowed".into()).into_response();
    }
    let auth = match authenticate(&gateway.ctx.verifier, &headers, protocol_token(&headers)).await {
        Ok(auth) if auth.may(ApiScope::Read) => auth,
        Ok(auth) => {
            tracing::info!(user_id = %auth.user, "WebSocket refused: API key without the read scope");
            return ApiError::Denied {
                code: "insufficient_scope",
                message: "receiving needs the `read` scope".into(),
            }
            .into_response();
        }
        Err(e) => {
            tracing::info!(error = %e, "WebSocket refused: credential rejected");
            return e.into_response();
        }
    };
    if let Err(full) = gateway.admission.check(auth.user, &ip) {
        tracing::info!(user_id = %auth.user, client_ip = %ip, "WebSocket refused: too many connections");
        return ApiError::TooManyConnections(full.message()).into_response();
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            let body = ErrorBody {
                error: "websocket_upgrade_required".into(),
                message: rejection.body_text(),
            };
            return (rejection.status(), Json(body)).into_response();
        }
    };
    // Loaded and followed before the client sees the connection open, so
    // that what is sent to its rooms from then on reaches it.
    let loaded_at = feeds::before_loading(&gateway);
    let rooms = match gateway.rooms.rooms_of(auth.user).await {
        Ok(rooms) => rooms,
        Err(e) => {
            tracing::warn!(user_id = %auth.user, error = %e, "WebSocket refused: rooms of user unavailable");
            return ApiError::from(e).into_response();
        }
    };
    let rooms = feeds::pin(&gateway, rooms, loaded_at).await;
    let hard_limit = config.hard_frame_limit();
    upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .read_buffer_size(config.ws_read_buffer_bytes)
        .write_buffer_size(config.ws_write_buffer_bytes)
        .on_upgrade(move |socket| {
            // A task of its own: axum's upgrade task (and what it holds)
            // ends here instead of living as long as the connection.
            let in_flight = gateway.ctx.in_flight.clone();
            in_flight.spawn(connection::serve(
                gateway,
                socket,
                auth,
                &ip,
                params.resume,
                rooms,
            ));
            std::future::ready(())
        })
}

/// The token of a `bearer.<jwt>` entry in `Sec-WebSocket-Protocol`.
fn protocol_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
        .filter(|t| !t.is_empty())
}

/// Clients without `Origin` (not browsers) and same-origin pages are allowed;
/// other origins only if listed (or `*` is).
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, host)| host);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn origins() {
        let listed = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(&headers(&[]), &listed));
        assert!(origin_allowed(
            &headers(&[(header::ORIGIN, "https://app.example/")]),
            &listed
        ));
        assert!(!origin_allowed(
            &headers(&[(header::ORIGIN, "https://evil.example")]),
            &listed
        ));
        assert!(origin_allowed(
            &headers(&[
                (header::ORIGIN, "http://chat.local:9000"),
                (header::HOST, "chat.local:9000")
            ]),
            &[]
        ));
        assert!(origin_allowed(
            &headers(&[(header::ORIGIN, "https://x.example")]),
            &["*".to_owned()]
        ));
    }

    #[test]
    fn token_from_subprotocol() {
        let h = headers(&[(
            header::SEC_WEBSOCKET_PROTOCOL,
            "unhidra.v1, bearer.abc.def.ghi",
        )]);
        assert_eq!(protocol_token(&h), Some("abc.def.ghi"));
        let h = headers(&[(header::SEC_WEBSOCKET_PROTOCOL, "unhidra.v1")]);
        assert_eq!(protocol_token(&h), None);
    }
}
