//! The all-in-one Unhidra: every service in one process, on one listener, with
//! the bus and databases the configuration names (by default the in-process bus
//! and one SQLite file per service under `./data`). The same service code runs
//! here as in the scaled-out deployment.

use std::sync::Arc;

use tokio::net::TcpListener;
use unhidra_core::{
    Config,
    clock::{SharedClock, SystemClock},
};
use unhidra_runtime::ServiceContext;

/// The port of the all-in-one binary (the gateway's).
pub const DEFAULT_PORT: u16 = gateway_service::DEFAULT_PORT;

/// Runs every service on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_on_clock(listener, config, Arc::new(SystemClock), shutdown).await
}

/// [`run`] with `clock` deciding lockouts, blocks and rate-limit windows
/// (tests move it).
pub async fn run_on_clock(
    listener: TcpListener,
    config: Config,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ctx = ServiceContext::connect_with_clock("unhidra", config, clock, shutdown).await?;
    // Responders first (auth-api's JWKS, chat-service's requests), then the
    // consumers and the gateway that depend on them.
    let auth = auth_api::build(ctx.clone(), ctx.open_database(auth_api::NAME).await?).await?;
    let chat =
        chat_service::build(ctx.clone(), ctx.open_database(chat_service::NAME).await?).await?;
    let history =
        history_service::build(ctx.clone(), ctx.open_database(history_service::NAME).await?)
            .await?;
    let audit =
        audit_service::build(ctx.clone(), ctx.open_database(audit_service::NAME).await?).await?;
    let gateway = gateway_service::build(ctx.clone()).await?;
    ctx.serve(listener, vec![auth, chat, history, audit, gateway])
        .await
}
