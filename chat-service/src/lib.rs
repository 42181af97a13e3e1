//! chat-service owns rooms and membership: it creates rooms, admits members,
//! and accepts messages from members, giving each the room's next sequence
//! number (gap-free, from 1) and publishing it to the rooms stream through a
//! transactional outbox, so an acknowledged message is never lost.

mod accounts;
mod membership;
mod messages;
mod rooms;
#[cfg(test)]
mod store_conformance;

use axum::{Router, routing::post};
use tokio::net::TcpListener;
use unhidra_core::{
    Config,
    rpc::{ChatSend, Membership, RoomHead, RoomMembers, RoomsOf},
};
use unhidra_runtime::{ApiState, Service, ServiceContext, rpc};
use unhidra_store::{Backend, Database, Migration};

use crate::{
    messages::{GroupCommit, GroupMetrics, MessageMetrics, OutboxRepo},
    rooms::{Caps, RoomRepo},
};

/// What `benches/group_commit.rs` measures, reachable from outside the
/// crate. Not an API.
#[doc(hidden)]
pub mod bench {
    pub use crate::{
        messages::{NewMessage, OutboxRepo},
        rooms::{Caps, Room, RoomRepo},
    };

    /// Opens `url` with chat-service's tables (for the store tests too).
    pub async fn open(url: &str) -> anyhow::Result<unhidra_store::Database> {
        let db = unhidra_store::Database::connect(url, 4).await?;
        db.migrate(crate::NAME, crate::MIGRATIONS).await?;
        Ok(db)
    }
}

pub const NAME: &str = unhidra_core::bus_access::Role::Chat.name();
pub const DEFAULT_PORT: u16 = 9300;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "rooms",
        sql: include_str!("../migrations/0001_rooms.sql"),
        only_on: None,
    },
    Migration {
        version: 2,
        name: "outbox_seq",
        sql: include_str!("../migrations/0002_outbox_seq.sql"),
        only_on: None,
    },
    Migration {
        version: 3,
        name: "room epochs",
        sql: include_str!("../migrations/0003_room_epochs.sql"),
        only_on: None,
    },
    Migration {
        version: 4,
        name: "send keys",
        sql: include_str!("../migrations/0004_send_keys.sql"),
        only_on: None,
    },
    Migration {
        version: 5,
        name: "outbox by room",
        sql: include_str!("../migrations/0005_outbox_by_room.sql"),
        only_on: None,
    },
    Migration {
        version: 6,
        name: "send log",
        sql: include_str!("../migrations/0006_send_log.sql"),
        only_on: Some(Backend::Sqlite),
    },
];

/// chat-service's part of its handlers' state.
#[derive(Clone)]
struct Chat {
    rooms: RoomRepo,
    commits: GroupCommit,
}

type ChatState = ApiState<Chat>;

impl MessageMetrics {
    fn register(ctx: &ServiceContext) -> anyhow::Result<Self> {
        Ok(Self {
            groups: GroupMetrics::register(&ctx.metrics)?,
            published: ctx.metrics.counter(
                "unhidra_messages_published_total",
                "Chat messages published to the rooms stream (relayed retries included).",
            )?,
        })
    }
}

/// chat-service's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(rooms::create, rooms::join, rooms::mine))]
struct ChatDoc;

/// The paths this service answers, as OpenAPI.
pub fn openapi() -> utoipa::openapi::OpenApi {
    <ChatDoc as utoipa::OpenApi>::openapi()
}

/// Migrates, answers the chat requests on the bus, and starts the group
/// commit, the publisher and the outbox relay.
pub async fn build(ctx: ServiceContext, db: Database) -> anyhow::Result<Service> {
    db.migrate(NAME, MIGRATIONS).await?;
    ctx.bus.ensure_stream(&ctx.subjects.rooms_stream()).await?;
    ctx.bus.ensure_stream(&ctx.subjects.audit_stream()).await?;
    let (commits, mut tasks) = GroupCommit::start(
        &ctx,
        OutboxRepo::new(
            db.clone(),
            std::time::Duration::from_secs(ctx.config.send_idempotency_secs),
        ),
        MessageMetrics::register(&ctx)?,
    )
    .await?;
    let state = ChatState {
        ctx: ctx.clone(),
        service: Chat {
            rooms: RoomRepo::new(
                db.clone(),
                Caps {
                    rooms_per_user: ctx.config.max_rooms_per_user,
                    members_per_room: ctx.config.max_members_per_room,
                },
            ),
            commits,
        },
    };
    let send = {
        let state = state.clone();
        rpc::respond::<ChatSend, _, _>(&ctx, NAME, move |request| {
            messages::send(state.clone(), request)
        })
        .await?
    };
    let rooms_of = {
        let state = state.clone();
        rpc::respond::<RoomsOf, _, _>(&ctx, NAME, move |request| {
            membership::rooms_of(state.clone(), request)
        })
        .await?
    };
    let membership = {
        let state = state.clone();
        rpc::respond::<Membership, _, _>(&ctx, NAME, move |request| {
            membership::role(state.clone(), request)
        })
        .await?
    };
    let members = {
        let state = state.clone();
        rpc::respond::<RoomMembers, _, _>(&ctx, NAME, move |request| {
            membership::members(state.clone(), request)
        })
        .await?
    };
    let head = {
        let state = state.clone();
        rpc::respond::<RoomHead, _, _>(&ctx, NAME, move |request| {
            membership::head(state.clone(), request)
        })
        .await?
    };
    let deletions = accounts::spawn(&state).await?;
    let router = Router::new()
        .route("/api/v1/rooms", post(rooms::create).get(rooms::mine))
        .route("/api/v1/rooms/{room_id}/join", post(rooms::join))
        .with_state(state);
    Ok(Service {
        name: NAME,
        router,
        openapi: openapi(),
        database: Some(db),
        tasks: {
            tasks.extend([send, rooms_of, membership, members, head, deletions]);
            tasks
        },
        fallback: None,
    })
}

/// Runs chat-service alone on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    unhidra_runtime::run_service(listener, config, shutdown, NAME, build).await
}
