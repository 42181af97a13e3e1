//! gateway-service terminates client WebSockets (`GET /ws`, subprotocol
//! `unhidra.v1`): it verifies the access token against the cached JWKS before
//! the upgrade, enforces allowed origins and frame sizes, keeps the registry of
//! its connections, forwards client commands to chat-service over the bus, and
//! fans room events out to the member connections it holds, with one bus
//! subscription per room that a connection here is in ([`feeds`]). Scaled
//! out, it is also the one public entry point: the rest of the API goes to
//! the services that own it ([`proxy`]).

mod admission;
mod budget;
mod connection;
mod fanout;
mod feeds;
mod handshake;
mod metrics;
mod pipeline;
mod presence;
mod proxy;
mod registry;
mod resume;
mod revocations;
mod rooms_of;
mod sends;
mod tail;

/// What `benches/registry.rs` measures, reachable from outside the crate.
/// Not an API.
#[doc(hidden)]
pub mod bench {
    pub use crate::registry::{Outbound, Registry};
}

use std::sync::Arc;

use axum::{Router, routing::get};
use tokio::net::TcpListener;
use unhidra_core::Config;
use unhidra_ratelimit::Limit;
use unhidra_runtime::{ApiState, Service, ServiceContext};

use crate::{admission::Admission, metrics::GatewayMetrics, registry::Registry};

pub const NAME: &str = unhidra_core::bus_access::Role::Gateway.name();
pub const DEFAULT_PORT: u16 = 9000;

/// What every connection of this gateway shares.
struct Gateway {
    ctx: ServiceContext,
    registry: Registry,
    feeds: feeds::Feeds,
    presence: presence::Presence,
    metrics: GatewayMetrics,
    limits: SocketLimits,
    admission: Arc<Admission>,
    rooms: rooms_of::RoomsLoader,
    sends: sends::Sends,
}

/// The WebSocket rate limits (each `None` when set to `off`).
struct SocketLimits {
    connect_ip: Option<Limit>,
    frames: Option<Limit>,
    bytes: Option<Limit>,
    messages: Option<Limit>,
}

/// Subscribes to room events and serves `/ws`.
pub async fn build(ctx: ServiceContext) -> anyhow::Result<Service> {
    let (rooms, loader) = rooms_of::RoomsLoader::start(
        ctx.rpc.clone(),
        ctx.config.bus_timeout(),
        ctx.shutdown.clone(),
    );
    let gateway = Arc::new(Gateway {
        registry: Registry::default(),
        feeds: feeds::Feeds::default(),
        presence: presence::Presence::new(&ctx)?,
        metrics: GatewayMetrics::register(&ctx.metrics)?,
        limits: SocketLimits {
            connect_ip: Limit::new("ws_connect_ip", ctx.config.limit_ws_connect_ip),
            frames: Limit::new("ws_frames", ctx.config.limit_ws_frames),
            bytes: Limit::new("ws_bytes", ctx.config.limit_ws_bytes),
            messages: Limit::new("messages_user", ctx.config.limit_messages_user),
        },
        admission: Arc::new(Admission::new(
            ctx.config.ws_connections_per_user,
            ctx.config.ws_connections_per_ip,
        )),
        rooms,
        sends: sends::Sends::start(ctx.rpc.clone()),
        ctx,
    });
    let fanout = fanout::spawn(Arc::clone(&gateway)).await?;
    let revocations = revocations::spawn(Arc::clone(&gateway)).await?;
    let presence = presence::spawn(Arc::clone(&gateway)).await?;
    let presence_api = Router::new()
        .route("/api/v1/rooms/{room_id}/presence", get(presence::room))
        .with_state(ApiState {
            ctx: gateway.ctx.clone(),
            service: Arc::clone(&gateway),
        });
    let router = Router::new()
        .route("/ws", get(handshake::upgrade))
        .with_state(Arc::clone(&gateway))
        .merge(presence_api);
    let fallback = proxy::Upstreams::from_config(&gateway.ctx.config)?
        .map(|upstreams| Router::new().fallback(proxy::forward).with_state(upstreams));
    Ok(Service {
        name: NAME,
        router,
        openapi: <GatewayDoc as utoipa::OpenApi>::openapi(),
        database: None,
        tasks: vec![fanout, revocations, presence, loader],
        fallback,
    })
}

/// The gateway's part of the OpenAPI document: the WebSocket handshake and
/// room presence.
#[derive(utoipa::OpenApi)]
#[openapi(paths(handshake::upgrade, presence::room))]
struct GatewayDoc;

/// Runs the gateway alone on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ctx = ServiceContext::connect(NAME, config, shutdown).await?;
    let service = build(ctx.clone()).await?;
    ctx.serve(listener, vec![service]).await
}
