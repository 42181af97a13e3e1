//! One client connection, served by one task: it reads the client's frames
//! in order (sends go to chat-service in batches while later frames are
//! read), writes their answers in the same order, writes what the registry
//! queues for the connection (room events, presence, a close), pings, and
//! closes the socket with a documented code on shutdown, token expiry,
//! silence or slow reading. One task and no split socket keep an idle
//! connection small.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::Arc,
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt, StreamExt, future::BoxFuture};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use unhidra_authn::Authenticated;
use unhidra_core::{
    api_keys::ApiScope,
    events::{SCHEMA_VERSION, Typing},
    ids::{RoomId, UserId},
    protocol::{ClientFrame, ErrorCode, ResumePoint, ServerFrame, close, parse_client_frame},
    rpc::{Draft, MAX_SENDS_PER_BATCH},
};
use unhidra_runtime::ClientIp;

use crate::{
    Gateway,
    admission::Ticket,
    budget::{FrameBudget, Verdict},
    feeds,
    metrics::GatewayMetrics,
    pipeline::{Pipeline, error},
    registry::{ConnId, Outbound},
    resume, sends,
};

/// How long a closing connection waits for the client's close frame.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A write that takes longer means the client stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames a connection may have read and not yet been answered.
const MAX_PIPELINE: usize = 1024;
/// Queued frames written before one flush at most.
const MAX_BURST: u64 = 128;

/// How long a connection that announced a resume waits for it before its
/// rooms' live messages flow anyway.
const RESUME_WAIT: Duration = Duration::from_secs(10);

/// How a connection ends: the close frame the server sends (code and
/// reason), or `None` when the socket failed or the client closed it.
type Ending = Option<(u16, &'static str)>;

const SLOW_CONSUMER: Ending = Some((close::SLOW_CONSUMER, "slow consumer"));

/// Serves an upgraded connection whose user belonged to `rooms` just before
/// the upgrade: registers it at once and returns the future that serves it
/// (to be spawned as the connection's one task, which holds little more
/// than the [`Connection`]).
pub fn serve(
    gateway: Arc<Gateway>,
    socket: WebSocket,
    auth: Authenticated,
    ip: &ClientIp,
    resume: bool,
    rooms: feeds::Pinned,
) -> impl Future<Output = ()> + Send + 'static {
    // Checked before the upgrade; decided here, where two racing handshakes
    // cannot both take the last place.
    let mut admitted = match gateway.admission.admit(auth.user, ip) {
        Ok(ticket) => Ok(Connection::open(
            gateway, socket, auth, resume, rooms, ticket,
        )),
        Err(full) => Err((socket, full.message())),
    };
    async move {
        match &mut admitted {
            Ok(connection) => connection.serve().await,
            Err((socket, message)) => {
                let frame = CloseFrame {
                    code: close::POLICY_VIOLATION,
                    reason: Utf8Bytes::from(std::mem::take(message)),
                };
                let _ = socket.send(Message::Close(Some(frame))).await;
            }
        }
    }
}

/// Loads the user's rooms again, now that the connection is registered, and
/// makes them the connection's: a join or leave whose event came between
/// the load before the upgrade and the registration is not missed. Only
/// when such an event may have come ([`feeds::Pinned::may_be_stale`]).
async fn confirm_rooms(gateway: &Arc<Gateway>, id: ConnId, user: UserId) -> bool {
    match gateway.rooms.rooms_of(user).await {
        Ok(rooms) => {
            let left = gateway.registry.set_rooms(id, &rooms);
            for room in left {
                feeds::update(gateway, room);
            }
            feeds::follow_rooms(gateway, &rooms).await;
            true
        }
        Err(e) => {
            tracing::warn!(user_id = %user, error = %e, "rooms of user unavailable");
            false
        }
    }
}

/// A connection and what its task keeps between frames.
struct Connection {
    gateway: Arc<Gateway>,
    /// Its place among the user's and the address's connections.
    _ticket: Ticket,
    id: ConnId,
    /// Whether the rooms loaded before the upgrade may have changed since.
    stale: bool,
    socket: WebSocket,
    /// What the registry (and resumes) queue for the client.
    queue: mpsc::Receiver<Outbound>,
    /// Cancelled by the registry when the queue overflowed.
    slow: CancellationToken,
    auth: Authenticated,
    /// Frames read and not yet answered, in order.
    pipeline: Pipeline,
    budget: FrameBudget,
    /// When a typing indicator last went out, per room.
    typed: HashMap<RoomId, Instant>,
}

impl Connection {
    /// Registers the connection: it receives its rooms' messages from now on.
    fn open(
        gateway: Arc<Gateway>,
        socket: WebSocket,
        auth: Authenticated,
        resume: bool,
        rooms: feeds::Pinned,
        ticket: Ticket,
    ) -> Self {
        gateway.metrics.connections.inc();
        let (outbound, queue) = mpsc::channel(gateway.ctx.config.outbound_queue);
        let slow = CancellationToken::new();
        let id = gateway
            .registry
            .register(auth.user, auth.session, outbound, slow.clone(), resume);
        // The rooms as loaded (and followed) before the upgrade: a message
        // sent to them once the client sees its connection open reaches it.
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
        let budget = FrameBudget::new(
            gateway.limits.frames.as_ref(),
            gateway.limits.bytes.as_ref(),
            &gateway.ctx.clock,
        );
        Self {
            gateway,
            _ticket: ticket,
            id,
            stale,
            socket,
            queue,
            slow,
            auth,
            pipeline: Pipeline::default(),
            budget,
            typed: HashMap::new(),
        }
    }

    /// Serves the connection until it ends, then unregisters and closes it.
    async fn serve(&mut self) {
        let gateway = Arc::clone(&self.gateway);
        let (id, user) = (self.id, self.auth.user);
        // Boxed: a rare path, kept out of every connection's future.
        let ending = if !self.stale || Box::pin(confirm_rooms(&gateway, id, user)).await {
            let Err(ending) = self.run().await;
            ending
        } else {
            Some((close::TRY_AGAIN_LATER, "rooms unavailable"))
        };
        for room in gateway.registry.unregister(id) {
            feeds::update(&gateway, room);
        }
        gateway.presence.disconnected(user);
        // Boxed: it runs once, at the end.
        Box::pin(self.close(ending)).await;
        gateway.metrics.connections.dec();
        tracing::debug!(conn = id, user_id = %user, "disconnected");
    }

    /// Serves the connection until it ends; how it ends.
    async fn run(&mut self) -> Result<Infallible, Ending> {
        let gateway = Arc::clone(&self.gateway);
        let config = &gateway.ctx.config;
        let warn_before = Duration::from_secs(config.token_warning_secs);
        let idle_timeout = Duration::from_secs(config.ws_idle_timeout_secs);
        let ping_every = Duration::from_secs(config.ws_ping_secs);
        let mut in_flight: Option<BoxFuture<'static, sends::Outcome>> = None;
        let mut heard = Instant::now();
        let mut expires_at = self.auth.expires_at;
        let mut timers = Timers::new(Instant::now(), ping_every, until(expires_at), warn_before);
        let timer = tokio::time::sleep_until(timers.next());
        tokio::pin!(timer);
        loop {
            let next = timers.next();
            if timer.deadline() != next {
                timer.as_mut().reset(next);
            }
            let ready = self.pipeline.take_ready();
            if !ready.is_empty() {
                self.write_frames(&ready).await?;
            }
            if in_flight.is_none() {
                let (batch, bytes) = self
                    .pipeline
                    .next_batch(MAX_SENDS_PER_BATCH, sends::MAX_REQUEST_BYTES);
                if !batch.is_empty() {
                    in_flight = Some(submit(&gateway, &self.auth, batch, bytes));
                }
            }
            let answered = async {
                match in_flight.as_mut() {
                    Some(call) => call.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.slow.cancelled() => return Err(SLOW_CONSUMER),
                () = gateway.ctx.shutdown.cancelled(), if timers.restart.is_none() => {
                    // Within the drain time, at a random moment, so that
                    // not all clients reconnect at once.
                    let drain = Duration::from_secs(config.drain_secs);
                    timers.restart = Some(Instant::now() + drain.mul_f64(rand::random::<f64>()));
                }
                () = &mut timer => match timers.due(Instant::now()) {
                    Some(Due::Restart) => return Err(Some((close::SERVICE_RESTART, "service restart"))),
                    Some(Due::Expiry) => return Err(Some((close::TOKEN_EXPIRED, "token expired"))),
                    Some(Due::Warning) => {
                        self.write_frames(&[ServerFrame::TokenExpiring { expires_at }]).await?;
                    }
                    Some(Due::Ping) => {
                        if heard.elapsed() > idle_timeout {
                            return Err(Some((close::IDLE_TIMEOUT, "idle timeout")));
                        }
                        timed(&gateway.metrics, self.socket.send(Message::Ping(Default::default()))).await?;
                    }
                    None => {}
                },
                next = self.queue.recv() => match next {
                    Some(Outbound::Frame(text)) => self.write_queued(text).await?,
                    Some(Outbound::Close(code, reason)) => return Err(Some((code, reason))),
                    None => return Err(None),
                },
                outcome = answered => {
                    in_flight = None;
                    let answers = &gateway.metrics.send_answers;
                    self.pipeline
                        .complete(outcome, |waited| answers.observe(waited.as_secs_f64()));
                }
                next = self.socket.next(), if self.pipeline.len() < MAX_PIPELINE => {
                    heard = Instant::now();
                    match next {
                        None | Some(Ok(Message::Close(_))) => return Err(None),
                        Some(Err(e)) => {
                            tracing::info!(user_id = %self.auth.user, error = %e, "WebSocket read failed");
                            return Err(Some((close::TOO_BIG, "frame too large or malformed")));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        // Boxed: its future (about 1 KiB, for refresh,
                        // typing and the message limit) would otherwise be
                        // part of every idle connection's; this costs one
                        // allocation per data frame instead.
                        Some(Ok(message)) => Box::pin(self.on_message(message)).await?,
                    }
                    if self.auth.expires_at != expires_at {
                        // Refreshed: the new token's expiry counts.
                        expires_at = self.auth.expires_at;
                        timers.expire_in(Instant::now(), until(expires_at), warn_before);
                    }
                }
            }
        }
    }

    /// Handles a data frame of the client: answered in the pipeline, or
    /// the ending when the client keeps sending past its rate limit.
    async fn on_message(&mut self, message: Message) -> Result<(), Ending> {
        let gateway = &self.gateway;
        gateway.metrics.frames_in.inc();
        let size = match &message {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
            _ => 0,
        };
        match self.budget.take(size) {
            Verdict::Accept => {}
            Verdict::Refuse(retry_after) => {
                gateway.metrics.frames_limited.inc();
                self.pipeline
                    .push_ready(rate_limited(None, retry_after, "frames"));
                return Ok(());
            }
            Verdict::Close => {
                tracing::info!(user_id = %self.auth.user, "WebSocket closed: kept sending past its rate limit");
                return Err(Some((close::POLICY_VIOLATION, "rate limit exceeded")));
            }
        }
        let Message::Text(text) = message else {
            self.pipeline.push_ready(error(
                None,
                ErrorCode::InvalidFrame,
                "binary frames are not supported; send JSON text",
            ));
            return Ok(());
        };
        let max_frame = gateway.ctx.config.max_frame_bytes;
        match accept_frame(&mut self.pipeline, &self.auth, text.as_str(), max_frame) {
            Some(Command::Send(draft)) => match over_message_limit(gateway, &self.auth).await {
                None => self.pipeline.push_send(draft),
                Some(retry_after) => {
                    self.pipeline
                        .push_ready(rate_limited(Some(draft.id), retry_after, "messages"));
                }
            },
            Some(Command::Resume(rooms)) => {
                // The connection's queue entry, held by the registry while
                // the connection is registered (all the time it reads).
                if let Some(outbound) = gateway.registry.outbound(self.id) {
                    let resume =
                        resume::run(Arc::clone(gateway), self.id, self.auth, rooms, outbound);
                    gateway.ctx.in_flight.spawn(resume);
                }
            }
            Some(Command::Typing(room)) => {
                if let Err(refused) =
                    typing(gateway, self.id, &self.auth, room, &mut self.typed).await
                {
                    self.pipeline.push_ready(refused);
                }
            }
            Some(Command::Refresh { id, token }) => {
                let answer = match refresh(gateway, self.id, &mut self.auth, &token).await {
                    Ok(expires_at) => ServerFrame::Refreshed { id, expires_at },
                    Err((code, message)) => error(id, code, &message),
                };
                self.pipeline.push_ready(answer);
            }
            None => {}
        }
        Ok(())
    }

    /// Writes answers (in one flush).
    async fn write_frames(&mut self, frames: &[ServerFrame]) -> Result<(), Ending> {
        let socket = &mut self.socket;
        let write = async {
            let mut written = 0;
            for frame in frames {
                let Ok(text) = serde_json::to_string(frame) else {
                    continue;
                };
                socket.feed(Message::Text(text.into())).await?;
                written += 1;
            }
            socket.flush().await?;
            Ok(written)
        };
        let written = timed(&self.gateway.metrics, write).await?;
        self.gateway.metrics.frames_out.inc_by(written);
        Ok(())
    }

    /// Writes `first` and what is queued behind it (in one flush); a queued
    /// close ends the connection after the frames before it.
    async fn write_queued(&mut self, first: Utf8Bytes) -> Result<(), Ending> {
        let (socket, queue) = (&mut self.socket, &mut self.queue);
        let mut then_close = None;
        let burst = async {
            socket.feed(Message::Text(first)).await?;
            let mut written = 1;
            while written < MAX_BURST {
                match queue.try_recv() {
                    Ok(Outbound::Frame(text)) => {
                        socket.feed(Message::Text(text)).await?;
                        written += 1;
                    }
                    Ok(Outbound::Close(code, reason)) => {
                        then_close = Some((code, reason));
                        break;
                    }
                    Err(_) => break,
                }
            }
            socket.flush().await?;
            Ok(written)
        };
        let written = timed(&self.gateway.metrics, burst).await?;
        self.gateway.metrics.frames_out.inc_by(written);
        match then_close {
            Some(close) => Err(Some(close)),
            None => Ok(()),
        }
    }

    /// Ends the connection: sends the ending's close frame and reads (and
    /// drops) what the client still sends until its close frame, so the TCP
    /// connection ends cleanly and the client reads the close code instead
    /// of a reset; or completes the close the client began. Each step is
    /// bounded by [`CLOSE_HANDSHAKE_TIMEOUT`].
    async fn close(&mut self, ending: Ending) {
        if let Some((code, reason)) = ending {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let close = self.socket.send(Message::Close(Some(frame)));
            if let Ok(Ok(())) = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, close).await {
                let until_close = async {
                    while let Some(Ok(message)) = self.socket.next().await {
                        if matches!(message, Message::Close(_)) {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, until_close).await;
            }
        }
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, self.socket.close()).await;
    }
}

/// Runs a write to the socket: the ending when it failed, or, when it took
/// longer than [`WRITE_TIMEOUT`] (the client stopped reading and its socket
/// buffers are full), a slow consumer's.
async fn timed<T>(
    metrics: &GatewayMetrics,
    write: impl Future<Output = Result<T, axum::Error>>,
) -> Result<T, Ending> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(None),
        Err(_) => {
            metrics.slow_consumers.inc();
            Err(SLOW_CONSUMER)
        }
    }
}

/// Hands a batch to the gateway's sends, which take it to chat-service with
/// other connections' batches.
fn submit(
    gateway: &Gateway,
    auth: &Authenticated,
    batch: Vec<Draft>,
    bytes: usize,
) -> BoxFuture<'static, sends::Outcome> {
    let (sends, user) = (gateway.sends.clone(), auth.user);
    Box::pin(async move { sends.send(user, batch, bytes).await })
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
    last: &mut HashMap<RoomId, Instant>,
) -> Result<(), ServerFrame> {
    if !gateway.registry.in_room(conn, room) {
        return Err(error(
            None,
            ErrorCode::Forbidden,
            "not a member of this room",
        ));
    }
    let now = Instant::now();
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
async fn over_message_limit(gateway: &Gateway, auth: &Authenticated) -> Option<Duration> {
    let limit = gateway.limits.messages.as_ref()?;
    let decision = gateway
        .ctx
        .limits
        .check(limit, &auth.user.to_string(), 1)
        .await;
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

/// What a connection does at a set time, on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Ping the client (after checking it was heard from lately).
    Ping,
    /// Tell the client its token expires soon.
    Warning,
    /// Close: the token expired.
    Expiry,
    /// Close: the service is restarting.
    Restart,
}

/// The times a connection acts at, served by one timer (an idle
/// connection holds one instead of four).
#[derive(Debug)]
struct Timers {
    ping_every: Duration,
    ping: Instant,
    /// `None` once the warning went out.
    warning: Option<Instant>,
    expiry: Instant,
    /// Set once the service drains.
    restart: Option<Instant>,
}

impl Timers {
    fn new(
        now: Instant,
        ping_every: Duration,
        expires_in: Duration,
        warn_before: Duration,
    ) -> Self {
        let mut timers = Self {
            ping_every,
            ping: now + ping_every,
            warning: None,
            expiry: now,
            restart: None,
        };
        timers.expire_in(now, expires_in, warn_before);
        timers
    }

    /// The token now expires in `expires_in`: warned `warn_before` then.
    fn expire_in(&mut self, now: Instant, expires_in: Duration, warn_before: Duration) {
        self.expiry = now + expires_in;
        self.warning = Some(now + expires_in.saturating_sub(warn_before));
    }

    /// The earliest time set.
    fn next(&self) -> Instant {
        [
            Some(self.ping),
            self.warning,
            Some(self.expiry),
            self.restart,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.expiry)
    }

    /// What is due at `now`, the gravest first; the next ping and the
    /// warning are taken when returned.
    fn due(&mut self, now: Instant) -> Option<Due> {
        if self.restart.is_some_and(|at| at <= now) {
            Some(Due::Restart)
        } else if self.expiry <= now {
            Some(Due::Expiry)
        } else if self.warning.is_some_and(|at| at <= now) {
            self.warning = None;
            Some(Due::Warning)
        } else if self.ping <= now {
            self.ping = now + self.ping_every;
            Some(Due::Ping)
        } else {
            None
        }
    }
}

/// How long until `at` (Unix seconds).
fn until(at: i64) -> Duration {
    Duration::from_secs(u64::try_from(at - chrono::Utc::now().timestamp()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: Duration = Duration::from_secs(25);
    const WARN: Duration = Duration::from_secs(60);

    #[test]
    fn pings_come_until_the_warning_then_the_expiry_closes() {
        let start = Instant::now();
        let mut timers = Timers::new(start, PING, Duration::from_secs(100), WARN);
        assert_eq!(timers.next(), start + PING);
        assert_eq!(timers.due(start + Duration::from_secs(1)), None);
        assert_eq!(timers.due(start + PING), Some(Due::Ping));
        // The warning (at 40 s) comes before the next ping (at 50 s), once.
        assert_eq!(timers.next(), start + Duration::from_secs(40));
        assert_eq!(
            timers.due(start + Duration::from_secs(40)),
            Some(Due::Warning)
        );
        assert_eq!(timers.next(), start + Duration::from_secs(50));
        assert_eq!(timers.due(start + Duration::from_secs(50)), Some(Due::Ping));
        assert_eq!(
            timers.due(start + Duration::from_secs(100)),
            Some(Due::Expiry)
        );
    }

    #[test]
    fn a_refresh_moves_the_expiry_and_warns_again() {
        let start = Instant::now();
        let mut timers = Timers::new(start, PING, Duration::from_secs(30), WARN);
        // Expiring within the warning time: warned at once.
        assert_eq!(timers.due(start), Some(Due::Warning));
        let later = start + Duration::from_secs(20);
        timers.expire_in(later, Duration::from_secs(600), WARN);
        assert_eq!(timers.due(start + Duration::from_secs(31)), Some(Due::Ping));
        let warning = later + Duration::from_secs(540);
        assert_eq!(
            timers.due(warning - Duration::from_secs(1)),
            Some(Due::Ping)
        );
        assert_eq!(timers.due(warning), Some(Due::Warning));
        assert_eq!(timers.next(), warning - Duration::from_secs(1) + PING);
    }

    #[test]
    fn a_restart_outranks_what_else_is_due() {
        let start = Instant::now();
        let mut timers = Timers::new(start, PING, Duration::from_secs(100), WARN);
        timers.restart = Some(start + Duration::from_secs(3));
        assert_eq!(timers.next(), start + Duration::from_secs(3));
        assert_eq!(
            timers.due(start + Duration::from_secs(200)),
            Some(Due::Restart)
        );
    }
}
