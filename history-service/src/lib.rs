//! history-service keeps every room message: a durable consumer of the rooms
//! stream stores each event (acknowledged only after the commit, idempotent on
//! `message_id`), and members read a room's history page by page.

mod pages;
mod repo;

use axum::{Router, routing::get};
use tokio::net::TcpListener;
use unhidra_bus::{Headers, Message};
use unhidra_core::{
    Config,
    events::{CommittedMessages, RoomMessage},
    rpc::HistoryRange,
};
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
    only_on: None,
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

    fn decode(&self, message: &Message) -> anyhow::Result<Vec<(Headers, RoomMessage)>> {
        decode(message)
    }

    async fn store(&self, events: &[RoomMessage]) -> anyhow::Result<u64> {
        self.insert(events).await
    }

    fn stored(&self, event: &RoomMessage) {
        tracing::debug!(room_id = %event.room, seq = event.seq, message_id = %event.message_id, "message stored");
    }
}

/// The messages of a delivery from the rooms stream: a batch of accepted
/// messages, or a single one as an Unhidra before batches stored it (a
/// stream upgraded in place may still hold those).
fn decode(message: &Message) -> anyhow::Result<Vec<(Headers, RoomMessage)>> {
    match serde_json::from_slice::<CommittedMessages>(&message.payload) {
        Ok(batch) => Ok(batch
            .messages
            .into_iter()
            .map(|m| (m.headers, m.message))
            .collect()),
        Err(e) => match serde_json::from_slice::<RoomMessage>(&message.payload) {
            Ok(single) => Ok(vec![(message.headers.clone(), single)]),
            Err(_) => Err(e.into()),
        },
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

#[cfg(test)]
mod tests {
    use unhidra_core::{
        events::{CommittedMessage, SCHEMA_VERSION},
        ids::{MessageId, RoomId, UserId},
    };

    use super::*;

    fn message(seq: u64) -> RoomMessage {
        RoomMessage {
            v: SCHEMA_VERSION,
            room: RoomId::new(),
            seq,
            message_id: MessageId::new(),
            sender: UserId::new(),
            body: format!("m{seq}"),
            sent_at: chrono::Utc::now(),
        }
    }

    fn delivered(headers: Headers, payload: Vec<u8>) -> Message {
        Message {
            subject: "p.messages.committed".into(),
            headers,
            payload: payload.into(),
            reply: None,
        }
    }

    #[test]
    fn a_batch_gives_each_message_with_the_headers_of_its_request() -> anyhow::Result<()> {
        let (one, two) = (message(1), message(2));
        let request = Headers::from([("x-request-id".to_owned(), "r1".to_owned())]);
        let batch = CommittedMessages {
            v: SCHEMA_VERSION,
            messages: vec![
                CommittedMessage {
                    headers: request.clone(),
                    message: one.clone(),
                },
                CommittedMessage {
                    headers: Headers::new(),
                    message: two.clone(),
                },
            ],
        };
        let decoded = decode(&delivered(Headers::new(), serde_json::to_vec(&batch)?))?;
        assert_eq!(decoded, [(request, one), (Headers::new(), two)]);
        Ok(())
    }

    #[test]
    fn a_single_message_stored_before_batches_is_still_read() -> anyhow::Result<()> {
        let one = message(1);
        let request = Headers::from([("x-request-id".to_owned(), "r1".to_owned())]);
        let decoded = decode(&delivered(request.clone(), serde_json::to_vec(&one)?))?;
        assert_eq!(decoded, [(request, one)]);
        Ok(())
    }

    #[test]
    fn anything_else_is_refused() {
        for payload in [
            &b"{}"[..],
            b"[]",
            b"not json",
            br#"{"v":1,"messages":[{}]}"#,
        ] {
            let refused = decode(&delivered(Headers::new(), payload.to_vec()));
            assert!(refused.is_err(), "{:?}", String::from_utf8_lossy(payload));
        }
    }
}
