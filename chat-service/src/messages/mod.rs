//! Accepting messages, many at a time. A `chat.send` request (one
//! connection's sends, in order) is checked (sizes) and handed to the group
//! commit, which accepts everything submitted meanwhile in one transaction
//! (membership, gap-free room sequences, the outbox) and answers each request
//! once that transaction committed. The publisher then publishes the committed
//! messages (live to their rooms, and into the rooms stream many to a stream
//! message: [`publication`]), straight from memory for each
//! room whose previous message it published itself, else from the outbox in
//! sequence order (so a room's earlier messages, queued by another instance
//! or left by a failed publish, go first); whatever it could not publish (or
//! a crash left behind) the relay publishes later. A published message
//! leaves the outbox once the stream has it for good: at once in JetStream;
//! in the embedded default's in-process stream only once history-service
//! stored it, so a crash meanwhile loses nothing. JetStream's duplicate
//! window and history-service's idempotency absorb repeats.

mod outbox;
mod publication;
mod send_log;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::Utc;
use prometheus::{Histogram, IntCounter};
use tokio::{
    sync::{Notify, mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use unhidra_bus::Headers;
use unhidra_core::{
    ids::{MessageId, RoomId},
    rpc::{MAX_SENDS_PER_BATCH, RpcCode, RpcError, RpcReply, SendAccepted, SendBatch},
};
use unhidra_runtime::{
    ServiceContext,
    batch::{next_batch, take_queued},
};
use unhidra_store::{Backend, now_millis};
use unhidra_telemetry::{
    metrics::{LATENCY_BUCKETS, Metrics},
    request_id,
};

pub use self::outbox::{Accepted, NewMessage, OutboxRepo};
use self::{
    outbox::{Acceptance, Pending},
    publication::Publication,
};
use crate::{ChatState, membership::store_unavailable, rooms::Refusal};

/// Messages accepted in one transaction at most.
const MAX_GROUP: usize = 2048;
/// Requests waiting for the group commit before new ones wait to be queued.
const SUBMISSION_QUEUE: usize = 1024;
/// How long published messages wait for a group to be removed with, on
/// SQLite, before they are removed on their own.
const REMOVAL_DELAY: Duration = Duration::from_millis(50);
/// On Postgres, the least time between two removals by the publisher:
/// each is a statement and a commit (a sync of the log) of its own, so what
/// is published meanwhile goes with the next.
const REMOVAL_INTERVAL: Duration = Duration::from_millis(500);
/// Messages one publisher round takes from the outbox at most.
const PUBLISH_LIMIT: usize = 4096;
/// Committed groups waiting for the publisher; beyond this the relay has them.
const PUBLISH_QUEUE: usize = 256;
/// How often the relay looks for unpublished messages.
const RELAY_INTERVAL: Duration = Duration::from_secs(1);
/// Outbox rows younger than this are left to the publisher.
const RELAY_GRACE_MS: i64 = 2_000;
/// Outbox rows one relay round looks at, the oldest first: it publishes
/// their rooms.
const RELAY_ROWS: i64 = 500;
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
    /// When it was queued: the group waits for more until its first
    /// submission has waited `group_commit_linger_ms`.
    queued_at: Instant,
}

/// A committed group, for the publisher: its new messages in the order
/// numbered, and their headers.
#[derive(Default)]
struct Committed {
    queued: Vec<Pending>,
    headers: HashMap<MessageId, Headers>,
}

/// Published messages still in the outbox, gathered for their next step:
/// each room's highest sequence published (everything below it was
/// published before). The publisher gathers what the stream's consumers
/// are still to acknowledge, [`Publisher::remove_once_consumed`]; then on
/// SQLite what the next group's transaction removes, which saves a
/// transaction (a sync of the log) per group, or the group commit on its
/// own when no group comes within `REMOVAL_DELAY`. (On Postgres the
/// publisher removes them itself, at most once per `REMOVAL_INTERVAL`: a
/// group's transaction must not wait on the row locks another instance's
/// publisher holds.)
#[derive(Default)]
struct Published {
    highest: Mutex<BTreeMap<RoomId, u64>>,
    added: Notify,
}

impl Published {
    fn add(&self, published: BTreeMap<RoomId, u64>) {
        if published.is_empty() {
            return;
        }
        let mut all = self.highest.lock().unwrap_or_else(PoisonError::into_inner);
        for (room, seq) in published {
            let highest = all.entry(room).or_default();
            *highest = (*highest).max(seq);
        }
        drop(all);
        self.added.notify_one();
    }

    /// Returns once something was added, `REMOVAL_DELAY` later.
    async fn due(&self) {
        self.added.notified().await;
        tokio::time::sleep(REMOVAL_DELAY).await;
    }

    fn take(&self) -> BTreeMap<RoomId, u64> {
        let mut all = self.highest.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *all)
    }
}

/// The entry to the group commit; clones share it.
#[derive(Clone)]
pub struct GroupCommit {
    submissions: mpsc::Sender<Submission>,
}

/// What the group commit, the publisher and the relay count.
#[derive(Clone)]
pub struct MessageMetrics {
    pub groups: GroupMetrics,
    pub published: IntCounter,
}

/// What the group commit counts and times: where a send's time in
/// chat-service goes (waiting for its group, then the group's transaction),
/// and how busy the commit loop is (the transactions' seconds per second).
#[derive(Clone)]
pub struct GroupMetrics {
    accepted: IntCounter,
    /// Per request: from being queued until its group's transaction began.
    wait: Histogram,
    /// Per group: its transaction, attempts included.
    duration: Histogram,
    /// Per group: its messages.
    messages: Histogram,
}

impl GroupMetrics {
    pub fn register(metrics: &Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            accepted: metrics.counter(
                "unhidra_messages_accepted_total",
                "Chat messages accepted by chat-service (durable in its outbox).",
            )?,
            wait: metrics.histogram(
                "unhidra_group_commit_wait_seconds",
                "Per chat.send request: from being queued for the group commit until its group's transaction began.",
                &LATENCY_BUCKETS,
            )?,
            duration: metrics.histogram(
                "unhidra_group_commit_duration_seconds",
                "Per group commit: its transaction (numbering, send keys, outbox), retries included.",
                &LATENCY_BUCKETS,
            )?,
            messages: metrics.histogram(
                "unhidra_group_commit_messages",
                "Per group commit: the messages it accepted or refused.",
                &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, MAX_GROUP as f64],
            )?,
        })
    }
}

impl GroupCommit {
    /// Starts the group commit, the publisher and the relay; they stop at
    /// shutdown, leaving anything unpublished in the outbox.
    pub async fn start(
        ctx: &ServiceContext,
        outbox: OutboxRepo,
        metrics: MessageMetrics,
    ) -> anyhow::Result<(Self, Vec<JoinHandle<()>>)> {
        outbox.read_send_log().await?;
        let (submissions, queue) = mpsc::channel(SUBMISSION_QUEUE);
        let (committed, to_publish) = mpsc::channel(PUBLISH_QUEUE);
        let backend = outbox.backend();
        let unremoved = Arc::new(Published::default());
        let publisher = Publisher {
            ctx: ctx.clone(),
            rooms_stream: ctx.subjects.rooms_stream().name,
            outbox: outbox.clone(),
            published: metrics.published,
            last_published: Arc::default(),
            unconsumed: Arc::default(),
            unremoved: (backend == Backend::Sqlite).then(|| unremoved.clone()),
        };
        let commit = commit_groups(
            GroupLoop {
                outbox: outbox.with_own_writer().await?,
                queue,
                unremoved,
                committed,
                metrics: metrics.groups,
                linger: Duration::from_millis(ctx.config.group_commit_linger_ms),
            },
            ctx.shutdown.clone(),
        );
        let commit = match backend {
            Backend::Sqlite => on_own_thread("group-commit", commit)?,
            Backend::Postgres => tokio::spawn(commit),
        };
        let tasks = vec![
            commit,
            tokio::spawn(publisher.clone().run(to_publish)),
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
            queued_at: Instant::now(),
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
    let count: usize = batch.users.iter().map(|u| u.sends.len()).sum();
    if count > MAX_SENDS_PER_BATCH {
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
    let sends = batch
        .users
        .into_iter()
        .flat_map(|u| u.sends.into_iter().map(move |draft| (u.user, draft)));
    let sent_at = Utc::now();
    let mut checks: Vec<Result<(), RpcError>> = Vec::with_capacity(count);
    let mut valid: Vec<NewMessage> = Vec::with_capacity(count);
    for (sender, draft) in sends {
        let checked = check(&draft.body);
        if checked.is_ok() {
            valid.push(NewMessage {
                room: draft.room,
                sender,
                body: draft.body,
                sent_at,
                client_id: Some(draft.id),
            });
        }
        checks.push(checked);
    }
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

/// What the group commit works with.
struct GroupLoop {
    outbox: OutboxRepo,
    queue: mpsc::Receiver<Submission>,
    unremoved: Arc<Published>,
    committed: mpsc::Sender<Committed>,
    metrics: GroupMetrics,
    /// How long a group waits for more submissions after its first.
    linger: Duration,
}

/// The group commit: everything submitted while the previous transaction ran
/// goes into the next one, so a busy service commits large groups. Below
/// capacity a group also takes what is submitted until its first submission
/// has waited `linger` (its requests were queued during the previous
/// transaction, when busy, and have waited that long already). Each
/// transaction also removes what was published meanwhile.
async fn commit_groups(mut work: GroupLoop, shutdown: CancellationToken) {
    loop {
        let mut group = Vec::new();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = work.queue.recv() => match next {
                Some(submission) => group.push(submission),
                None => break,
            },
            () = work.unremoved.due() => {}
        }
        if let Some(first) = group.first() {
            let mut count = first.messages.len();
            if count < MAX_GROUP {
                // Not woken by each submission meanwhile: the loop's thread
                // sleeps once.
                tokio::time::sleep_until(first.queued_at + work.linger).await;
                take_queued(&mut work.queue, &mut group, |s: &Submission| {
                    count += s.messages.len();
                    count >= MAX_GROUP
                });
            }
        }
        work.commit(group).await;
    }
    // What the publisher published last; left behind, it would be published
    // again at the next start (and absorbed as a repeat).
    remove_or_warn(&work.outbox, &work.unremoved.take()).await;
}

/// Removes published messages from the outbox; what fails to go stays
/// there, and the relay publishes it again (absorbed as a repeat).
async fn remove_or_warn(outbox: &OutboxRepo, published: &BTreeMap<RoomId, u64>) {
    if let Err(e) = outbox.remove(published).await {
        tracing::warn!(error = %e, "published, but not removed from the outbox; the relay will publish it again");
    }
}

impl GroupLoop {
    /// Accepts `group` in one transaction that also removes what was
    /// published, and answers each of its requests.
    async fn commit(&mut self, mut group: Vec<Submission>) {
        let published = self.unremoved.take();
        if group.is_empty() {
            remove_or_warn(&self.outbox, &published).await;
            return;
        }
        let began = Instant::now();
        for submission in &group {
            let waited = began.saturating_duration_since(submission.queued_at);
            self.metrics.wait.observe(waited.as_secs_f64());
        }
        let sizes: Vec<usize> = group.iter().map(|s| s.messages.len()).collect();
        let messages: Vec<NewMessage> = group
            .iter_mut()
            .flat_map(|s| std::mem::take(&mut s.messages))
            .collect();
        self.metrics.messages.observe(messages.len() as f64);
        let accepted = self.outbox.accept(messages, &published).await;
        self.metrics.duration.observe(began.elapsed().as_secs_f64());
        let Acceptance { outcomes, queued } = match accepted {
            Ok(acceptance) => acceptance,
            Err(e) => {
                // Every request of the group is answered `unavailable`;
                // the next transaction removes what this one did not.
                self.unremoved.add(published);
                store_unavailable(&e);
                self.outbox.mend_writer().await;
                return;
            }
        };
        let mut outcomes = outcomes.into_iter();
        let mut publish = Committed {
            queued,
            headers: HashMap::with_capacity(outcomes.len()),
        };
        for (submission, size) in group.into_iter().zip(sizes) {
            let mine: Vec<_> = outcomes.by_ref().take(size).collect();
            for event in mine.iter().flatten().filter_map(|a| match a {
                Accepted::New(event) => Some(event),
                Accepted::Repeat(_) => None,
            }) {
                self.metrics.accepted.inc();
                publish
                    .headers
                    .insert(event.message_id, submission.headers.clone());
            }
            let _ = submission.reply.send(mine);
        }
        if !publish.queued.is_empty() && self.committed.try_send(publish).is_err() {
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
    let mut next: LastPublished = HashMap::with_capacity(queued.len());
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
    /// The stream's name, for [`unhidra_bus::Bus::consumed`].
    rooms_stream: String,
    outbox: OutboxRepo,
    published: IntCounter,
    /// Taken by each publishing round of the publisher and the relay: in
    /// one process a round never publishes what another is publishing (on
    /// SQLite the outbox holds no lock meanwhile), even when the publisher
    /// falls so far behind that its rooms look stale to the relay. It holds
    /// what this process published of each room.
    last_published: Arc<tokio::sync::Mutex<LastPublished>>,
    /// Published from memory, until the stream's consumers have it.
    unconsumed: Arc<Published>,
    /// On SQLite, where the group commit removes what was published.
    unremoved: Option<Arc<Published>>,
}

impl Publisher {
    /// Publishes committed groups until shutdown, removing what was
    /// published from the outbox as the stream's consumers have it; ends
    /// once what it published before shutdown was removed (or the stream's
    /// consumers never had it).
    async fn run(self, queue: mpsc::Receiver<Committed>) {
        let done = CancellationToken::new();
        let publishing = async {
            self.publish_committed(queue).await;
            done.cancel();
        };
        tokio::join!(publishing, self.remove_once_consumed(&done));
    }

    /// Removes what was published from memory once every consumer of the
    /// stream has it: at once on JetStream; in the in-process stream, which
    /// ends with the process, once history-service stored it, so that a
    /// crash meanwhile leaves it in the outbox for the relay. The publisher
    /// goes on meanwhile. Returns after `publishing_done`, once the last of
    /// it is removed.
    async fn remove_once_consumed(&self, publishing_done: &CancellationToken) {
        loop {
            let last_round = publishing_done.is_cancelled();
            let mut published = self.unconsumed.take();
            if !published.is_empty() {
                if let Err(e) = self.ctx.bus.consumed(&self.rooms_stream).await {
                    tracing::warn!(error = %e, "published, but not removed from the outbox; the relay will publish it again");
                    published.clear();
                }
            }
            if last_round {
                // The group commit may have stopped: what it was still to
                // remove goes too, at once.
                self.remove_now(published).await;
                return;
            }
            let removed_now = self.unremoved.is_none() && !published.is_empty();
            self.remove(published).await;
            if removed_now {
                // Each removal is a statement and a commit of its own:
                // what is published meanwhile goes with the next one.
                tokio::select! {
                    () = tokio::time::sleep(REMOVAL_INTERVAL) => {}
                    () = publishing_done.cancelled() => {}
                }
            }
            tokio::select! {
                () = self.unconsumed.added.notified() => {}
                () = publishing_done.cancelled() => {}
            }
        }
    }

    /// Removes published messages from the outbox: on SQLite the next
    /// group's transaction does, on Postgres the publisher at once.
    async fn remove(&self, highest: BTreeMap<RoomId, u64>) {
        match &self.unremoved {
            Some(unremoved) => unremoved.add(highest),
            None => remove_or_warn(&self.outbox, &highest).await,
        }
    }

    /// Removes published messages, and on SQLite whatever the group commit
    /// was yet to remove, at once.
    async fn remove_now(&self, highest: BTreeMap<RoomId, u64>) {
        let all = match &self.unremoved {
            Some(unremoved) => {
                unremoved.add(highest);
                unremoved.take()
            }
            None => highest,
        };
        remove_or_warn(&self.outbox, &all).await;
    }

    /// Publishes each committed group (with whatever queued meanwhile) until
    /// shutdown: a room's messages straight from memory when they continue
    /// what this process published of the room, else from the outbox.
    async fn publish_committed(&self, mut queue: mpsc::Receiver<Committed>) {
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
    /// rooms, for removal from the outbox once consumed; on failure they stay
    /// there and their rooms are published from the outbox next time.
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
        let sent = match Publication::new(&self.ctx.subjects, continuing, headers) {
            Ok(publication) => publication.send(self.ctx.bus.as_ref()).await,
            Err(e) => {
                tracing::error!(error = %e, "messages not publishable; the relay will retry");
                return;
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "publish failed; the relay will retry");
            return;
        }
        self.published.inc_by(count as u64);
        last.extend(highest.iter().map(|(room, seq)| (*room, *seq)));
        self.unconsumed.add(highest);
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
                .stale_rooms(now_millis() - RELAY_GRACE_MS, RELAY_ROWS)
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
    /// failure the rest stays for the relay. A round's messages leave the
    /// outbox once the stream's consumers have them (at once where the
    /// stream outlives the process).
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
            let (bus, stream) = (&self.ctx.bus, &self.rooms_stream);
            let mut highest = BTreeMap::new();
            let round = self
                .outbox
                .publish(rooms, PUBLISH_LIMIT, |pending| {
                    highest.extend(pending.iter().map(|p| (p.room, p.seq)));
                    let publication = Publication::new(&self.ctx.subjects, pending, &mut headers);
                    async move {
                        publication?.send(bus.as_ref()).await?;
                        Ok(bus.consumed(stream).await?)
                    }
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
    use anyhow::Context;
    use unhidra_core::{ids::UserId, rooms::Visibility};
    use unhidra_testkit::TestDatabase;

    use super::*;
    use crate::rooms::{Caps, Room, RoomRepo};

    /// A group commit on a fresh database, its queue's sender, and one room
    /// and its owner.
    async fn group_commit(
        db: &TestDatabase,
    ) -> anyhow::Result<(GroupLoop, mpsc::Sender<Submission>, RoomId, UserId)> {
        let database = crate::bench::open(db.url()).await?;
        let caps = Caps {
            rooms_per_user: 10,
            members_per_room: 10,
        };
        let room = Room {
            id: RoomId::new(),
            name: "room".to_owned(),
            visibility: Visibility::Public,
        };
        let owner = UserId::new();
        RoomRepo::new(database.clone(), caps)
            .create(&room, owner)
            .await??;
        // Nothing publishes what is committed: each test plays the publisher.
        let (submit, queue) = mpsc::channel(1);
        let (committed, _) = mpsc::channel(1);
        let work = GroupLoop {
            outbox: OutboxRepo::new(database, Duration::from_secs(60)),
            queue,
            unremoved: Arc::default(),
            committed,
            metrics: GroupMetrics::register(&Metrics::new()?)?,
            linger: Duration::ZERO,
        };
        Ok((work, submit, room.id, owner))
    }

    /// A request of `count` messages to `room`, and where its acks arrive.
    fn request(
        room: RoomId,
        sender: UserId,
        count: usize,
    ) -> (
        Submission,
        oneshot::Receiver<Vec<Result<Accepted, Refusal>>>,
    ) {
        let (reply, acks) = oneshot::channel();
        let messages = (0..count)
            .map(|i| NewMessage {
                room,
                sender,
                body: format!("message {i}"),
                sent_at: Utc::now(),
                client_id: None,
            })
            .collect();
        let submission = Submission {
            messages,
            headers: Headers::new(),
            reply,
            queued_at: Instant::now(),
        };
        (submission, acks)
    }

    /// The sequence each ack names; `None` for a refusal.
    fn acked_seqs(acks: Vec<Result<Accepted, Refusal>>) -> Vec<Option<u64>> {
        acks.into_iter()
            .map(|a| a.ok().map(|a| a.ack().seq))
            .collect()
    }

    /// The sequences of `room` still in the outbox.
    async fn queued(outbox: &OutboxRepo, room: RoomId) -> Vec<u64> {
        let mut seqs = Vec::new();
        // A publish that fails leaves everything in place.
        let looked = outbox
            .publish(&[room], 100, |pending| {
                seqs = pending.iter().map(|p| p.seq).collect();
                async { anyhow::bail!("only looking") }
            })
            .await;
        assert!(looked.is_err() || seqs.is_empty());
        seqs
    }

    #[tokio::test]
    async fn on_sqlite_the_next_group_removes_what_was_published() -> anyhow::Result<()> {
        let db = TestDatabase::sqlite().await?;
        let (mut work, _submit, room, owner) = group_commit(&db).await?;
        let (first, _) = request(room, owner, 3);
        work.commit(vec![first]).await;
        assert_eq!(queued(&work.outbox, room).await, [1, 2, 3]);

        // The publisher published 1 and 2; the next group takes them out.
        work.unremoved.add(BTreeMap::from([(room, 2)]));
        let (next, acks) = request(room, owner, 1);
        work.commit(vec![next]).await;
        assert_eq!(acked_seqs(acks.await?), [Some(4)]);
        assert_eq!(queued(&work.outbox, room).await, [3, 4]);
        Ok(())
    }

    #[tokio::test]
    async fn below_capacity_a_group_waits_the_linger_for_more_requests() -> anyhow::Result<()> {
        let db = TestDatabase::sqlite().await?;
        let (mut work, submit, room, owner) = group_commit(&db).await?;
        work.linger = Duration::from_secs(1);
        let (committed, mut to_publish) = mpsc::channel(4);
        work.committed = committed;
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(commit_groups(work, shutdown.clone()));

        let (first, first_acks) = request(room, owner, 1);
        submit.send(first).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (second, second_acks) = request(room, owner, 2);
        submit.send(second).await?;
        // One transaction for both, numbered in the order submitted.
        let group = to_publish.recv().await.context("nothing committed")?;
        let seqs: Vec<u64> = group.queued.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(acked_seqs(first_acks.await?), [Some(1)]);
        assert_eq!(acked_seqs(second_acks.await?), [Some(2), Some(3)]);
        shutdown.cancel();
        running.await?;
        Ok(())
    }

    #[tokio::test]
    async fn on_sqlite_an_idle_group_commit_removes_what_was_published() -> anyhow::Result<()> {
        let db = TestDatabase::sqlite().await?;
        let (mut work, _submit, room, owner) = group_commit(&db).await?;
        let (first, _) = request(room, owner, 2);
        work.commit(vec![first]).await;
        let (outbox, unremoved) = (work.outbox.clone(), work.unremoved.clone());
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(commit_groups(work, shutdown.clone()));

        // No group comes: the loop wakes for the removal alone.
        unremoved.add(BTreeMap::from([(room, 2)]));
        queued_until(&outbox, room, &[]).await;
        shutdown.cancel();
        running.await?;
        Ok(())
    }

    #[tokio::test]
    async fn on_sqlite_the_group_commit_removes_what_was_published_as_it_stops()
    -> anyhow::Result<()> {
        let db = TestDatabase::sqlite().await?;
        let (mut work, _submit, room, owner) = group_commit(&db).await?;
        let (first, _) = request(room, owner, 2);
        work.commit(vec![first]).await;
        let outbox = work.outbox.clone();
        work.unremoved.add(BTreeMap::from([(room, 1)]));
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        commit_groups(work, shutdown).await;
        assert_eq!(queued(&outbox, room).await, [2]);
        Ok(())
    }

    /// Waits until `room`'s queued sequences are `expected`.
    async fn queued_until(outbox: &OutboxRepo, room: RoomId, expected: &[u64]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = queued(outbox, room).await;
            if now == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queued {now:?}, not {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A group commit and its publisher on a fresh database and the
    /// in-process bus, with history-service's consumer played by the test.
    struct InProcess {
        ctx: ServiceContext,
        submit: mpsc::Sender<Submission>,
        outbox: OutboxRepo,
        room: RoomId,
        owner: UserId,
        live: unhidra_bus::Subscription,
        history: unhidra_bus::Deliveries,
        tasks: Vec<JoinHandle<()>>,
    }

    const WAIT: Duration = Duration::from_secs(10);

    impl InProcess {
        /// Started with what this process published of `room` before, if
        /// anything (then its next messages go straight from memory).
        async fn start(db: &TestDatabase, published_before: Option<u64>) -> anyhow::Result<Self> {
            let (mut work, submit, room, owner) = group_commit(db).await?;
            let on_sqlite = work.outbox.backend() == Backend::Sqlite;
            let ctx = ServiceContext::connect(
                "test",
                unhidra_core::Config::default(),
                std::future::pending(),
            )
            .await?;
            let rooms_stream = ctx.subjects.rooms_stream();
            ctx.bus.ensure_stream(&rooms_stream).await?;
            let live = ctx.bus.subscribe(&ctx.subjects.room_messages(room)).await?;
            let history = ctx.bus.consume(&ctx.subjects.history_consumer()).await?;
            let (committed, to_publish) = mpsc::channel(4);
            work.committed = committed;
            let last = published_before.map(|seq| (room, seq));
            let publisher = Publisher {
                ctx: ctx.clone(),
                rooms_stream: rooms_stream.name,
                outbox: work.outbox.clone(),
                published: IntCounter::new("published", "published")?,
                last_published: Arc::new(tokio::sync::Mutex::new(last.into_iter().collect())),
                unconsumed: Arc::default(),
                unremoved: on_sqlite.then(|| work.unremoved.clone()),
            };
            let outbox = work.outbox.clone();
            let tasks = vec![
                tokio::spawn(commit_groups(work, ctx.shutdown.clone())),
                tokio::spawn(publisher.run(to_publish)),
            ];
            Ok(Self {
                ctx,
                submit,
                outbox,
                room,
                owner,
                live,
                history,
                tasks,
            })
        }

        /// Submits `count` messages and waits until they were delivered live.
        async fn send(&mut self, count: usize) -> anyhow::Result<()> {
            use futures::StreamExt;

            let (request, _) = request(self.room, self.owner, count);
            self.submit.send(request).await?;
            for _ in 0..count {
                tokio::time::timeout(WAIT, self.live.next())
                    .await?
                    .context("live delivery")?;
            }
            Ok(())
        }

        /// Shuts down and waits for the group commit and the publisher.
        async fn stop(self) -> anyhow::Result<()> {
            self.ctx.shutdown.cancel();
            for task in self.tasks {
                tokio::time::timeout(WAIT, task).await??;
            }
            Ok(())
        }

        /// history-service stores (acknowledges) the deliveries that hold
        /// the next `count` messages.
        async fn store(&mut self, count: usize) -> anyhow::Result<()> {
            use futures::StreamExt;

            let mut stored = 0;
            while stored < count {
                let delivery = tokio::time::timeout(WAIT, self.history.next())
                    .await?
                    .context("history delivery")??;
                let batch: unhidra_core::events::CommittedMessages =
                    serde_json::from_slice(&delivery.message.payload)?;
                stored += batch.messages.len();
                delivery.ack().await?;
            }
            anyhow::ensure!(stored == count, "{stored} messages stored, not {count}");
            Ok(())
        }
    }

    #[tokio::test]
    async fn with_the_in_process_bus_a_message_leaves_the_outbox_once_history_has_it()
    -> anyhow::Result<()> {
        let db = TestDatabase::sqlite().await?;
        let mut chat = InProcess::start(&db, None).await?;
        // The room's first messages since the start go from the outbox;
        // then one that continues them, straight from memory. Each is
        // delivered live at once, but stays queued until history-service
        // acknowledged it (a crash meanwhile would lose it from the
        // in-process stream).
        for (count, seqs) in [(2, vec![1, 2]), (1, vec![3])] {
            chat.send(count).await?;
            tokio::time::sleep(REMOVAL_DELAY * 4).await;
            assert_eq!(queued(&chat.outbox, chat.room).await, seqs);
            chat.store(count).await?;
            queued_until(&chat.outbox, chat.room, &[]).await;
        }
        chat.stop().await
    }

    #[tokio::test]
    async fn on_postgres_the_publisher_removes_what_history_has_in_rounds() -> anyhow::Result<()> {
        let Some(db) = TestDatabase::postgres().await? else {
            return Ok(());
        };
        // Published straight from memory (a publish from the outbox keeps
        // the rows locked until history has them, which `queued` would
        // wait for). The second and third rounds come within
        // `REMOVAL_INTERVAL` of the removal before them, and still leave.
        let mut chat = InProcess::start(&db, Some(0)).await?;
        for (count, seqs, wait) in [
            (2, vec![1, 2], REMOVAL_DELAY * 4),
            (1, vec![3], Duration::ZERO),
            (2, vec![4, 5], Duration::ZERO),
        ] {
            chat.send(count).await?;
            tokio::time::sleep(wait).await;
            assert_eq!(queued(&chat.outbox, chat.room).await, seqs);
            chat.store(count).await?;
            queued_until(&chat.outbox, chat.room, &[]).await;
        }
        chat.stop().await
    }

    #[tokio::test]
    async fn at_shutdown_the_publisher_removes_what_history_stored_after_the_group_commit_stopped()
    -> anyhow::Result<()> {
        let db = TestDatabase::sqlite().await?;
        let mut chat = InProcess::start(&db, Some(0)).await?;
        chat.send(2).await?;
        // The group commit and the publisher stop; history-service stores
        // the two messages only then (as the in-process bus closes).
        chat.ctx.shutdown.cancel();
        tokio::time::sleep(REMOVAL_DELAY * 4).await;
        assert_eq!(queued(&chat.outbox, chat.room).await, [1, 2]);
        chat.store(2).await?;
        for task in chat.tasks {
            tokio::time::timeout(WAIT, task).await??;
        }
        assert_eq!(queued(&chat.outbox, chat.room).await, Vec::<u64>::new());
        Ok(())
    }

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
