//! history-service keeps every room message: a durable consumer of the rooms
//! stream stores each event (acknowledged only after the commit, idempotent on
//! `message_id`), and members read a room's history page by page.

mod pages;
mod repo;

use axum::{Router, routing::get};
use tokio::net::TcpListener;
use unhidra_core::{Config, events::RoomMessage, rpc::HistoryRange};
use unhidra_runtime::recorder::Record;
use unhidra_runtime::{ApiState, Service, ServiceContext, recorder, rpc};
use unhidra_store::{Database, Migration};

use crate::repo::HistoryRepo;

pub const NAME: &str = unhidra_core::bus_access::Role::History.name();
pub const DEFAULT_PORT: u16 = 9400;

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "messages",
    sql: include_str!("../migrations/0001_messages.sql"),
}];

type HistoryState = ApiState<HistoryRepo>;

/// history-service's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(pages::messages))]
struct HistoryDoc;

/// The paths this service answers, as OpenAPI.
pub fn openapi() -> utoipa::openapi::OpenApi {
    <HistoryDoc as utoipa::OpenApi>::openapi()
}

/// Migrates and starts the durable consumer of the rooms stream.
pub async fn build(ctx: ServiceContext, db: Database) -> anyhow::Result<Service> {
    db.migrate(NAME, MIGRATIONS).await?;
    ctx.bus.ensure_stream(&ctx.subjects.rooms_stream()).await?;
    let history = HistoryRepo::new(db.clone());
    let stored = ctx.metrics.counter(
        "unhidra_history_messages_stored_total",
        "Room messages committed to history (duplicates excluded).",
    )?;
    let recorder = recorder::spawn_recorder(
        &ctx,
        ctx.subjects.history_consumer(),
        stored,
        history.clone(),
    )
    .await?;
    let ranges = {
        let history = history.clone();
        rpc::respond::<HistoryRange, _, _>(&ctx, NAME, move |request| {
            let history = history.clone();
            async move { pages::range(&history, &request).await }
        })
        .await?
    };
    let state = HistoryState {
        ctx: ctx.clone(),
        service: history,
    };
    let router = Router::new()
        .route("/api/v1/rooms/{room_id}/messages", get(pages::messages))
        .with_state(state);
    Ok(Service {
        name: NAME,
        router,
        openapi: openapi(),
        database: Some(db),
        tasks: vec![recorder, ranges],
        fallback: None,
    })
}

impl Record for HistoryRepo {
    type Event = RoomMessage;

    async fn store(&self, events: &[RoomMessage]) -> anyhow::Result<u64> {
        self.insert(events).await
    }

    fn stored(&self, event: &RoomMessage) {
        tracing::debug!(room_id = %event.room, seq = event.seq, message_id = %event.message_id, "message stored");
    }
}

/// Runs history-service alone on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    unhidra_runtime::run_service(listener, config, shutdown, NAME, build).await
}
