//! Accepting messages, many at a time. A `chat.send` request (one
//! connection's sends, in order) is checked (sizes) and handed to the group
//! commit, which accepts everything submitted meanwhile in one transaction
//! (membership, gap-free room sequences, the outbox) and answers each request
//! once that transaction committed. The publisher then publishes the committed
//! messages to the rooms stream in one batch, straight from memory for each
//! room whose previous message it published itself, else from the outbox in
//! sequence order (so a room's earlier messages, queued by another instance
//! or left by a failed publish, go first); whatever it could not publish (or
//! a crash left behind) the relay publishes later. JetStream's duplicate
//! window and history-service's idempotency absorb repeats.

mod outbox;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::Arc,
    time::Duration,
};

use chrono::Utc;
use prometheus::IntCounter;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use unhidra_bus::{Headers, Outgoing};
use unhidra_core::{
    ids::{MessageId, RoomId},
    rpc::{MAX_SENDS_PER_BATCH, RpcCode, RpcError, RpcReply, SendAccepted, SendBatch},
};
use unhidra_runtime::{ServiceContext, batch::next_batch};
use unhidra_store::{Backend, now_millis};
use unhidra_telemetry::request_id;

use self::outbox::{Acceptance, Pending};
pub use self::outbox::{Accepted, NewMessage, OutboxRepo};
use crate::{ChatState, membership::store_unavailable, rooms::Refusal};

/// Messages accepted in one transaction at most.
const MAX_GROUP: usize = 2048;
/// Requests waiting for the group commit before new ones wait to be queued.
const SUBMISSION_QUEUE: usize = 1024;
/// Messages one publisher round takes from the outbox at most.
const PUBLISH_LIMIT: usize = 4096;
/// Committed groups waiting for the publisher; beyond this the relay has them.
const PUBLISH_QUEUE: usize = 256;
/// How often the relay looks for unpublished messages.
const RELAY_INTERVAL: Duration = Duration::from_secs(1);
/// Outbox rows younger than this are left to the publisher.
const RELAY_GRACE_MS: i64 = 2_000;
/// Rooms one relay round takes at most.
const RELAY_ROOMS: i64 = 500;
/// Rooms whose last published sequence the publisher remembers at most;
/// beyond that it forgets them all and reads them from the outbox again.
const REMEMBERED_ROOMS: usize = 100_000;
/// Relay rounds between two sweeps of old send keys (about a minute).
const KEY_SWEEP_ROUNDS: u32 = 60;

/// One request's messages, waiting for the group commit.
struct Submission {
    messages: Vec<NewMessage>,
    /// Request id and trace context, carried to the published events.
    headers: Headers,
    reply: oneshot::Sender<Vec<Result<Accepted, Refusal>>>,
}

/// A committed group, for the publisher: its new messages in the order
/// numbered, and their headers.
#[derive(Default)]
struct Committed {
    queued: Vec<Pending>,
    headers: HashMap<MessageId, Headers>,
}

/// The entry to the group commit; clones share it.
#[derive(Clone)]
pub struct GroupCommit {
    submissions: mpsc::Sender<Submission>,
}

/// What the group commit, the publisher and the relay count.
#[derive(Clone)]
pub struct MessageMetrics {
    pub accepted: IntCounter,
    pub published: IntCounter,
}

impl GroupCommit {
    /// Starts the group commit, the publisher and the relay; they stop at
    /// shutdown, leaving anything unpublished in the outbox.
    pub fn start(
        ctx: &ServiceContext,
        outbox: OutboxRepo,
        metrics: MessageMetrics,
    ) -> anyhow::Result<(Self, Vec<JoinHandle<()>>)> {
        let (submissions, queue) = mpsc::channel(SUBMISSION_QUEUE);
        let (committed, to_publish) = mpsc::channel(PUBLISH_QUEUE);
        let publisher = Publisher {
            ctx: ctx.clone(),
            outbox: outbox.clone(),
            published: metrics.published,
            last_published: Arc::default(),
        };
        let backend = outbox.backend();
        let commit = commit_groups(
            outbox,
            queue,
            committed,
            metrics.accepted,
            ctx.shutdown.clone(),
        );
        let commit = match backend {
            Backend::Sqlite => on_own_thread("group-commit", commit)?,
            Backend::Postgres => tokio::spawn(commit),
        };
        let tasks = vec![
            commit,
            tokio::spawn(publisher.clone().publish_committed(to_publish)),
            tokio::spawn(publisher.relay()),
        ];
        Ok((Self { submissions }, tasks))
    }

    /// Accepts `messages` in the next group; one outcome each, in order.
    async fn submit(
        &self,
        messages: Vec<NewMessage>,
        headers: Headers,
    ) -> Result<Vec<Result<Accepted, Refusal>>, RpcError> {
        let unavailable = || RpcError::new(RpcCode::Unavailable, "chat store unavailable");
        let (reply, outcome) = oneshot::channel();
        let submission = Submission {
            messages,
            headers,
            reply,
        };
        self.submissions
            .send(submission)
            .await
            .map_err(|_| unavailable())?;
        // Dropped unanswered when the group failed or the service stops.
        outcome.await.map_err(|_| unavailable())
    }
}

/// Answers `chat.send`: one outcome per send, in order.
pub async fn send(
    state: ChatState,
    batch: SendBatch,
) -> Result<Vec<RpcReply<SendAccepted>>, RpcError> {
    if batch.sends.len() > MAX_SENDS_PER_BATCH {
        return Err(RpcError::new(
            RpcCode::InvalidInput,
            format!("at most {MAX_SENDS_PER_BATCH} sends per request"),
        ));
    }
    let max_body = state.ctx.config.max_frame_bytes;
    let check = |body: &str| {
        if body.is_empty() {
            Err(RpcError::new(
                RpcCode::InvalidInput,
                "body must not be empty",
            ))
        } else if body.len() > max_body {
            Err(RpcError::new(RpcCode::InvalidInput, "body is too large"))
        } else if body.contains('\0') {
            // Postgres text cannot hold it, and no client means to send it.
            Err(RpcError::new(
                RpcCode::InvalidInput,
                "body must not contain NUL characters",
            ))
        } else {
            Ok(())
        }
    };
    let checks: Vec<Result<(), RpcError>> = batch.sends.iter().map(|d| check(&d.body)).collect();
    let sent_at = Utc::now();
    let valid: Vec<NewMessage> = batch
        .sends
        .into_iter()
        .zip(&checks)
        .filter(|(_, check)| check.is_ok())
        .map(|(draft, _)| NewMessage {
            room: draft.room,
            sender: batch.user,
            body: draft.body,
            sent_at,
            client_id: Some(draft.id),
        })
        .collect();
    let mut accepted = if valid.is_empty() {
        Vec::new()
    } else {
        let mut headers = Headers::new();
        request_id::stamp(&mut headers);
        state.service.commits.submit(valid, headers).await?
    }
    .into_iter();
    let outcomes = checks
        .into_iter()
        .map(|check| {
            check?;
            match accepted.next() {
                Some(Ok(Accepted::New(event))) => {
                    tracing::debug!(room_id = %event.room, seq = event.seq, message_id = %event.message_id, "message accepted");
                    Ok(SendAccepted {
                        seq: event.seq,
                        message_id: event.message_id,
                    })
                }
                Some(Ok(Accepted::Repeat(ack))) => {
                    tracing::debug!(seq = ack.seq, message_id = %ack.message_id, "repeated send answered with its first ack");
                    Ok(ack)
                }
                Some(Err(refusal)) => Err(refusal.rpc_error()),
                None => Err(RpcError::new(RpcCode::Internal, "internal error")),
            }
        })
        .map(RpcReply::from)
        .collect();
    Ok(outcomes)
}

/// Runs `task` on a thread of its own, in a single-threaded runtime; the
/// handle returned ends with it. For the group commit on SQLite, whose every
/// statement is a hand-off to SQLite's worker thread and back: on the shared
/// runtime each wake-up of the loop waited behind the connections' tasks.
/// (Not on Postgres: a connection's socket belongs to the runtime that
/// opened it, and the pool's are shared.)
fn on_own_thread(
    name: &str,
    task: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, ended) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(task);
            let _ = done.send(());
        })?;
    Ok(tokio::spawn(async move {
        let _ = ended.await;
    }))
}

/// The group commit: everything submitted while the previous transaction ran
/// goes into the next one, so a busy service commits large groups and an idle
/// one commits each request at once.
async fn commit_groups(
    outbox: OutboxRepo,
    mut queue: mpsc::Receiver<Submission>,
    committed: mpsc::Sender<Committed>,
    accepted: IntCounter,
    shutdown: CancellationToken,
) {
    loop {
        let mut count = 0;
        let Some(mut group) = next_batch(&mut queue, &shutdown, |s: &Submission| {
            count += s.messages.len();
            count >= MAX_GROUP
        })
        .await
        else {
            return;
        };
        let sizes: Vec<usize> = group.iter().map(|s| s.messages.len()).collect();
        let messages: Vec<NewMessage> = group
            .iter_mut()
            .flat_map(|s| std::mem::take(&mut s.messages))
            .collect();
        let Acceptance { outcomes, queued } = match outbox.accept(messages).await {
            Ok(acceptance) => acceptance,
            Err(e) => {
                // Every request of the group is answered `unavailable`.
                store_unavailable(&e);
                continue;
            }
        };
        let mut outcomes = outcomes.into_iter();
        let mut publish = Committed {
            queued,
            headers: HashMap::new(),
        };
        for (submission, size) in group.into_iter().zip(sizes) {
            let mine: Vec<_> = outcomes.by_ref().take(size).collect();
            for event in mine.iter().flatten().filter_map(|a| match a {
                Accepted::New(event) => Some(event),
                Accepted::Repeat(_) => None,
            }) {
                accepted.inc();
                publish
                    .headers
                    .insert(event.message_id, submission.headers.clone());
            }
            let _ = submission.reply.send(mine);
        }
        if !publish.queued.is_empty() && committed.try_send(publish).is_err() {
            tracing::debug!("publisher busy; the relay publishes this group");
        }
    }
}

/// Each room's highest sequence this process published (and everything
/// below it was published before).
type LastPublished = HashMap<RoomId, u64>;

/// Splits committed messages (in the order numbered) into those that
/// continue what was published of their rooms, and the rooms that are
/// behind: a room with any message that does not follow the one before it
/// (queued by another instance, left by a failed publish, or the room's
/// first since this process started) is published from the outbox, all of
/// its messages in order, so none of it is taken as continuing.
fn split_by_continuity(last: &LastPublished, queued: Vec<Pending>) -> (Vec<Pending>, Vec<RoomId>) {
    let mut next: LastPublished = HashMap::new();
    let mut behind = Vec::new();
    for pending in &queued {
        let expected = next
            .get(&pending.room)
            .or_else(|| last.get(&pending.room))
            .map(|seq| seq + 1);
        if expected == Some(pending.seq) {
            next.insert(pending.room, pending.seq);
        } else {
            behind.push(pending.room);
        }
    }
    behind.sort_unstable();
    behind.dedup();
    let continuing = queued
        .into_iter()
        .filter(|p| behind.binary_search(&p.room).is_err())
        .collect();
    (continuing, behind)
}

/// Publishes committed messages.
#[derive(Clone)]
struct Publisher {
    ctx: ServiceContext,
    outbox: OutboxRepo,
    published: IntCounter,
    /// Taken by each publishing round of the publisher and the relay: in
    /// one process a round never publishes what another is publishing (on
    /// SQLite the outbox holds no lock meanwhile), even when the publisher
    /// falls so far behind that its rooms look stale to the relay. It holds
    /// what this process published of each room.
    last_published: Arc<tokio::sync::Mutex<LastPublished>>,
}

impl Publisher {
    /// Publishes each committed group (with whatever queued meanwhile) until
    /// shutdown: a room's messages straight from memory when they continue
    /// what this process published of the room, else from the outbox.
    async fn publish_committed(self, mut queue: mpsc::Receiver<Committed>) {
        while let Some(groups) = next_batch(&mut queue, &self.ctx.shutdown, |_| false).await {
            let mut last = self.last_published.lock().await;
            if last.len() > REMEMBERED_ROOMS {
                last.clear();
            }
            let mut headers = HashMap::new();
            let mut queued = Vec::new();
            for group in groups {
                headers.extend(group.headers);
                queued.extend(group.queued);
            }
            let (continuing, behind) = split_by_continuity(&last, queued);
            self.publish_continuing(&mut last, continuing, &mut headers)
                .await;
            self.publish_rooms(&mut last, &behind, headers).await;
        }
    }

    /// Publishes messages that continue what this process published of their
    /// rooms, then removes them from the outbox; on failure they stay there
    /// and their rooms are published from the outbox next time.
    async fn publish_continuing(
        &self,
        last: &mut LastPublished,
        continuing: Vec<Pending>,
        headers: &mut HashMap<MessageId, Headers>,
    ) {
        if continuing.is_empty() {
            return;
        }
        let highest: BTreeMap<RoomId, u64> = continuing.iter().map(|p| (p.room, p.seq)).collect();
        let count = continuing.len();
        let outgoing = self.outgoing(continuing, headers);
        if let Err(e) = self.ctx.bus.publish_durable_batch(outgoing).await {
            tracing::warn!(error = %e, "publish failed; the relay will retry");
            return;
        }
        self.published.inc_by(count as u64);
        last.extend(highest.iter().map(|(room, seq)| (*room, *seq)));
        if let Err(e) = self.outbox.remove(&highest).await {
            tracing::warn!(error = ?e, "published, but not removed from the outbox; the relay will publish it again");
        }
    }

    /// The bus messages of `pending`, with the headers of their requests.
    fn outgoing(
        &self,
        pending: Vec<Pending>,
        headers: &mut HashMap<MessageId, Headers>,
    ) -> Vec<Outgoing> {
        pending
            .into_iter()
            .map(|p| Outgoing {
                subject: self.ctx.subjects.room_messages(p.room),
                msg_id: p.message_id.to_string(),
                headers: headers.remove(&p.message_id).unwrap_or_default(),
                payload: p.payload.into(),
            })
            .collect()
    }

    /// Republishes what failed or what a crash left in the outbox, and
    /// forgets the client ids of old sends, until shutdown.
    async fn relay(self) {
        let mut rounds: u32 = 0;
        loop {
            rounds = rounds.wrapping_add(1);
            if rounds % KEY_SWEEP_ROUNDS == 0 {
                match self.outbox.forget_old_keys().await {
                    Ok(forgotten) => tracing::debug!(forgotten, "old send keys forgotten"),
                    Err(e) => tracing::warn!(error = %e, "send keys not swept"),
                }
            }
            match self
                .outbox
                .stale_rooms(now_millis() - RELAY_GRACE_MS, RELAY_ROOMS)
                .await
            {
                Ok(rooms) if !rooms.is_empty() => {
                    tracing::info!(rooms = rooms.len(), "relaying unpublished messages");
                    let mut last = self.last_published.lock().await;
                    self.publish_rooms(&mut last, &rooms, HashMap::new()).await;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "outbox scan failed"),
            }
            tokio::select! {
                () = self.ctx.shutdown.cancelled() => return,
                () = tokio::time::sleep(RELAY_INTERVAL) => {}
            }
        }
    }

    /// Publishes every queued message of `rooms` from the outbox, each room
    /// from its lowest sequence, in rounds of at most `PUBLISH_LIMIT`; on
    /// failure the rest stays for the relay.
    async fn publish_rooms(
        &self,
        last: &mut LastPublished,
        rooms: &[RoomId],
        mut headers: HashMap<MessageId, Headers>,
    ) {
        if rooms.is_empty() {
            return;
        }
        loop {
            let bus = &self.ctx.bus;
            let mut highest = BTreeMap::new();
            let round = self
                .outbox
                .publish(rooms, PUBLISH_LIMIT, |pending| {
                    highest.extend(pending.iter().map(|p| (p.room, p.seq)));
                    let outgoing = self.outgoing(pending, &mut headers);
                    async move { Ok(bus.publish_durable_batch(outgoing).await?) }
                })
                .await;
            match round {
                Ok(count) => {
                    self.published.inc_by(count as u64);
                    last.extend(highest);
                    if count < PUBLISH_LIMIT {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "publish failed; the relay will retry");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(room: RoomId, seq: u64) -> Pending {
        Pending {
            message_id: MessageId::new(),
            room,
            seq,
            payload: String::new(),
        }
    }

    fn seqs(continuing: &[Pending]) -> Vec<(RoomId, u64)> {
        continuing.iter().map(|p| (p.room, p.seq)).collect()
    }

    #[test]
    fn messages_continue_their_room_only_after_what_was_published_of_it() {
        let (a, b, c) = (RoomId::new(), RoomId::new(), RoomId::new());
        let last = HashMap::from([(a, 4), (b, 9)]);
        // a continues (5, 6 over two groups); b skips 10 (published
        // elsewhere or failed); c was never published by this process.
        let queued = vec![
            pending(a, 5),
            pending(b, 11),
            pending(c, 1),
            pending(a, 6),
            pending(b, 12),
        ];
        let (continuing, mut behind) = split_by_continuity(&last, queued);
        assert_eq!(seqs(&continuing), [(a, 5), (a, 6)]);
        behind.sort_unstable();
        let mut expected = vec![b, c];
        expected.sort_unstable();
        assert_eq!(behind, expected);
    }

    #[test]
    fn a_room_with_a_gap_later_in_the_round_is_published_from_the_outbox_whole() {
        let a = RoomId::new();
        let last = HashMap::from([(a, 1)]);
        let (continuing, behind) =
            split_by_continuity(&last, vec![pending(a, 2), pending(a, 3), pending(a, 5)]);
        assert!(continuing.is_empty(), "{:?}", seqs(&continuing));
        assert_eq!(behind, [a]);
    }
}
