//! Accepted messages and the outbox. A group of sends is accepted in one
//! transaction: each room's sequence advances once for the whole group (one
//! statement for all its rooms, not one per message), and every accepted event is queued
//! in the outbox, so sequences have no gaps and an accepted message is never
//! lost. Publishing takes a room's queued messages from its lowest sequence
//! on, publishes them in that order and only then removes them, so whoever
//! publishes a room's messages (any chat-service instance, or the relay)
//! publishes every earlier queued one first.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::AnyConnection;
use unhidra_core::{
    events::{RoomMessage, SCHEMA_VERSION},
    ids::{MessageId, RoomId, UserId},
    rpc::SendAccepted,
};
use unhidra_store::{
    AnyQuery, Backend, Database, MAX_ROWS_PER_STATEMENT, bind_rows, is_unique_violation_in,
    now_millis, padded,
};

use super::send_log::{Known, SendLog};
use crate::rooms::Refusal;

/// One message to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub room: RoomId,
    pub sender: UserId,
    pub body: String,
    pub sent_at: DateTime<Utc>,
    /// The sender's id for the send: accepted once per sender while it is
    /// remembered.
    pub client_id: Option<String>,
}

/// What accepting one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// A new message of the room, numbered and queued for publishing.
    New(RoomMessage),
    /// The sender sent this client id before: the message it posted then.
    Repeat(SendAccepted),
}

impl Accepted {
    pub fn ack(&self) -> SendAccepted {
        match self {
            Self::New(event) => SendAccepted {
                seq: event.seq,
                message_id: event.message_id,
            },
            Self::Repeat(ack) => ack.clone(),
        }
    }
}

/// A queued message as the publisher takes it: its event, serialised once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub message_id: MessageId,
    pub room: RoomId,
    pub seq: u64,
    pub payload: String,
}

#[derive(Clone, Debug)]
pub struct OutboxRepo {
    db: Database,
    /// How long a send's client id is remembered, in milliseconds.
    keys_kept_ms: i64,
    /// On Postgres, how a group's send keys are stored when its repeats
    /// were looked up: a key remembered past its time is replaced; one
    /// still kept is left as it is, and not counted.
    keys_upsert: String,
    /// On SQLite, the send keys' log and this instance's index of it,
    /// shared by clones.
    send_log: Option<Arc<SendLog>>,
    /// Shared by clones: [`Removed`].
    removed: Arc<Removed>,
}

/// The rows of a room a removal takes: its sequences above `above`, through
/// `through`.
#[derive(Debug, Clone, Copy)]
struct Removal {
    room: RoomId,
    above: u64,
    through: u64,
}

/// Rooms whose removals this process remembers at most; beyond that it
/// forgets them all, and the next removal of each reads from its lowest.
const REMEMBERED_REMOVALS: usize = 100_000;

/// Each room's sequence through which this process removed the outbox's
/// rows, in a committed transaction: none at or below it is left, and none
/// comes back (a room's new messages are numbered above its last one). A
/// removal reads only the range above it: a range from the room's lowest
/// would read every row removed before as well, until the table is
/// vacuumed, so each removal would cost more than the one before.
#[derive(Debug, Default)]
struct Removed(Mutex<HashMap<RoomId, u64>>);

impl Removed {
    /// The room's sequence removed through, or 0.
    fn through(&self, room: RoomId) -> u64 {
        let removed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        removed.get(&room).copied().unwrap_or(0)
    }

    /// Records `published` as removed, once the transaction that removed it
    /// committed.
    fn committed(&self, published: &BTreeMap<RoomId, u64>) {
        let mut removed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if removed.len() + published.len() > REMEMBERED_REMOVALS {
            removed.clear();
        }
        for (room, seq) in published {
            let through = removed.entry(*room).or_default();
            *through = (*through).max(*seq);
        }
    }
}

/// The send keys' table and columns, as a group inserts them on Postgres.
const SEND_KEYS: &str = "send_keys (user_id, client_id, seq, message_id, created_at)";
/// The outbox's table and columns, as a group inserts them.
const OUTBOX: &str = "outbox (message_id, room_id, seq, payload, created_at)";

/// Of the pairs `wanted (room_id, user_id)`, those whose user may not send
/// to the room, with the room's id if it exists ([`RefusedPair`]): one index
/// lookup per pair, not per combination of rooms and users.
const REFUSED_PAIRS: &str = "SELECT DISTINCT wanted.room_id, wanted.user_id, r.id AS found
     FROM wanted
     LEFT JOIN rooms r ON r.id = wanted.room_id
     LEFT JOIN room_members m ON m.room_id = wanted.room_id AND m.user_id = wanted.user_id
     WHERE m.user_id IS NULL";

/// Advances the sequence of each room in `counts (id, n)` and `locked` by
/// its count; returns each room's id and last sequence. Postgres.
const NUMBER_LOCKED: &str = "UPDATE rooms SET last_seq = rooms.last_seq + counts.n
     FROM counts JOIN locked ON locked.id = counts.id
     WHERE rooms.id = counts.id
     RETURNING rooms.id, rooms.last_seq";

/// `counts (id, n)`, each room and its count, from `values`: value rows
/// padded with copies of the last ([`padded`]), which are left out. Each
/// copy would join every other: a group over 65 rooms, padded to 128, would
/// join 4,096 rows for its last room.
fn counts_of(values: &str) -> String {
    format!("counts (id, n) AS (SELECT DISTINCT * FROM (VALUES {values}) AS v)")
}

/// A (room, sender) pair refused, and the room's id if it exists.
type RefusedPair = (String, String, Option<String>);

/// A send's key, as a group stores it.
pub(super) struct SendKey<'a> {
    pub user: UserId,
    pub client_id: &'a str,
    seq: u64,
    message_id: MessageId,
}

impl SendKey<'_> {
    /// Binds the values of [`SEND_KEYS`]'s columns (on SQLite, the log's
    /// after its id).
    pub fn bind<'q>(&'q self, query: AnyQuery<'q>, now: i64) -> anyhow::Result<AnyQuery<'q>> {
        Ok(query
            .bind(self.user.to_string())
            .bind(self.client_id)
            .bind(i64::try_from(self.seq)?)
            .bind(self.message_id.to_string())
            .bind(now))
    }
}

impl Pending {
    /// Binds the values of [`OUTBOX`]'s columns.
    fn bind<'q>(&'q self, query: AnyQuery<'q>, now: i64) -> anyhow::Result<AnyQuery<'q>> {
        Ok(query
            .bind(self.message_id.to_string())
            .bind(self.room.to_string())
            .bind(i64::try_from(self.seq)?)
            .bind(self.payload.as_str())
            .bind(now))
    }
}

/// What accepting a group did: one outcome per message, in order, and the
/// new messages as they were queued, in the order numbered.
#[derive(Debug, Default)]
pub struct Acceptance {
    pub outcomes: Vec<Result<Accepted, Refusal>>,
    pub queued: Vec<Pending>,
}

/// How one message of a group is to be accepted.
enum Plan {
    Refused(Refusal),
    /// Sent before (in an earlier group): that message.
    Repeat(SendAccepted),
    /// Sent earlier in this group: the same as message `i`.
    SameAs(usize),
    New,
}

impl OutboxRepo {
    pub fn new(db: Database, keys_kept: std::time::Duration) -> Self {
        let keys_kept_ms = i64::try_from(keys_kept.as_millis()).unwrap_or(i64::MAX);
        Self {
            keys_kept_ms,
            keys_upsert: format!(
                "ON CONFLICT (user_id, client_id) DO UPDATE SET seq = excluded.seq,
                     message_id = excluded.message_id, created_at = excluded.created_at
                 WHERE send_keys.created_at <= excluded.created_at - {keys_kept_ms}"
            ),
            removed: Arc::default(),
            send_log: (db.backend == Backend::Sqlite).then(|| Arc::new(SendLog::new(keys_kept_ms))),
            db,
        }
    }

    /// This outbox, writing through a connection of its own: for the group
    /// commit ([`Database::with_own_writer`]).
    pub async fn with_own_writer(&self) -> sqlx::Result<Self> {
        Ok(Self {
            db: self.db.with_own_writer().await?,
            ..self.clone()
        })
    }

    /// On SQLite, reads the send keys' log into this instance's index (at
    /// start, so that the first group does not); on Postgres nothing.
    pub async fn read_send_log(&self) -> anyhow::Result<()> {
        if let Some(log) = &self.send_log {
            let started = std::time::Instant::now();
            let keys = log.catch_up(&mut *self.db.pool.acquire().await?).await?;
            tracing::info!(
                keys,
                elapsed_ms = started.elapsed().as_millis(),
                "send keys read"
            );
        }
        Ok(())
    }

    /// After a failed write: [`Database::mend_writer`].
    pub async fn mend_writer(&self) {
        self.db.mend_writer().await;
    }

    /// The database the outbox is in.
    pub fn backend(&self) -> Backend {
        self.db.backend
    }

    /// Accepts every message whose sender is a member of its (existing) room,
    /// numbering each room's messages in the order given; a message whose
    /// sender sent its client id before is not posted again. The same
    /// transaction removes the messages `published` names (each room's
    /// highest sequence published).
    pub async fn accept(
        &self,
        messages: Vec<NewMessage>,
        published: &BTreeMap<RoomId, u64>,
    ) -> anyhow::Result<Acceptance> {
        if messages.is_empty() {
            self.remove(published).await?;
            return Ok(Acceptance::default());
        }
        let acceptance = match &self.send_log {
            Some(log) => self.accept_logged(log, &messages, published).await?,
            None => self.accept_keyed(&messages, published).await?,
        };
        self.removed.committed(published);
        Ok(acceptance)
    }

    /// On SQLite: the group's repeats looked up in the send log's index
    /// (almost always none, without a statement), its keys appended to the
    /// log.
    async fn accept_logged(
        &self,
        log: &SendLog,
        messages: &[NewMessage],
        published: &BTreeMap<RoomId, u64>,
    ) -> anyhow::Result<Acceptance> {
        let mut write = self.db.begin_write().await?;
        self.remove_published(write.conn(), published).await?;
        log.catch_up(write.conn()).await?;
        let keys: Vec<(UserId, &str)> = messages
            .iter()
            .filter_map(|m| Some((m.sender, m.client_id.as_deref()?)))
            .collect();
        let known = log.sent_before(&self.db, write.conn(), &keys).await?;
        let (acceptance, keys) = self.accept_in(write.conn(), messages, &known).await?;
        let now = now_millis();
        let appended = log.append(&self.db, write.conn(), &keys, now).await?;
        self.db
            .insert_rows(
                write.conn(),
                OUTBOX,
                5,
                "",
                &acceptance.queued,
                |query, p| p.bind(query, now),
            )
            .await?;
        write.commit().await?;
        log.committed(appended);
        Ok(acceptance)
    }

    /// On Postgres, where instances write at once and the send keys' unique
    /// index refuses a key stored twice. A send seldom repeats one of an
    /// earlier group (a client retrying after a lost ack), so the first
    /// attempt does not look repeats up: it numbers every send as new and
    /// inserts the send keys plainly, which fails if any key is stored
    /// already. Only then is the group rolled back and accepted again, its
    /// repeats looked up first, its keys upserted: a key remembered past its
    /// time is replaced, and one that another instance stored meanwhile is
    /// not counted, so the next attempt looks it up. (Looking repeats up in
    /// every group cost a statement, and a scan of every kept key whenever
    /// the table's statistics were behind; an upsert in every group cost a
    /// speculative insertion per key: a look-up in the key's index before
    /// the insert, and a record in its log after.)
    async fn accept_keyed(
        &self,
        messages: &[NewMessage],
        published: &BTreeMap<RoomId, u64>,
    ) -> anyhow::Result<Acceptance> {
        // Another instance may store a key between a look-up and the
        // upsert; the next look-up finds it.
        for look_up_repeats in [false, true, true] {
            let mut write = self.db.begin_write().await?;
            self.remove_published(write.conn(), published).await?;
            let known = if look_up_repeats {
                self.sent_before(write.conn(), messages).await?
            } else {
                Known::new()
            };
            let (acceptance, keys) = self.accept_in(write.conn(), messages, &known).await?;
            let queued = self
                .queue(write.conn(), &keys, &acceptance.queued, look_up_repeats)
                .await;
            match queued {
                Ok(stored) if stored == u64::try_from(keys.len())? => {
                    write.commit().await?;
                    return Ok(acceptance);
                }
                // A key another instance stored meanwhile: look it up.
                Ok(_) => {}
                // A key stored before, kept or not: look it up.
                Err(e) if !look_up_repeats && is_unique_violation_in(&e) => {}
                Err(e) => return Err(e),
            }
            // Dropped, the transaction rolls back.
        }
        anyhow::bail!("another instance stored keys of this group's sends in every attempt")
    }

    /// Accepts `messages` on `conn`, in the caller's transaction (`known`:
    /// the repeats looked up): checks and numbers them, and returns what
    /// was accepted and the keys of the new sends, for the caller to store
    /// with the queued messages.
    async fn accept_in<'m>(
        &self,
        conn: &mut AnyConnection,
        messages: &'m [NewMessage],
        known: &Known,
    ) -> anyhow::Result<(Acceptance, Vec<SendKey<'m>>)> {
        let (plans, mut next_seq) = self.check_and_number(conn, messages, known).await?;
        let mut outcomes: Vec<Result<Accepted, Refusal>> = Vec::with_capacity(messages.len());
        let mut queued = Vec::new();
        let mut keys = Vec::new();
        for (m, plan) in messages.iter().zip(plans) {
            match plan {
                Plan::Refused(refusal) => {
                    outcomes.push(Err(refusal));
                    continue;
                }
                Plan::Repeat(ack) => {
                    outcomes.push(Ok(Accepted::Repeat(ack)));
                    continue;
                }
                Plan::SameAs(first) => {
                    let ack = match outcomes.get(first) {
                        Some(Ok(first)) => first.ack(),
                        _ => anyhow::bail!("a repeated send before its first"),
                    };
                    outcomes.push(Ok(Accepted::Repeat(ack)));
                    continue;
                }
                Plan::New => {}
            }
            let seq = next_seq.get_mut(&m.room).context("room numbered above")?;
            let event = RoomMessage {
                v: SCHEMA_VERSION,
                room: m.room,
                seq: *seq,
                message_id: MessageId::new(),
                sender: m.sender,
                body: m.body.clone(),
                sent_at: m.sent_at,
            };
            *seq += 1;
            queued.push(Pending {
                message_id: event.message_id,
                room: event.room,
                seq: event.seq,
                payload: serde_json::to_string(&event)?,
            });
            if let Some(client_id) = &m.client_id {
                keys.push(SendKey {
                    user: m.sender,
                    client_id,
                    seq: event.seq,
                    message_id: event.message_id,
                });
            }
            outcomes.push(Ok(Accepted::New(event)));
        }
        Ok((Acceptance { outcomes, queued }, keys))
    }

    /// How each message is to be accepted (`known`: the repeats looked
    /// up), and each room's first new sequence. On Postgres one statement checks every
    /// sender's membership and numbers the rooms, numbering only if no
    /// sender is refused (almost always); else, and on SQLite, one statement
    /// checks and another numbers what was allowed.
    async fn check_and_number(
        &self,
        conn: &mut AnyConnection,
        messages: &[NewMessage],
        known: &Known,
    ) -> anyhow::Result<(Vec<Plan>, HashMap<RoomId, u64>)> {
        let allowed = match self.db.backend {
            Backend::Postgres => {
                let plans = plan(messages, &vec![Ok(()); messages.len()], known);
                let per_room = new_per_room(messages, &plans);
                if !per_room.is_empty() {
                    let (refused, last) =
                        self.check_and_number_pg(conn, messages, &per_room).await?;
                    if refused.is_empty() {
                        return Ok((plans, first_numbers(&per_room, last)?));
                    }
                    refusals(messages, &refused)
                } else {
                    self.allowed(conn, messages).await?
                }
            }
            Backend::Sqlite => self.allowed(conn, messages).await?,
        };
        let plans = plan(messages, &allowed, known);
        let per_room = new_per_room(messages, &plans);
        let last = self.number(conn, &per_room).await?;
        Ok((plans, first_numbers(&per_room, last)?))
    }

    /// On Postgres: the refused (room, sender) pairs of `messages`, as
    /// [`Self::allowed`] reads them, and, only if there are none, each
    /// room's last sequence after advancing it by its count, as
    /// [`Self::number`] does; in one statement.
    async fn check_and_number_pg(
        &self,
        conn: &mut AnyConnection,
        messages: &[NewMessage],
        per_room: &BTreeMap<RoomId, u64>,
    ) -> anyhow::Result<(Vec<RefusedPair>, Vec<(String, i64)>)> {
        let pairs = sender_pairs(messages);
        let pairs = padded(&pairs);
        let counts: Vec<(&RoomId, &u64)> = per_room.iter().collect();
        let counts = padded(&counts);
        let sql = format!(
            "WITH wanted (room_id, user_id) AS (VALUES {}),
             refused AS ({REFUSED_PAIRS}),
             {},
             locked AS MATERIALIZED (
                 SELECT rooms.id FROM rooms JOIN counts ON rooms.id = counts.id
                 WHERE NOT EXISTS (SELECT 1 FROM refused)
                 ORDER BY rooms.id FOR UPDATE OF rooms),
             numbered AS ({NUMBER_LOCKED})
             SELECT room_id, user_id, found, NULL FROM refused
             UNION ALL SELECT id, NULL, NULL, last_seq FROM numbered",
            self.db.value_rows(2, pairs.len()),
            counts_of(
                &self
                    .db
                    .value_rows_from(1 + 2 * pairs.len(), 2, counts.len())
            ),
        );
        let mut query =
            sqlx::query_as::<_, (String, Option<String>, Option<String>, Option<i64>)>(&sql);
        for (room, user) in pairs {
            query = query.bind(room).bind(user);
        }
        for (room, count) in &counts {
            query = query.bind(room.to_string()).bind(i64::try_from(**count)?);
        }
        let mut refused = Vec::new();
        let mut last = Vec::new();
        for (room, user, found, last_seq) in query.fetch_all(conn).await? {
            match (user, last_seq) {
                (Some(user), _) => refused.push((room, user, found)),
                (None, Some(seq)) => last.push((room, seq)),
                (None, None) => anyhow::bail!("room {room} neither refused nor numbered"),
            }
        }
        Ok((refused, last))
    }

    /// On Postgres: stores the send keys and queues the messages in the
    /// outbox, both in one statement (one round trip). The keys are
    /// inserted plainly (failing if one is stored already), or `upserted`
    /// ([`Self::accept_keyed`]). Returns how many keys were stored (an
    /// upsert does not store a key still kept from an earlier send).
    async fn queue(
        &self,
        conn: &mut AnyConnection,
        keys: &[SendKey<'_>],
        queued: &[Pending],
        upserted: bool,
    ) -> anyhow::Result<u64> {
        let now = now_millis();
        let keys_suffix = if upserted {
            self.keys_upsert.as_str()
        } else {
            ""
        };
        // Each statement inserts a chunk of the outbox's rows and, as its
        // main part, one of the keys (never more of them than rows): its
        // count of rows is the keys stored.
        let mut stored = 0;
        let mut key_chunks = keys.chunks(MAX_ROWS_PER_STATEMENT);
        for rows in queued.chunks(MAX_ROWS_PER_STATEMENT) {
            let keys = key_chunks.next().unwrap_or_default();
            let mut sql = self.db.insert_statement(OUTBOX, 5, "", rows.len(), 1);
            if !keys.is_empty() {
                let first = 1 + 6 * rows.len().next_power_of_two();
                let keys = self
                    .db
                    .insert_statement(SEND_KEYS, 5, keys_suffix, keys.len(), first);
                sql = format!("WITH queued AS ({sql}) {keys}");
            }
            let query = bind_rows(sqlx::query(&sql), rows, &|query, p: &Pending| {
                p.bind(query, now)
            })?;
            let query = bind_rows(query, keys, &|query, key: &SendKey<'_>| {
                key.bind(query, now)
            })?;
            let affected = query.execute(&mut *conn).await?.rows_affected();
            if !keys.is_empty() {
                stored += affected;
            }
        }
        Ok(stored)
    }

    /// Advances each room's sequence by its count, in one statement for all
    /// rooms (on SQLite one more reads them back): each room's last
    /// sequence, as its id and number.
    async fn number(
        &self,
        conn: &mut AnyConnection,
        per_room: &BTreeMap<RoomId, u64>,
    ) -> anyhow::Result<Vec<(String, i64)>> {
        if per_room.is_empty() {
            return Ok(Vec::new());
        }
        let counts: Vec<(&RoomId, &u64)> = per_room.iter().collect();
        let counts = padded(&counts);
        let counted = counts_of(&self.db.value_rows(2, counts.len()));
        Ok(match self.db.backend {
            // Each row locked, in the rooms' order, before it is updated (a
            // wait happens only in that order), so two chat-service
            // instances numbering the same rooms cannot deadlock.
            Backend::Postgres => {
                let sql = format!(
                    "WITH {counted},
                     locked AS MATERIALIZED (
                         SELECT rooms.id FROM rooms JOIN counts ON rooms.id = counts.id
                         ORDER BY rooms.id FOR UPDATE OF rooms)
                     {NUMBER_LOCKED}"
                );
                let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
                for (room, count) in &counts {
                    query = query.bind(room.to_string()).bind(i64::try_from(**count)?);
                }
                query.fetch_all(conn).await?
            }
            // The writer holds SQLite's only write lock, so the rows read
            // back after the update are its own. Read back as one row:
            // each row returned is a hand-off from SQLite's worker thread.
            Backend::Sqlite => {
                let sql = format!(
                    "WITH {counted}
                     UPDATE rooms SET last_seq = rooms.last_seq + counts.n
                     FROM counts WHERE rooms.id = counts.id"
                );
                let mut query = sqlx::query(&sql);
                for (room, count) in &counts {
                    query = query.bind(room.to_string()).bind(i64::try_from(**count)?);
                }
                query.execute(&mut *conn).await?;
                let sql = format!(
                    "SELECT group_concat(id || ' ' || last_seq, ',') FROM rooms WHERE id IN ({})",
                    self.db.placeholders(1, counts.len())
                );
                let mut query = sqlx::query_scalar::<_, Option<String>>(&sql);
                for (room, _) in &counts {
                    query = query.bind(room.to_string());
                }
                let listed = query.fetch_one(conn).await?.unwrap_or_default();
                listed
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (room, last) = pair
                            .split_once(' ')
                            .with_context(|| format!("numbered room `{pair}`"))?;
                        Ok((room.to_owned(), last.parse()?))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
        })
    }

    /// On Postgres: the acks of the sends among `messages` whose sender
    /// sent the same client id within the time keys are kept (one query for
    /// all).
    async fn sent_before(
        &self,
        conn: &mut AnyConnection,
        messages: &[NewMessage],
    ) -> anyhow::Result<Known> {
        let keyed: Vec<&NewMessage> = messages.iter().filter(|m| m.client_id.is_some()).collect();
        if keyed.is_empty() {
            return Ok(Known::new());
        }
        let pairs = unique_pairs(
            keyed
                .iter()
                .filter_map(|m| Some((m.sender.to_string(), m.client_id.clone()?))),
        );
        let pairs = padded(&pairs);
        // One index lookup per (user, client id) pair: `user_id IN (..) AND
        // client_id IN (..)` would look up every combination of the two.
        let sql = format!(
            "WITH wanted (user_id, client_id) AS (VALUES {})
             SELECT k.user_id, k.client_id, k.seq, k.message_id
             FROM wanted JOIN send_keys k
               ON k.user_id = wanted.user_id AND k.client_id = wanted.client_id
             WHERE k.created_at > {}",
            self.db.value_rows(2, pairs.len()),
            self.db.placeholders(1 + 2 * pairs.len(), 1),
        );
        let mut query = sqlx::query_as::<_, (String, String, i64, String)>(&sql);
        for (user, client_id) in pairs {
            query = query.bind(user).bind(client_id);
        }
        let query = query.bind(now_millis().saturating_sub(self.keys_kept_ms));
        let mut known = HashMap::new();
        for (user, client_id, seq, message_id) in query.fetch_all(conn).await? {
            let ack = SendAccepted {
                seq: u64::try_from(seq)?,
                message_id: message_id.parse()?,
            };
            known.insert((user.parse()?, client_id), ack);
        }
        Ok(known)
    }

    /// Forgets the client ids of sends older than the time keys are kept.
    pub async fn forget_old_keys(&self) -> anyhow::Result<u64> {
        if let Some(log) = &self.send_log {
            return log.forget_old(&self.db).await;
        }
        let cutoff = now_millis().saturating_sub(self.keys_kept_ms);
        Ok(sqlx::query("DELETE FROM send_keys WHERE created_at <= $1")
            .bind(cutoff)
            .execute(&self.db.pool)
            .await?
            .rows_affected())
    }

    /// For each message: allowed, or why not (one query for all, which
    /// returns only the refused pairs: on SQLite every row returned is a
    /// hand-off from its worker thread, and a group's pairs are hundreds).
    async fn allowed(
        &self,
        conn: &mut AnyConnection,
        messages: &[NewMessage],
    ) -> anyhow::Result<Vec<Result<(), Refusal>>> {
        let pairs = sender_pairs(messages);
        let pairs = padded(&pairs);
        let sql = format!(
            "WITH wanted (room_id, user_id) AS (VALUES {}) {REFUSED_PAIRS}",
            self.db.value_rows(2, pairs.len()),
        );
        let mut query = sqlx::query_as::<_, RefusedPair>(&sql);
        for (room, user) in pairs {
            query = query.bind(room).bind(user);
        }
        Ok(refusals(messages, &query.fetch_all(conn).await?))
    }

    /// Takes up to `limit` queued messages of `rooms`, the lowest sequence
    /// numbers of each room first, hands them to `publish` sorted by room and
    /// sequence, and removes them from the outbox once `publish` succeeded.
    /// Returns how many were published.
    ///
    /// Whoever publishes a room's messages publishes every earlier queued
    /// one first. On Postgres the rows stay locked while `publish` runs, so a
    /// second publisher of the room waits and then takes only what is left.
    /// On SQLite nothing is held (its one writer would stop every group
    /// commit meanwhile): a second publisher (the relay, another process on
    /// the file) may publish some of the same messages again, each in order
    /// from the room's lowest. The stream stores a message id once within its
    /// duplicate window, and a gateway gives a connection no sequence it gave
    /// it before, so clients still see each message once, in order.
    pub async fn publish<F, Fut>(
        &self,
        rooms: &[RoomId],
        limit: usize,
        publish: F,
    ) -> anyhow::Result<usize>
    where
        F: FnOnce(Vec<Pending>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        if rooms.is_empty() {
            return Ok(0);
        }
        let locked = self.db.backend == Backend::Postgres;
        let rooms = padded(rooms);
        let sql = format!(
            "SELECT message_id, room_id, seq, payload FROM outbox WHERE room_id IN ({})
             ORDER BY room_id, seq LIMIT {limit}{}",
            self.db.placeholders(1, rooms.len()),
            if locked { " FOR UPDATE" } else { "" },
        );
        let mut query = sqlx::query_as::<_, (String, String, i64, String)>(&sql);
        for room in rooms {
            query = query.bind(room.to_string());
        }
        let mut claim = None;
        let rows = if locked {
            let claim = claim.insert(self.db.begin_write().await?);
            query.fetch_all(claim.conn()).await?
        } else {
            query.fetch_all(&self.db.pool).await?
        };
        let mut taken = Vec::with_capacity(rows.len());
        for (message_id, room, seq, payload) in rows {
            taken.push(Pending {
                message_id: message_id
                    .parse()
                    .with_context(|| format!("outbox message id `{message_id}`"))?,
                room: room
                    .parse()
                    .with_context(|| format!("outbox room id `{room}`"))?,
                seq: u64::try_from(seq)?,
                payload,
            });
        }
        if taken.is_empty() {
            return Ok(0);
        }
        taken.sort_by_key(|p| (p.room, p.seq));
        // Each room's highest sequence taken: it and everything below it of
        // the room leave the outbox.
        let published: BTreeMap<RoomId, u64> = taken.iter().map(|p| (p.room, p.seq)).collect();
        let count = taken.len();
        publish(taken).await?;
        let mut write = match claim {
            Some(claim) => claim,
            None => self.db.begin_write().await?,
        };
        self.remove_published(write.conn(), &published)
            .await
            .context("published, but not removed from the outbox")?;
        write.commit().await?;
        self.removed.committed(&published);
        Ok(count)
    }

    /// Removes each room's queued messages up to its given sequence, once
    /// they were published: each statement (of up to 512 rooms) on its own,
    /// since what one that failed leaves is published again and absorbed as
    /// a repeat.
    pub async fn remove(&self, published: &BTreeMap<RoomId, u64>) -> anyhow::Result<()> {
        if published.is_empty() {
            return Ok(());
        }
        let mut write = self.db.write_connection().await?;
        // Each statement commits on its own: what one removed stays removed
        // if the next fails.
        for chunk in self.ranges(published).chunks(MAX_ROWS_PER_STATEMENT) {
            self.remove_ranges(write.conn(), chunk).await?;
            self.removed
                .committed(&chunk.iter().map(|r| (r.room, r.through)).collect());
        }
        Ok(())
    }

    /// Removes each room's queued messages up to its given sequence, in the
    /// caller's transaction.
    async fn remove_published(
        &self,
        conn: &mut AnyConnection,
        published: &BTreeMap<RoomId, u64>,
    ) -> anyhow::Result<()> {
        for chunk in self.ranges(published).chunks(MAX_ROWS_PER_STATEMENT) {
            self.remove_ranges(conn, chunk).await?;
        }
        Ok(())
    }

    /// What removing `published` removes of each room: the rows above
    /// what this process removed of it before ([`Removed`]).
    fn ranges(&self, published: &BTreeMap<RoomId, u64>) -> Vec<Removal> {
        published
            .iter()
            .map(|(&room, &through)| Removal {
                room,
                above: self.removed.through(room),
                through,
            })
            .filter(|r| r.above < r.through)
            .collect()
    }

    async fn remove_ranges(
        &self,
        conn: &mut AnyConnection,
        ranges: &[Removal],
    ) -> anyhow::Result<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        let ranges = padded(ranges);
        let conditions: Vec<String> = (0..ranges.len())
            .map(|i| {
                format!(
                    "(room_id = {} AND seq > {} AND seq <= {})",
                    self.db.placeholders(1 + 3 * i, 1),
                    self.db.placeholders(2 + 3 * i, 1),
                    self.db.placeholders(3 + 3 * i, 1)
                )
            })
            .collect();
        let sql = format!("DELETE FROM outbox WHERE {}", conditions.join(" OR "));
        let mut query = sqlx::query(&sql);
        for range in ranges {
            query = query
                .bind(range.room.to_string())
                .bind(i64::try_from(range.above)?)
                .bind(i64::try_from(range.through)?);
        }
        query.execute(conn).await?;
        Ok(())
    }

    /// The rooms of the oldest `rows` messages queued before `before_ms`
    /// (Unix milliseconds): what the relay publishes after a failed publish
    /// or a crash. They are read oldest first through the `created_at`
    /// index: such a scan marks the removed rows it passes, so the next one
    /// steps over them cheaply instead of reading every row removed since
    /// the table was vacuumed.
    pub async fn stale_rooms(&self, before_ms: i64, rows: i64) -> anyhow::Result<Vec<RoomId>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT room_id FROM
               (SELECT room_id FROM outbox WHERE created_at < $1 ORDER BY created_at LIMIT $2)
               AS stale",
        )
        .bind(before_ms)
        .bind(rows)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|(room,)| {
                room.parse()
                    .with_context(|| format!("outbox room id `{room}`"))
            })
            .collect()
    }
}

/// How each message is to be accepted, given whether its sender may send
/// to its room and the repeats looked up (`known`).
fn plan(messages: &[NewMessage], allowed: &[Result<(), Refusal>], known: &Known) -> Vec<Plan> {
    let mut plans = Vec::with_capacity(messages.len());
    let mut in_group: HashMap<(UserId, &str), usize> = HashMap::with_capacity(messages.len());
    for (i, (m, ok)) in messages.iter().zip(allowed).enumerate() {
        let key = m.client_id.as_deref().map(|id| (m.sender, id));
        plans.push(match (ok, key) {
            (Err(refusal), _) => Plan::Refused(*refusal),
            (Ok(()), Some(key)) => {
                // Repeats are few: most groups look none up.
                let repeat = (!known.is_empty())
                    .then(|| known.get(&(key.0, key.1.to_owned())))
                    .flatten();
                if let Some(ack) = repeat {
                    Plan::Repeat(ack.clone())
                } else if let Some(first) = in_group.get(&key) {
                    Plan::SameAs(*first)
                } else {
                    in_group.insert(key, i);
                    Plan::New
                }
            }
            (Ok(()), None) => Plan::New,
        });
    }
    plans
}

/// Each room's count of new messages.
fn new_per_room(messages: &[NewMessage], plans: &[Plan]) -> BTreeMap<RoomId, u64> {
    let mut per_room = BTreeMap::new();
    for (m, plan) in messages.iter().zip(plans) {
        if matches!(plan, Plan::New) {
            *per_room.entry(m.room).or_default() += 1;
        }
    }
    per_room
}

/// Each message's (room, sender) pair, once.
fn sender_pairs(messages: &[NewMessage]) -> Vec<(String, String)> {
    unique_pairs(
        messages
            .iter()
            .map(|m| (m.room.to_string(), m.sender.to_string())),
    )
}

/// For each message: allowed, or why not, from the pairs refused.
fn refusals(messages: &[NewMessage], refused: &[RefusedPair]) -> Vec<Result<(), Refusal>> {
    if refused.is_empty() {
        return vec![Ok(()); messages.len()];
    }
    let refused: HashMap<(&str, &str), Refusal> = refused
        .iter()
        .map(|(room, user, found)| {
            let refusal = match found {
                None => Refusal::NoSuchRoom,
                Some(_) => Refusal::NotAMember,
            };
            ((room.as_str(), user.as_str()), refusal)
        })
        .collect();
    messages
        .iter()
        .map(
            |m| match refused.get(&(m.room.to_string().as_str(), m.sender.to_string().as_str())) {
                Some(refusal) => Err(*refusal),
                None => Ok(()),
            },
        )
        .collect()
}

fn unique_pairs(pairs: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    pairs.filter(|pair| seen.insert(pair.clone())).collect()
}

/// Each room's first new sequence, from its last one after numbering
/// `per_room`'s count of messages.
fn first_numbers(
    per_room: &BTreeMap<RoomId, u64>,
    last: Vec<(String, i64)>,
) -> anyhow::Result<HashMap<RoomId, u64>> {
    let mut first = HashMap::with_capacity(per_room.len());
    for (room, last) in last {
        let room: RoomId = room.parse().with_context(|| format!("room id `{room}`"))?;
        let count = per_room.get(&room).context("a room numbered unasked")?;
        let seq = u64::try_from(last)?
            .checked_sub(count - 1)
            .with_context(|| format!("room {room} numbered below its own count"))?;
        first.insert(room, seq);
    }
    anyhow::ensure!(
        first.len() == per_room.len(),
        "{} of {} rooms numbered",
        first.len(),
        per_room.len()
    );
    Ok(first)
}
