//! The in-process bus of the embedded default. Same semantics as NATS within one
//! process: subscriptions see what is published while they listen, queue groups
//! share the load, streams keep each message in memory until every durable
//! consumer acknowledged it (or `max_age` passed), refuse publishes beyond
//! `max_bytes` or `MAX_STREAM_MESSAGES` (like a JetStream interest stream
//! that discards new), and unacknowledged deliveries are redelivered after
//! `ack_wait` or when the consumer resumes. Nothing survives the process:
//! the embedded mode relies on the services' own tables for durability
//! (chat-service keeps each message in its outbox until the stream's
//! consumers have it, [`Bus::consumed`]), and at shutdown the streams close
//! ([`Bus::close_streams`]) so that their consumers handle everything they
//! hold before the process exits.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, stream};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::{
    Bus, BusError, Deliveries, Delivery, Headers, Message, Outgoing, Result, Settle, Subscription,
    matches,
};
use unhidra_core::streams::{ConsumerSpec, StreamSpec};

/// Messages buffered per subscription before new ones are dropped (as NATS does
/// for a slow subscriber).
const SUBSCRIPTION_CAPACITY: usize = 65_536;
/// Messages a stream holds at most, besides `max_bytes`.
const MAX_STREAM_MESSAGES: usize = 100_000;
/// Deliveries a consumer may hold unacknowledged before it gets no new ones.
const MAX_ACK_PENDING: usize = 1_000;

/// An in-process [`Bus`]; clones share the same subjects and streams.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryBus")
    }
}

#[derive(Default)]
struct Inner {
    subscriptions: Mutex<Subscriptions>,
    streams: Mutex<HashMap<String, Arc<MemStream>>>,
    counter: AtomicU64,
    /// Set by [`Bus::close_streams`]; each stream also holds it under its
    /// own lock, where publishes check it.
    closed: AtomicBool,
}

struct Sub {
    /// What of the pattern follows its literal part (and that part's dot),
    /// matched against what of a subject follows the same prefix; `None`
    /// when the pattern has no wildcard.
    wild: Option<String>,
    group: Option<String>,
    tx: mpsc::Sender<Message>,
}

/// Subscriptions by the literal part of their pattern (the tokens before its
/// first wildcard; all of it when it has none): a message is matched only
/// against the patterns whose literal part begins its subject, so an exact
/// subject (a reply inbox, a room followed by a gateway) is found by lookup
/// however many others are listened to.
#[derive(Default)]
struct Subscriptions {
    by_literal: HashMap<String, Vec<Sub>>,
    /// Subscriptions added since dropped ones were last swept out.
    added_since_sweep: usize,
    /// How many keys the last sweep left.
    kept_by_sweep: usize,
}

/// Additions between two sweeps of dropped subscriptions, at the least.
const SWEEP_AT_LEAST: usize = 64;

/// The tokens of `pattern` before its first wildcard (all of it when it has
/// none).
fn literal_part(pattern: &str) -> &str {
    let mut end = 0;
    for (i, token) in pattern.split('.').enumerate() {
        if token == "*" || token == ">" {
            return &pattern[..end];
        }
        end += token.len() + usize::from(i > 0);
    }
    pattern
}

/// `subject`'s prefixes of whole tokens, from none to all of it.
fn prefixes(subject: &str) -> impl Iterator<Item = &str> {
    std::iter::once("")
        .chain(
            subject
                .match_indices('.')
                .map(move |(dot, _)| &subject[..dot]),
        )
        .chain(std::iter::once(subject))
}

impl Subscriptions {
    fn add(&mut self, pattern: &str, group: Option<&str>, tx: mpsc::Sender<Message>) {
        // Subscriptions dropped since are swept out once as many were added
        // as the last sweep kept: the map stays within about twice what is
        // listening, and a request's reply inbox costs no walk over every
        // room followed.
        self.added_since_sweep += 1;
        if self.added_since_sweep >= self.kept_by_sweep.max(SWEEP_AT_LEAST) {
            self.by_literal.retain(|_, subs| {
                subs.retain(|s| !s.tx.is_closed());
                !subs.is_empty()
            });
            self.added_since_sweep = 0;
            self.kept_by_sweep = self.by_literal.len();
        }
        let literal = literal_part(pattern);
        let wild = match pattern.get(literal.len()..) {
            Some("") | None => None,
            Some(wild) if literal.is_empty() => Some(wild),
            Some(dot_wild) => dot_wild.get(1..),
        };
        self.by_literal
            .entry(literal.to_owned())
            .or_default()
            .push(Sub {
                wild: wild.map(str::to_owned),
                group: group.map(str::to_owned),
                tx,
            });
    }

    /// The live subscriptions matching `subject`: under each of its
    /// prefixes, those whose wildcard part matches what follows the prefix.
    /// Closed ones are skipped here and swept out by [`Subscriptions::add`]:
    /// a publish looks up each prefix of its subject once.
    fn matching(&self, subject: &str) -> Vec<&Sub> {
        let mut found = Vec::new();
        for prefix in prefixes(subject) {
            let Some(subs) = self.by_literal.get(prefix) else {
                continue;
            };
            let after = if prefix.is_empty() {
                Some(subject)
            } else {
                subject.get(prefix.len() + 1..)
            };
            found.extend(subs.iter().filter(|s| {
                !s.tx.is_closed()
                    && match (&s.wild, after) {
                        (None, after) => after.is_none(),
                        (Some(wild), Some(after)) => matches(wild, after),
                        (Some(_), None) => false,
                    }
            }));
        }
        found
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data behind
    // (every critical section is a few map operations), so poisoning is ignored.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands `message` to matching subscribers; returns how many got it.
    fn deliver(&self, message: &Message) -> usize {
        let pick = self.inner.counter.fetch_add(1, Ordering::Relaxed) as usize;
        let subscriptions = lock(&self.inner.subscriptions);
        let mut groups: HashMap<&str, Vec<&Sub>> = HashMap::new();
        let mut delivered = 0;
        for sub in subscriptions.matching(&message.subject) {
            match &sub.group {
                Some(group) => groups.entry(group).or_default().push(sub),
                None => delivered += usize::from(offer(sub, message)),
            }
        }
        for members in groups.values() {
            delivered += usize::from(offer(members[pick % members.len()], message));
        }
        delivered
    }

    fn stream_for(&self, subject: &str) -> Option<Arc<MemStream>> {
        lock(&self.inner.streams)
            .values()
            .find(|s| {
                lock(&s.state)
                    .spec
                    .subjects
                    .iter()
                    .any(|p| matches(p, subject))
            })
            .cloned()
    }

    fn add_subscription(&self, pattern: &str, group: Option<&str>) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        lock(&self.inner.subscriptions).add(pattern, group, tx);
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) }).boxed()
    }
}

fn offer(sub: &Sub, message: &Message) -> bool {
    match sub.tx.try_send(message.clone()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(subject = %message.subject, "slow subscriber, message dropped");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<()> {
        let message = Message {
            subject: subject.to_owned(),
            headers,
            payload,
            reply: None,
        };
        if let Some(stream) = self.stream_for(subject) {
            // Not acknowledged: like a core NATS publish, it is delivered live
            // even when its stream is full.
            if let Err(e) = stream.append(None, message.clone()) {
                tracing::warn!(error = %e, "message not stored");
            }
        }
        self.deliver(&message);
        Ok(())
    }

    async fn publish_durable(
        &self,
        subject: &str,
        msg_id: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<()> {
        let stream = self
            .stream_for(subject)
            .ok_or_else(|| BusError::NoStream(subject.to_owned()))?;
        let message = Message {
            subject: subject.to_owned(),
            headers,
            payload,
            reply: None,
        };
        if stream.append(Some(msg_id), message.clone())? {
            self.deliver(&message);
        }
        Ok(())
    }

    async fn publish_durable_batch(&self, messages: Vec<Outgoing>) -> Result<()> {
        for m in messages {
            self.publish_durable(&m.subject, &m.msg_id, m.headers, m.payload)
                .await?;
        }
        Ok(())
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription> {
        Ok(self.add_subscription(pattern, None))
    }

    async fn subscribe_queue(&self, pattern: &str, group: &str) -> Result<Subscription> {
        Ok(self.add_subscription(pattern, Some(group)))
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        let inbox = format!(
            "_INBOX.{}",
            self.inner.counter.fetch_add(1, Ordering::Relaxed)
        );
        let mut replies = self.add_subscription(&inbox, None);
        let request = Message {
            subject: subject.to_owned(),
            headers,
            payload,
            reply: Some(inbox.clone()),
        };
        if self.deliver(&request) == 0 {
            lock(&self.inner.subscriptions).by_literal.remove(&inbox);
            return Err(BusError::NoResponders(subject.to_owned()));
        }
        let reply = match tokio::time::timeout(timeout, replies.next()).await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(BusError::Transport("reply subscription closed".into())),
            Err(_) => Err(BusError::Timeout(subject.to_owned())),
        };
        drop(replies);
        lock(&self.inner.subscriptions).by_literal.remove(&inbox);
        reply
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<()> {
        let stream = Arc::clone(
            lock(&self.inner.streams)
                .entry(spec.name.clone())
                .or_insert_with(|| Arc::new(MemStream::new(spec.clone()))),
        );
        let mut state = lock(&stream.state);
        state.spec = spec.clone();
        state.closed |= self.inner.closed.load(Ordering::SeqCst);
        for consumer in &spec.consumers {
            state.add_consumer(consumer);
        }
        Ok(())
    }

    async fn consume(&self, spec: &ConsumerSpec) -> Result<Deliveries> {
        let stream = lock(&self.inner.streams)
            .get(&spec.stream)
            .cloned()
            .ok_or_else(|| BusError::UnknownStream(spec.stream.clone()))?;
        stream.resume_consumer(spec);
        let durable = spec.durable.clone();
        Ok(
            stream::unfold((stream, durable), |(stream, durable)| async move {
                let delivery = stream.next_delivery(&durable).await?;
                Some((Ok(delivery), (stream, durable)))
            })
            .boxed(),
        )
    }

    async fn consumer_pending(&self, spec: &ConsumerSpec) -> Result<u64> {
        let stream = lock(&self.inner.streams)
            .get(&spec.stream)
            .cloned()
            .ok_or_else(|| BusError::UnknownStream(spec.stream.clone()))?;
        let state = lock(&stream.state);
        let Some(consumer) = state.consumers.get(&spec.durable) else {
            return Ok(0);
        };
        let undelivered = state
            .messages
            .range(consumer.next_seq..)
            .filter(|(_, (_, m))| {
                consumer
                    .spec
                    .filter
                    .as_deref()
                    .is_none_or(|f| matches(f, &m.subject))
            })
            .count();
        Ok((undelivered + consumer.pending.len()) as u64)
    }

    async fn consumed(&self, stream: &str) -> Result<()> {
        let Some(stream) = lock(&self.inner.streams).get(stream).cloned() else {
            return Ok(());
        };
        let done = {
            let mut state = lock(&stream.state);
            state.discard_processed();
            if state.consumers.is_empty() || state.messages.is_empty() {
                return Ok(());
            }
            let (done, consumed) = oneshot::channel();
            let mark = state.last_seq;
            state.consumed_waiters.entry(mark).or_default().push(done);
            consumed
        };
        // Dropped unanswered only with the stream itself.
        done.await.map_err(|_| BusError::Closed)
    }

    async fn healthy(&self) -> bool {
        true
    }

    fn streams_outlive_process(&self) -> bool {
        false
    }

    async fn close_streams(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let streams: Vec<Arc<MemStream>> = lock(&self.inner.streams).values().cloned().collect();
        for stream in streams {
            lock(&stream.state).closed = true;
            // Consumers waiting for more learn that nothing more comes.
            stream.changed.notify_waiters();
        }
    }
}

struct MemStream {
    state: Mutex<StreamState>,
    changed: Notify,
}

struct StreamState {
    spec: StreamSpec,
    last_seq: u64,
    messages: BTreeMap<u64, (Instant, Message)>,
    /// What `messages` take, as [`size`] counts it.
    bytes: u64,
    recent_ids: VecDeque<(Instant, String)>,
    recent_id_set: HashSet<String>,
    consumers: HashMap<String, ConsumerState>,
    /// Callers of [`Bus::consumed`], by the last sequence they wait for.
    consumed_waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
    /// Shutting down: publishes are refused, and a consumer with nothing
    /// left to be given or to acknowledge is done.
    closed: bool,
}

struct ConsumerState {
    spec: ConsumerSpec,
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    /// No pending delivery is due before this (`None`: none is pending), so
    /// handing out new messages does not look through every pending one.
    due_from: Option<Instant>,
}

impl ConsumerState {
    /// The pending delivery of `seq` is due (again) at `due`.
    fn set_due(&mut self, seq: u64, due: Instant) {
        if let Some(pending) = self.pending.get_mut(&seq) {
            pending.due = due;
            self.due_no_later_than(due);
        }
    }

    fn due_no_later_than(&mut self, due: Instant) {
        self.due_from = Some(self.due_from.map_or(due, |from| from.min(due)));
    }
}

struct Pending {
    due: Instant,
    attempt: u64,
}

enum Next {
    Deliver(u64, Message, u64),
    Wait(Option<Instant>),
    Gone,
}

impl MemStream {
    fn new(spec: StreamSpec) -> Self {
        Self {
            state: Mutex::new(StreamState {
                spec,
                last_seq: 0,
                messages: BTreeMap::new(),
                bytes: 0,
                recent_ids: VecDeque::new(),
                recent_id_set: HashSet::new(),
                consumers: HashMap::new(),
                consumed_waiters: BTreeMap::new(),
                closed: false,
            }),
            changed: Notify::new(),
        }
    }

    /// Stores a message unless `msg_id` was seen within the duplicate window
    /// (then `false`); refuses it when the stream is full.
    fn append(&self, msg_id: Option<&str>, message: Message) -> Result<bool> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        if state.closed {
            return Err(BusError::Closed);
        }
        state.discard_expired(now);
        let size = size(&message);
        if state.messages.len() >= MAX_STREAM_MESSAGES
            || state.bytes.saturating_add(size) > state.spec.max_bytes
        {
            return Err(BusError::StreamFull(state.spec.name.clone()));
        }
        let window = state.spec.duplicate_window;
        while let Some((at, _)) = state.recent_ids.front() {
            if now.duration_since(*at) < window {
                break;
            }
            if let Some((_, id)) = state.recent_ids.pop_front() {
                state.recent_id_set.remove(&id);
            }
        }
        if let Some(id) = msg_id {
            if !state.recent_id_set.insert(id.to_owned()) {
                return Ok(false);
            }
            state.recent_ids.push_back((now, id.to_owned()));
        }
        state.last_seq += 1;
        let seq = state.last_seq;
        state.messages.insert(seq, (now, message));
        state.bytes += size;
        drop(state);
        self.changed.notify_waiters();
        Ok(true)
    }

    /// Creates the consumer at the start of the stream, or resumes it with every
    /// unacknowledged delivery due again now.
    fn resume_consumer(&self, spec: &ConsumerSpec) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let consumer = state.add_consumer(spec);
        for pending in consumer.pending.values_mut() {
            pending.due = now;
        }
        if !consumer.pending.is_empty() {
            consumer.due_from = Some(now);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    async fn next_delivery(self: &Arc<Self>, durable: &str) -> Option<Delivery> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let next = lock(&self.state).next(durable, Instant::now());
            match next {
                Next::Deliver(seq, message, attempt) => {
                    return Some(Delivery {
                        message,
                        attempt,
                        settle: Box::new(MemorySettle {
                            stream: Arc::clone(self),
                            durable: durable.to_owned(),
                            seq,
                        }),
                    });
                }
                Next::Gone => return None,
                Next::Wait(until) => {
                    let until = until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                    tokio::select! {
                        () = &mut changed => {}
                        () = tokio::time::sleep_until(until.into()) => {}
                    }
                }
            }
        }
    }

    fn settle(&self, durable: &str, seq: u64, redeliver_in: Option<Duration>) {
        let mut state = lock(&self.state);
        let Some(consumer) = state.consumers.get_mut(durable) else {
            return;
        };
        match redeliver_in {
            None => {
                consumer.pending.remove(&seq);
                state.discard_processed();
            }
            Some(delay) => consumer.set_due(seq, Instant::now() + delay),
        }
        drop(state);
        self.changed.notify_waiters();
    }
}

/// What a message takes in a stream: its subject, headers and payload.
fn size(message: &Message) -> u64 {
    let headers: usize = message.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (message.subject.len() + headers + message.payload.len()) as u64
}

impl StreamState {
    /// The consumer `spec` names, created at the start of the stream if new.
    fn add_consumer(&mut self, spec: &ConsumerSpec) -> &mut ConsumerState {
        let consumer = self
            .consumers
            .entry(spec.durable.clone())
            .or_insert_with(|| ConsumerState {
                spec: spec.clone(),
                next_seq: 1,
                pending: BTreeMap::new(),
                due_from: None,
            });
        consumer.spec = spec.clone();
        consumer
    }

    fn remove_first(&mut self) {
        if let Some((_, (_, message))) = self.messages.pop_first() {
            self.bytes = self.bytes.saturating_sub(size(&message));
        }
        // The waiters for everything below the first message left are done.
        let first = self
            .messages
            .first_key_value()
            .map_or(u64::MAX, |(seq, _)| *seq);
        while let Some(waiters) = self.consumed_waiters.first_entry() {
            if *waiters.key() >= first {
                break;
            }
            for done in waiters.remove() {
                let _ = done.send(());
            }
        }
    }

    fn discard_expired(&mut self, now: Instant) {
        let max_age = self.spec.max_age;
        while let Some((_, (at, _))) = self.messages.first_key_value() {
            if now.duration_since(*at) < max_age {
                break;
            }
            self.remove_first();
        }
    }

    /// Removes the oldest messages every consumer has acknowledged (or is
    /// not interested in). With no consumer at all, messages stay until
    /// they expire.
    fn discard_processed(&mut self) {
        if self.consumers.is_empty() {
            return;
        }
        while let Some((&seq, (_, message))) = self.messages.first_key_value() {
            let processed = self.consumers.values().all(|c| {
                let wanted = c
                    .spec
                    .filter
                    .as_deref()
                    .is_none_or(|f| matches(f, &message.subject));
                !wanted || (seq < c.next_seq && !c.pending.contains_key(&seq))
            });
            if !processed {
                break;
            }
            self.remove_first();
        }
    }

    fn next(&mut self, durable: &str, now: Instant) -> Next {
        let Some(consumer) = self.consumers.get_mut(durable) else {
            return Next::Gone;
        };
        let ack_wait = consumer.spec.ack_wait;
        let max_deliver = consumer.spec.max_deliver.map(u64::from);
        // Pending deliveries are looked through only when one may be due,
        // which also learns when the next one is.
        let due: Vec<u64> = if consumer.due_from.is_some_and(|from| from <= now) {
            consumer.due_from = consumer.pending.values().map(|p| p.due).min();
            consumer
                .pending
                .iter()
                .filter(|(_, p)| p.due <= now)
                .map(|(seq, _)| *seq)
                .collect()
        } else {
            Vec::new()
        };
        for seq in due {
            let message = self.messages.get(&seq).map(|(_, m)| m.clone());
            let Some(pending) = consumer.pending.get_mut(&seq) else {
                continue;
            };
            match message {
                Some(message) if max_deliver.is_none_or(|max| pending.attempt < max) => {
                    pending.attempt += 1;
                    let attempt = pending.attempt;
                    consumer.set_due(seq, now + ack_wait);
                    return Next::Deliver(seq, message, attempt);
                }
                _ => {
                    consumer.pending.remove(&seq);
                }
            }
        }
        if consumer.pending.len() < MAX_ACK_PENDING {
            while consumer.next_seq <= self.last_seq {
                let seq = consumer.next_seq;
                consumer.next_seq += 1;
                let Some((_, message)) = self.messages.get(&seq) else {
                    continue;
                };
                let wanted = consumer
                    .spec
                    .filter
                    .as_deref()
                    .is_none_or(|f| matches(f, &message.subject));
                if wanted {
                    let due = now + ack_wait;
                    consumer.pending.insert(seq, Pending { due, attempt: 1 });
                    consumer.due_no_later_than(due);
                    return Next::Deliver(seq, message.clone(), 1);
                }
            }
        }
        if self.closed && consumer.pending.is_empty() && consumer.next_seq > self.last_seq {
            return Next::Gone;
        }
        Next::Wait(consumer.due_from)
    }
}

struct MemorySettle {
    stream: Arc<MemStream>,
    durable: String,
    seq: u64,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(&self) -> Result<()> {
        self.stream.settle(&self.durable, self.seq, None);
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<()> {
        self.stream.settle(&self.durable, self.seq, Some(delay));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::{FutureExt, StreamExt};

    use super::{MemoryBus, literal_part, lock, prefixes};
    use crate::{Bus, Headers};

    #[test]
    fn dropped_subscriptions_are_swept_out_as_new_ones_come() {
        let bus = MemoryBus::new();
        let rooms: Vec<_> = (0..1000)
            .map(|i| bus.add_subscription(&format!("p.room.r{i}.*"), None))
            .collect();
        drop(rooms);
        // Within twice the map's size in additions, a sweep drops them.
        let held: Vec<_> = (0..3000)
            .map(|i| bus.add_subscription(&format!("_INBOX.{i}"), None))
            .collect();
        let keys = lock(&bus.inner.subscriptions).by_literal.len();
        assert_eq!(keys, held.len(), "the dropped room subscriptions are gone");
    }

    #[tokio::test]
    async fn a_message_reaches_every_pattern_matching_its_subject_once() {
        let bus = MemoryBus::new();
        let patterns = [
            "p.room.r1.*",
            "p.room.*.messages",
            "p.room.r1.messages",
            "p.>",
            ">",
            "*.room.r1.>",
            "p.room.r1",
            "p.room.r1.messages.>",
            "p.room.r2.*",
            "p.room.*",
            "q.>",
        ];
        let mut subscriptions = Vec::new();
        for pattern in patterns {
            subscriptions.push((pattern, bus.subscribe(pattern).await.expect("subscribed")));
        }
        bus.publish(
            "p.room.r1.messages",
            Headers::new(),
            Bytes::from_static(b"m"),
        )
        .await
        .expect("published");
        let mut reached = Vec::new();
        for (pattern, subscription) in &mut subscriptions {
            while let Some(Some(message)) = subscription.next().now_or_never() {
                assert_eq!(message.subject, "p.room.r1.messages");
                reached.push(*pattern);
            }
        }
        assert_eq!(reached, patterns[..6]);
    }

    #[test]
    fn patterns_are_found_under_the_prefixes_of_the_subjects_they_match() {
        assert_eq!(literal_part("p.room.r1.*"), "p.room.r1");
        assert_eq!(literal_part("p.room.*.members"), "p.room");
        assert_eq!(literal_part(">"), "");
        assert_eq!(literal_part("p.rpc.chat.send"), "p.rpc.chat.send");
        let subject = "p.room.r1.messages";
        let all: Vec<&str> = prefixes(subject).collect();
        assert_eq!(all, ["", "p", "p.room", "p.room.r1", "p.room.r1.messages"]);
        for pattern in ["p.room.r1.*", "p.room.*.messages", ">", subject] {
            assert!(all.contains(&literal_part(pattern)), "{pattern}");
        }
    }
}
