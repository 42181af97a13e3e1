//! history-service keeps every room message: a durable consumer of the rooms
//! stream stores each event (acknowledged only after the commit, idempotent on
//! `message_id`), and members read a room's history page by page.

mod pages;
mod recorder;

use axum::{Router, routing::get};
use tokio::net::TcpListener;
use unhidra_core::Config;
use unhidra_runtime::{Service, ServiceContext, consumer};
use unhidra_store::{Database, Migration};

pub const NAME: &str = "history-service";
pub const DEFAULT_PORT: u16 = 9400;

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "messages",
    sql: include_str!("../migrations/0001_messages.sql"),
}];

type HistoryState = unhidra_runtime::ApiState;

/// Migrates and starts the durable consumer of the rooms stream.
pub async fn build(ctx: ServiceContext, db: Database) -> anyhow::Result<Service> {
    db.migrate(NAME, MIGRATIONS).await?;
    ctx.bus.ensure_stream(&ctx.subjects.rooms_stream()).await?;
    let state = HistoryState {
        ctx: ctx.clone(),
        db: db.clone(),
    };
    let recorder = {
        let db = db.clone();
        consumer::spawn_consumer(&ctx, ctx.subjects.history_consumer(), move |delivery| {
            recorder::handle(db.clone(), delivery)
        })
        .await?
    };
    let router = Router::new()
        .route("/api/v1/rooms/{room_id}/messages", get(pages::messages))
        .with_state(state);
    Ok(Service {
        name: NAME,
        router,
        database: Some(db),
        tasks: vec![recorder],
    })
}

/// Runs history-service alone on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    unhidra_runtime::run_service(listener, config, shutdown, NAME, build).await
}
