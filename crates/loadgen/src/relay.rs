//! The reference: a bare broadcast relay on tokio-tungstenite with a 4 KiB
//! read buffer. It speaks just enough of `unhidra.v1` for the scenarios (a
//! `send` is acked and broadcast to the room's connections as a `message`
//! frame, serialised once; a `ping` gets its `pong`), with no authentication,
//! storage or ordering guarantees: what this machine can do, for Unhidra's
//! figures to be stated against. A connection names its rooms in the query: `/ws?rooms=<id>,<id>`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::{SinkExt, StreamExt};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_tungstenite::tungstenite::{
    Message, Utf8Bytes,
    handshake::server::{Request, Response},
    http::HeaderValue,
    protocol::WebSocketConfig,
};
use unhidra_core::{
    ids::{MessageId, RoomId, UserId},
    protocol::{ClientFrame, SUBPROTOCOL, ServerFrame, parse_client_frame},
};

type Rooms = Arc<Mutex<HashMap<RoomId, Vec<mpsc::Sender<Utf8Bytes>>>>>;

/// Serves the relay on `listener` until the process ends; with `drop_every`,
/// every Nth delivery is dropped (to test that the loadgen notices).
pub async fn serve(listener: TcpListener, drop_every: Option<u64>) -> anyhow::Result<()> {
    let rooms: Rooms = Arc::default();
    let deliveries = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let rooms = Arc::clone(&rooms);
        let dropper = drop_every.map(|n| (n, Arc::clone(&deliveries)));
        tokio::spawn(async move {
            if let Err(e) = connection(stream, rooms, dropper).await {
                eprintln!("relay connection: {e}");
            }
        });
    }
}

// The handshake callback's error type (an HTTP response) is tungstenite's.
#[allow(clippy::result_large_err)]
async fn connection(
    stream: tokio::net::TcpStream,
    rooms: Rooms,
    dropper: Option<(u64, Arc<AtomicU64>)>,
) -> anyhow::Result<()> {
    let mut joined: Vec<RoomId> = Vec::new();
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096);
    let socket = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |request: &Request, mut response: Response| {
            joined = request
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("rooms="))
                .map(|list| list.split(',').filter_map(|r| r.parse().ok()).collect())
                .unwrap_or_default();
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(SUBPROTOCOL),
            );
            Ok(response)
        },
        Some(config),
    )
    .await?;
    let (mut sink, mut stream) = socket.split();
    let (outbound, mut queue) = mpsc::channel::<Utf8Bytes>(1024);
    if let Ok(mut rooms) = rooms.lock() {
        for room in &joined {
            rooms.entry(*room).or_default().push(outbound.clone());
        }
    }
    let writer = tokio::spawn(async move {
        while let Some(text) = queue.recv().await {
            if sink.send(Message::Text(text)).await.is_err() {
                break;
            }
        }
    });
    let sender = UserId::new();
    let mut seqs: HashMap<RoomId, u64> = HashMap::new();
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let (id, room, body) = match parse_client_frame(text.as_str()) {
            Ok(ClientFrame::Send { id, room, body }) => (id, room, body),
            Ok(ClientFrame::Ping { id }) => {
                let pong = serde_json::to_string(&ServerFrame::Pong { id })?;
                if outbound.send(Utf8Bytes::from(pong)).await.is_err() {
                    break;
                }
                continue;
            }
            // The bare relay keeps no history to replay and no tokens.
            Ok(
                ClientFrame::Resume { .. }
                | ClientFrame::Refresh { .. }
                | ClientFrame::Typing { .. },
            )
            | Err(_) => continue,
        };
        let seq = seqs.entry(room).or_default();
        *seq += 1;
        let message_id = MessageId::new();
        let frame = ServerFrame::Message {
            room,
            seq: *seq,
            message_id,
            sender,
            body,
            sent_at: chrono::Utc::now(),
        };
        let frame = Utf8Bytes::from(serde_json::to_string(&frame)?);
        let members = rooms
            .lock()
            .map(|rooms| rooms.get(&room).cloned().unwrap_or_default())
            .unwrap_or_default();
        for member in members {
            if let Some((n, count)) = &dropper {
                if count.fetch_add(1, Ordering::Relaxed) % n == n - 1 {
                    continue;
                }
            }
            let _ = member.try_send(frame.clone());
        }
        let ack = ServerFrame::Ack {
            id,
            room,
            seq: *seq,
            message_id,
        };
        if outbound
            .send(Utf8Bytes::from(serde_json::to_string(&ack)?))
            .await
            .is_err()
        {
            break;
        }
    }
    if let Ok(mut rooms) = rooms.lock() {
        for room in &joined {
            if let Some(members) = rooms.get_mut(room) {
                members.retain(|m| !m.same_channel(&outbound));
            }
        }
    }
    drop(outbound);
    let _ = writer.await;
    Ok(())
}
