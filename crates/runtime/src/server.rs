//! The HTTP server of every service: hyper with a timer, so that a client
//! that sends its headers (or WebSocket handshake) too slowly is cut off at
//! `http_header_timeout_secs` (axum's `serve` has no timer, which left every
//! port open to slowloris); HTTP/1.1 with upgrades and HTTP/2, in clear or
//! over TLS ([`Tls`], whose handshake has the same deadline); each request
//! knows its peer address (`ConnectInfo`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    BoxError, Router,
    body::Body,
    error_handling::HandleErrorLayer,
    extract::{ConnectInfo, DefaultBodyLimit, Request as AxumRequest, State},
    http::{Request, header::CONTENT_LENGTH},
    middleware::Next,
    response::{IntoResponse, Response},
};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, ServiceExt, limit::GlobalConcurrencyLimitLayer};
use unhidra_core::Config;

use crate::{ApiError, Limits, tls::Tls};

/// How long the server pauses accepting when the process is out of file
/// descriptors, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` (over `tls` when given) until `shutdown`,
/// then lets open requests finish (upgraded WebSockets are on their own by
/// then).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Small frames (acks, messages) go out at once instead of waiting
        // for the peer's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let service = router
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request.map(Body::new)
            });
        let Some(tls) = &tls else {
            let connection = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(tcp),
                    TowerToHyperService::new(service),
                )
                .into_owned();
            tokio::spawn(finish(graceful.watch(connection), peer));
            continue;
        };
        let (acceptor, builder, watcher) = (tls.acceptor(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake too slow");
                    return;
                }
            };
            let connection = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(stream),
                    TowerToHyperService::new(service),
                )
                .into_owned();
            finish(watcher.watch(connection), peer).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn finish<E: std::fmt::Display>(
    connection: impl Future<Output = Result<(), E>>,
    peer: SocketAddr,
) {
    if let Err(e) = connection.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// What every API route (not the health and metrics routes) goes through,
/// outermost first: the client address and per-IP budget
/// ([`crate::limits::edge`]), the general body limit, then a process-wide
/// concurrency limit that answers 503 at once when full, and the request
/// timeout (408).
pub fn guard_api(router: Router, config: &Config, limits: Limits) -> Router {
    let capacity = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refusal))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(
            config.http_max_concurrent_requests,
        ))
        .timeout(Duration::from_secs(config.http_request_timeout_secs));
    body_limit(router.layer(capacity), config.http_body_limit_bytes).layer(
        axum::middleware::from_fn_with_state(limits, crate::limits::edge),
    )
}

async fn refusal(error: BoxError) -> ApiError {
    if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::Timeout
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Overloaded {
            message: "the server is at capacity; retry shortly".to_owned(),
            retry_after: Duration::from_secs(1),
        }
    } else {
        ApiError::Unexpected(anyhow::anyhow!(error))
    }
}

/// Bounds the request bodies of `router` to `max` bytes: a declared length
/// over it is refused (413) before any of the body is read, and a body
/// streamed without a length stops being read at the limit.
pub fn body_limit<S: Clone + Send + Sync + 'static>(router: Router<S>, max: usize) -> Router<S> {
    router
        .layer(DefaultBodyLimit::max(max))
        .layer(axum::middleware::from_fn_with_state(
            max,
            refuse_declared_length,
        ))
}

async fn refuse_declared_length(
    State(max): State<usize>,
    request: AxumRequest,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > max as u64 => ApiError::TooLarge(format!(
            "the body is {length} bytes; this route accepts at most {max}"
        ))
        .into_response(),
        _ => next.run(request).await,
    }
}
