//! One client connection: a reader that handles client frames in order, and a
//! writer that drains the connection's bounded outbound queue and closes the
//! socket (with a documented code) on shutdown, token expiry or slow reading.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt, StreamExt, future::BoxFuture, stream::SplitSink};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use unhidra_authn::Authenticated;
use unhidra_core::{
    api_keys::ApiScope,
    events::{SCHEMA_VERSION, Typing},
    ids::RoomId,
    protocol::{ClientFrame, ErrorCode, ResumePoint, ServerFrame, close, parse_client_frame},
    rpc::{ChatSend, Draft, MAX_SENDS_PER_BATCH, RpcError, RpcReply, SendAccepted, SendBatch},
};
use unhidra_runtime::ClientIp;
use unhidra_telemetry::request_id;

use crate::{
    Gateway,
    budget::{FrameBudget, Verdict},
    feeds,
    metrics::GatewayMetrics,
    pipeline::{Pipeline, error},
    registry::{ConnId, Outbound},
    resume,
};

/// How long a closing connection waits for the client's close frame.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A write that takes longer means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames a connection may have read and not yet been answered.
const MAX_PIPELINE: usize = 1024;
/// Frames written before one flush at most.
const MAX_BURST: u64 = 128;

/// How long a connection that announced a resume waits for it before its
/// rooms' live messages flow anyway.
const RESUME_WAIT: Duration = Duration::from_secs(10);

/// Serves an upgraded connection whose user belonged to `rooms` just before
/// the upgrade.
pub async fn serve(
    gateway: Arc<Gateway>,
    mut socket: WebSocket,
    auth: Authenticated,
    ip: ClientIp,
    resume: bool,
    rooms: feeds::Pinned,
) {
    // Checked before the upgrade; decided here, where two racing handshakes
    // cannot both take the last place.
    let _ticket = match gateway.admission.admit(auth.user, &ip) {
        Ok(ticket) => ticket,
        Err(full) => {
            let frame = CloseFrame {
                code: close::POLICY_VIOLATION,
                reason: Utf8Bytes::from(full.message()),
            };
            let _ = socket.send(Message::Close(Some(frame))).await;
            return;
        }
    };
    gateway.metrics.connections.inc();
    let (sink, mut stream) = socket.split();
    let (outbound, queue) = mpsc::channel(gateway.ctx.config.outbound_queue);
    let slow = CancellationToken::new();
    let done = CancellationToken::new();
    let id = gateway.registry.register(
        auth.user,
        auth.session,
        outbound.clone(),
        slow.clone(),
        resume,
    );
    // The rooms as loaded (and followed) before the upgrade: a message sent
    // to them once the client sees its connection open reaches it.
    gateway.registry.add_rooms(id, rooms.rooms());
    let stale = rooms.may_be_stale();
    drop(rooms);
    gateway.presence.connected(auth.user);
    if resume {
        let gateway = Arc::clone(&gateway);
        gateway.ctx.in_flight.clone().spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(RESUME_WAIT) => gateway.registry.end_awaited_resume(id).await,
                () = gateway.ctx.shutdown.cancelled() => {}
            }
        });
    }
    tracing::debug!(conn = id, user_id = %auth.user, "connected");
    let (expiry, expiry_seen) = watch::channel(auth.expires_at);
    let heard = Arc::new(Heard::new());
    let config = &gateway.ctx.config;
    let writer = tokio::spawn(write(
        sink,
        queue,
        Closers {
            metrics: gateway.metrics.clone(),
            slow,
            done: done.clone(),
            shutdown: gateway.ctx.shutdown.clone(),
            expiry: expiry_seen,
            warn_before: Duration::from_secs(config.token_warning_secs),
            drain: Duration::from_secs(config.drain_secs),
            ping_every: Duration::from_secs(config.ws_ping_secs),
            idle_timeout: Duration::from_secs(config.ws_idle_timeout_secs),
            heard: Arc::clone(&heard),
        },
    ));

    if !stale || confirm_rooms(&gateway, id, &auth).await {
        let connection = Connection {
            id,
            outbound: &outbound,
            expiry: &expiry,
            heard: &heard,
            done: &done,
        };
        read(&gateway, &connection, &mut stream, auth).await;
    } else {
        let _ = outbound
            .send(Outbound::Close(close::TRY_AGAIN_LATER, "rooms unavailable"))
            .await;
    }

    for room in gateway.registry.unregister(id) {
        feeds::update(&gateway, room);
    }
    gateway.presence.disconnected(auth.user);
    drop(outbound);
    done.cancel();
    let _ = writer.await;
    gateway.metrics.connections.dec();
    tracing::debug!(conn = id, user_id = %auth.user, "disconnected");
}

/// Loads the user's rooms again, now that the connection is registered, and
/// makes them the connection's: a join or leave whose event came between
/// the load before the upgrade and the registration is not missed. Only
/// when such an event may have come ([`feeds::Pinned::may_be_stale`]).
async fn confirm_rooms(gateway: &Arc<Gateway>, id: ConnId, auth: &Authenticated) -> bool {
    match gateway.rooms.rooms_of(auth.user).await {
        Ok(rooms) => {
            let left = gateway.registry.set_rooms(id, &rooms);
            for room in left {
                feeds::update(gateway, room);
            }
            feeds::follow_rooms(gateway, &rooms).await;
            true
        }
        Err(e) => {
            tracing::warn!(user_id = %auth.user, error = %e, "rooms of user unavailable");
            false
        }
    }
}

/// Reads frames while earlier ones are answered: sends go to chat-service in
/// batches (one in flight), every answer goes out in arrival order, and
/// reading pauses while `MAX_PIPELINE` frames wait for their answers.
/// What the reader of a connection works with.
struct Connection<'a> {
    id: ConnId,
    outbound: &'a mpsc::Sender<Outbound>,
    /// When the connection's token expires (Unix seconds), for the writer.
    expiry: &'a watch::Sender<i64>,
    /// When the client was last heard from, for the writer.
    heard: &'a Heard,
    done: &'a CancellationToken,
}

async fn read(
    gateway: &Arc<Gateway>,
    connection: &Connection<'_>,
    stream: &mut futures::stream::SplitStream<WebSocket>,
    mut auth: Authenticated,
) {
    let (conn, outbound, done) = (connection.id, connection.outbound, connection.done);
    let mut typed: HashMap<RoomId, tokio::time::Instant> = HashMap::new();
    let mut pipeline = Pipeline::default();
    let mut in_flight: Option<BoxFuture<'static, BatchOutcome>> = None;
    let limits = &gateway.limits;
    let user_key = auth.user.to_string();
    let mut budget = FrameBudget::new(
        limits.frames.as_ref(),
        limits.bytes.as_ref(),
        &gateway.ctx.clock,
    );
    loop {
        for frame in pipeline.take_ready() {
            let Ok(text) = serde_json::to_string(&frame) else {
                continue;
            };
            if outbound
                .send(Outbound::Frame(Utf8Bytes::from(text)))
                .await
                .is_err()
            {
                return;
            }
        }
        if in_flight.is_none() {
            let batch = pipeline.next_batch(MAX_SENDS_PER_BATCH);
            if !batch.is_empty() {
                in_flight = Some(submit(gateway, &auth, batch));
            }
        }
        let answered = async {
            match in_flight.as_mut() {
                Some(call) => call.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = done.cancelled() => return drain(stream).await,
            outcome = answered => {
                in_flight = None;
                pipeline.complete(outcome);
            }
            next = stream.next(), if pipeline.len() < MAX_PIPELINE => {
                connection.heard.now();
                match next {
                None | Some(Ok(Message::Close(_))) => return,
                Some(Err(e)) => {
                    tracing::info!(user_id = %auth.user, error = %e, "WebSocket read failed");
                    let _ = outbound
                        .send(Outbound::Close(
                            close::TOO_BIG,
                            "frame too large or malformed",
                        ))
                        .await;
                    return;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(message)) => {
                    gateway.metrics.frames_in.inc();
                    let size = match &message {
                        Message::Text(text) => text.len(),
                        Message::Binary(bytes) => bytes.len(),
                        _ => 0,
                    };
                    match budget.take(size) {
                        Verdict::Accept => {}
                        Verdict::Refuse(retry_after) => {
                            gateway.metrics.frames_limited.inc();
                            pipeline.push_ready(rate_limited(None, retry_after, "frames"));
                            continue;
                        }
                        Verdict::Close => {
                            tracing::info!(user_id = %auth.user, "WebSocket closed: kept sending past its rate limit");
                            let _ = outbound
                                .send(Outbound::Close(close::POLICY_VIOLATION, "rate limit exceeded"))
                                .await;
                            return drain(stream).await;
                        }
                    }
                    match message {
                        Message::Text(text) => {
                            let max_frame = gateway.ctx.config.max_frame_bytes;
                            match accept_frame(&mut pipeline, &auth, text.as_str(), max_frame) {
                                Some(Command::Send(draft)) => match over_message_limit(gateway, &user_key).await {
                                    None => pipeline.push_send(draft),
                                    Some(retry_after) => {
                                        pipeline.push_ready(rate_limited(Some(draft.id), retry_after, "messages"));
                                    }
                                },
                                Some(Command::Resume(rooms)) => {
                                    let resume = resume::run(Arc::clone(gateway), conn, auth, rooms, outbound.clone());
                                    gateway.ctx.in_flight.spawn(resume);
                                }
                                Some(Command::Typing(room)) => {
                                    if let Err(refused) = typing(gateway, conn, &auth, room, &mut typed).await {
                                        pipeline.push_ready(refused);
                                    }
                                }
                                Some(Command::Refresh { id, token }) => {
                                    let answer = match refresh(gateway, conn, &mut auth, &token).await {
                                        Ok(expires_at) => {
                                            connection.expiry.send_replace(expires_at);
                                            ServerFrame::Refreshed { id, expires_at }
                                        }
                                        Err((code, message)) => error(id, code, &message),
                                    };
                                    pipeline.push_ready(answer);
                                }
                                None => {}
                            }
                        }
                        _ => pipeline.push_ready(error(
                            None,
                            ErrorCode::InvalidFrame,
                            "binary frames are not supported; send JSON text",
                        )),
                    }
                }
            }},
        }
    }
}

type BatchOutcome = Result<Vec<RpcReply<SendAccepted>>, RpcError>;

/// Sends a batch to chat-service, as one request with its own request id.
fn submit(
    gateway: &Gateway,
    auth: &Authenticated,
    sends: Vec<Draft>,
) -> BoxFuture<'static, BatchOutcome> {
    let rpc = gateway.ctx.rpc.clone();
    let user = auth.user;
    let rooms: Vec<RoomId> = sends.iter().map(|d| d.room).collect();
    let batch = SendBatch {
        v: SCHEMA_VERSION,
        user,
        sends,
    };
    Box::pin(request_id::scope(
        "ws frame",
        request_id::generate(),
        async move {
            let outcome = rpc.call::<ChatSend>(&batch).await;
            for (room, reply) in rooms.iter().zip(outcome.iter().flatten()) {
                if let RpcReply::Ok(accepted) = reply {
                    tracing::debug!(
                        user_id = %user,
                        room_id = %room,
                        seq = accepted.seq,
                        message_id = %accepted.message_id,
                        "message sent"
                    );
                }
            }
            outcome
        },
    ))
}

/// What a text frame asks for beyond an immediate answer.
enum Command {
    Send(Draft),
    Resume(BTreeMap<RoomId, ResumePoint>),
    Refresh { id: Option<String>, token: String },
    Typing(RoomId),
}

/// A connection relays at most one typing indicator per room this often;
/// more are dropped (they carry nothing new).
const TYPING_EVERY: Duration = Duration::from_secs(1);

/// Relays a typing indicator of the connection's user to `room`'s members,
/// unless one went out less than [`TYPING_EVERY`] ago.
async fn typing(
    gateway: &Gateway,
    conn: ConnId,
    auth: &Authenticated,
    room: RoomId,
    last: &mut HashMap<RoomId, tokio::time::Instant>,
) -> Result<(), ServerFrame> {
    if !gateway.registry.in_room(conn, room) {
        return Err(error(
            None,
            ErrorCode::Forbidden,
            "not a member of this room",
        ));
    }
    let now = tokio::time::Instant::now();
    if last
        .get(&room)
        .is_some_and(|at| now.duration_since(*at) < TYPING_EVERY)
    {
        return Ok(());
    }
    last.retain(|_, at| now.duration_since(*at) < TYPING_EVERY);
    last.insert(room, now);
    let event = Typing {
        v: SCHEMA_VERSION,
        room,
        user: auth.user,
    };
    let subject = gateway.ctx.subjects.room_typing(room);
    if let Err(e) = gateway.ctx.announce(&subject, &event).await {
        tracing::debug!(%room, error = %e, "typing indicator not relayed");
    }
    Ok(())
}

/// Replaces the connection's access token with `token`, verified like a new
/// connection's and of the same user; when the connection now expires.
async fn refresh(
    gateway: &Gateway,
    conn: ConnId,
    auth: &mut Authenticated,
    token: &str,
) -> Result<i64, (ErrorCode, String)> {
    if auth.is_api_key() {
        return Err((
            ErrorCode::Forbidden,
            "a connection opened with an API key is not refreshed".into(),
        ));
    }
    let fresh = gateway
        .ctx
        .verifier
        .verify(token)
        .await
        .map_err(|e| (ErrorCode::InvalidToken, e.to_string()))?;
    if fresh.user != auth.user {
        tracing::warn!(user_id = %auth.user, "refresh with another user's token refused");
        return Err((ErrorCode::Forbidden, "the token is another user's".into()));
    }
    *auth = fresh;
    gateway.registry.set_session(conn, fresh.session);
    tracing::debug!(conn, user_id = %auth.user, expires_at = auth.expires_at, "token refreshed");
    Ok(fresh.expires_at)
}

/// Answers a text frame at once, or hands back the command it holds.
fn accept_frame(
    pipeline: &mut Pipeline,
    auth: &Authenticated,
    text: &str,
    max_frame: usize,
) -> Option<Command> {
    if text.len() > max_frame {
        pipeline.push_ready(error(
            None,
            ErrorCode::TooLarge,
            &format!("frame is {} bytes; the limit is {max_frame}", text.len()),
        ));
        return None;
    }
    match parse_client_frame(text) {
        Ok(ClientFrame::Ping { id }) => pipeline.push_ready(ServerFrame::Pong { id }),
        Ok(ClientFrame::Send { id, .. }) if !auth.may(ApiScope::Write) => {
            pipeline.push_ready(error(
                Some(id),
                ErrorCode::Forbidden,
                "this API key lacks the `write` scope",
            ));
        }
        Ok(ClientFrame::Send { id, room, body }) => {
            return Some(Command::Send(Draft { id, room, body }));
        }
        Ok(ClientFrame::Resume { rooms }) => return Some(Command::Resume(rooms)),
        Ok(ClientFrame::Refresh { id, token }) => return Some(Command::Refresh { id, token }),
        Ok(ClientFrame::Typing { room }) => return Some(Command::Typing(room)),
        Err(e) => {
            tracing::debug!(user_id = %auth.user, code = ?e.code, "frame refused");
            pipeline.push_ready(e.into());
        }
    }
    None
}

/// When the user may send again, if they are over their messages per
/// second across all their connections (on every gateway, through Redis
/// when it is configured).
async fn over_message_limit(gateway: &Gateway, user_key: &str) -> Option<Duration> {
    let limit = gateway.limits.messages.as_ref()?;
    let decision = gateway.ctx.limits.check(limit, user_key, 1).await;
    (!decision.allowed).then_some(decision.retry_after)
}

fn rate_limited(id: Option<String>, retry_after: Duration, what: &str) -> ServerFrame {
    let millis = u64::try_from(retry_after.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    ServerFrame::Error {
        id,
        code: ErrorCode::RateLimited,
        message: format!("too many {what}; retry in {millis} ms"),
        retry_after_ms: Some(millis),
    }
}

/// After the server sent its close frame: reads (and drops) what the client
/// still sends until its close frame, so the TCP connection ends cleanly and
/// the client reads the close code instead of a reset.
async fn drain(stream: &mut futures::stream::SplitStream<WebSocket>) {
    let until_close = async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, until_close).await;
}

struct Closers {
    metrics: GatewayMetrics,
    slow: CancellationToken,
    done: CancellationToken,
    shutdown: CancellationToken,
    /// On shutdown the connection closes within this long, at a random
    /// moment, so that not all clients reconnect at once.
    drain: Duration,
    /// Pings go out this often; nothing heard from the client for
    /// `idle_timeout` closes the connection.
    ping_every: Duration,
    idle_timeout: Duration,
    /// When the reader last heard from the client.
    heard: Arc<Heard>,
    /// When the connection's token expires (Unix seconds); a refresh moves it.
    expiry: watch::Receiver<i64>,
    /// How long before the expiry `token_expiring` goes out.
    warn_before: Duration,
}

/// When the client was last heard from (any frame, pongs included).
struct Heard {
    started: tokio::time::Instant,
    /// Milliseconds after `started`.
    at_ms: std::sync::atomic::AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            at_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn since(&self) -> Duration {
        let at = Duration::from_millis(self.at_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.started.elapsed().saturating_sub(at)
    }
}

/// How long until `at` (Unix seconds).
fn until(at: i64) -> Duration {
    Duration::from_secs(u64::try_from(at - chrono::Utc::now().timestamp()).unwrap_or(0))
}

async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outbound>,
    closers: Closers,
) {
    let mut closers = closers;
    let mut expires_at = *closers.expiry.borrow_and_update();
    let expired = tokio::time::sleep(until(expires_at));
    let warning = tokio::time::sleep(until(expires_at).saturating_sub(closers.warn_before));
    tokio::pin!(expired, warning);
    let mut warned = false;
    let mut refreshable = true;
    let mut pings = tokio::time::interval(closers.ping_every);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pings.tick().await;
    let restart = tokio::time::sleep(Duration::MAX);
    tokio::pin!(restart);
    let mut draining = false;
    let close_with = loop {
        tokio::select! {
            biased;
            () = closers.slow.cancelled() => break Some((close::SLOW_CONSUMER, "slow consumer")),
            () = closers.shutdown.cancelled(), if !draining => {
                draining = true;
                let at = closers.drain.mul_f64(rand::random::<f64>());
                restart.as_mut().reset(tokio::time::Instant::now() + at);
            }
            () = &mut restart, if draining => break Some((close::SERVICE_RESTART, "service restart")),
            _ = pings.tick() => {
                if closers.heard.since() > closers.idle_timeout {
                    break Some((close::IDLE_TIMEOUT, "idle timeout"));
                }
                let ping = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Ping(Default::default()))).await;
                if !matches!(ping, Ok(Ok(()))) {
                    break None;
                }
            }
            () = &mut expired => break Some((close::TOKEN_EXPIRED, "token expired")),
            changed = closers.expiry.changed(), if refreshable => match changed {
                Ok(()) => {
                    expires_at = *closers.expiry.borrow_and_update();
                    let now = tokio::time::Instant::now();
                    expired.as_mut().reset(now + until(expires_at));
                    warning.as_mut().reset(now + until(expires_at).saturating_sub(closers.warn_before));
                    warned = false;
                }
                Err(_) => refreshable = false,
            },
            () = &mut warning, if !warned => {
                warned = true;
                let Ok(text) = serde_json::to_string(&ServerFrame::TokenExpiring { expires_at }) else {
                    continue;
                };
                let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(text.into()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    break None;
                }
            }
            next = queue.recv() => match next {
                Some(Outbound::Frame(text)) => {
                    // Frames queued meanwhile go out with this one, in one flush.
                    let mut then_close = None;
                    let burst = async {
                        sink.feed(Message::Text(text)).await?;
                        let mut written = 1;
                        while written < MAX_BURST {
                            match queue.try_recv() {
                                Ok(Outbound::Frame(text)) => {
                                    sink.feed(Message::Text(text)).await?;
                                    written += 1;
                                }
                                Ok(Outbound::Close(code, reason)) => {
                                    then_close = Some((code, reason));
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        sink.flush().await?;
                        Ok::<u64, axum::Error>(written)
                    };
                    match tokio::time::timeout(WRITE_TIMEOUT, burst).await {
                        Ok(Ok(written)) => {
                            closers.metrics.frames_out.inc_by(written);
                            if then_close.is_some() {
                                break then_close;
                            }
                        }
                        Ok(Err(_)) => break None,
                        // The client stopped reading; its socket buffers are full.
                        Err(_) => {
                            closers.metrics.slow_consumers.inc();
                            break Some((close::SLOW_CONSUMER, "slow consumer"));
                        }
                    }
                }
                Some(Outbound::Close(code, reason)) => break Some((code, reason)),
                None => break None,
            },
            () = closers.done.cancelled(), if queue.is_empty() => break None,
        }
    };
    if let Some((code, reason)) = close_with {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = tokio::time::timeout(
            CLOSE_HANDSHAKE_TIMEOUT,
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, sink.close()).await;
    // Tells the reader to stop, if the writer stopped first.
    closers.done.cancel();
}
