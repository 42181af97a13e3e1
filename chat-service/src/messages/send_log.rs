//! On SQLite, the send keys (each accepted send's client id, per user) as a
//! log: a group appends its keys at the end of one B-tree, and a key is found
//! through an index held in memory, not through an index on disk that takes
//! a page per sender in every group's transaction.
//!
//! The index holds a 64-bit hash of each key (user and client id, hashed
//! with this process's random key) and its row's id, about 27 bytes a key
//! with the B-tree's overhead; a hash found is read back from its row
//! (a look-up by id) and compared, so two keys with one hash are told apart.
//! Only one connection writes to a SQLite file at a time, so at the start
//! of each of its group's transactions an instance reads the rows other
//! instances on the same file appended since it last looked (at the first,
//! every row): its index then knows every key stored, and the ids it gives
//! its own rows follow the last. Rows past the time keys are kept are
//! removed a range of ids at a time (every row up to an id appended by a
//! time this instance recorded), always leaving the highest, so an instance
//! that starts later still numbers its rows above every id ever given.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    hash::BuildHasher,
    sync::{Mutex, PoisonError},
};

use futures::TryStreamExt;
use sqlx::AnyConnection;
use unhidra_core::{ids::UserId, rpc::SendAccepted};
use unhidra_store::{Database, now_millis, padded};

use super::outbox::SendKey;

/// The log's table and columns, as a group appends to it.
const SEND_LOG: &str = "send_log (id, user_id, client_id, seq, message_id, created_at)";

/// The send keys' log and its index, shared by an instance's clones of the
/// outbox.
#[derive(Debug)]
pub struct SendLog {
    /// How long a key is remembered, in milliseconds.
    kept_ms: i64,
    index: Mutex<Index>,
}

#[derive(Debug, Default)]
struct Index {
    hasher: std::hash::RandomState,
    /// (hash of the key, id of its row): a key's rows are those under its
    /// hash (one, or more once a key past its time was sent again).
    keys: BTreeSet<(u64, i64)>,
    /// The highest id read or appended: the next read starts above it, and
    /// this instance's next row takes the id after it.
    last_id: i64,
    /// (id, time): every row up to the id was appended at or before the
    /// time (Unix ms), oldest first; one per second of appends at most.
    appended_by: VecDeque<(i64, i64)>,
}

impl Index {
    fn hash(&self, user: UserId, client_id: &str) -> u64 {
        self.hasher.hash_one((user, client_id))
    }

    /// Records that every row up to `id` was appended by `at` (or by the
    /// time recorded before, if later: a clock set back).
    fn appended(&mut self, id: i64, at: i64) {
        self.last_id = self.last_id.max(id);
        match self.appended_by.back_mut() {
            Some(last) if last.1 / 1000 >= at / 1000 => *last = (id.max(last.0), at.max(last.1)),
            _ => self.appended_by.push_back((id, at)),
        }
    }
}

/// A group's keys as appended, for the index once the group committed.
#[derive(Debug)]
pub struct Appended {
    keys: Vec<(u64, i64)>,
    at: i64,
}

/// What the log knows about a group's keys sent before: each key's first
/// ack, while it is kept.
pub type Known = HashMap<(UserId, String), SendAccepted>;

impl SendLog {
    pub fn new(kept_ms: i64) -> Self {
        Self {
            kept_ms,
            index: Mutex::default(),
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads into the index the rows appended since it last looked: by other
    /// instances, on the group's connection inside its transaction (before
    /// its own look-ups and appends); every row the first time. Returns how
    /// many rows it read.
    pub async fn catch_up(&self, conn: &mut AnyConnection) -> anyhow::Result<u64> {
        let after = self.index().last_id;
        // Streamed: at the first, the rows are every key kept.
        let mut rows = sqlx::query_as::<_, (i64, String, String, i64)>(
            "SELECT id, user_id, client_id, created_at FROM send_log WHERE id > $1 ORDER BY id",
        )
        .bind(after)
        .fetch(conn);
        let mut read = 0;
        while let Some((id, user, client_id, created_at)) = rows.try_next().await? {
            let mut index = self.index();
            let hash = index.hash(user.parse()?, &client_id);
            index.keys.insert((hash, id));
            index.appended(id, created_at);
            read += 1;
        }
        Ok(read)
    }

    /// The first acks of the keys among `keys` sent before, while kept:
    /// none without a statement when the index holds none of their hashes
    /// (almost every group), else one look-up of the rows found.
    pub async fn sent_before(
        &self,
        db: &Database,
        conn: &mut AnyConnection,
        keys: &[(UserId, &str)],
    ) -> anyhow::Result<Known> {
        let ids: Vec<i64> = {
            let index = self.index();
            keys.iter()
                .flat_map(|(user, client_id)| {
                    let hash = index.hash(*user, client_id);
                    index.keys.range((hash, i64::MIN)..=(hash, i64::MAX))
                })
                .map(|(_, id)| *id)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let mut known = Known::new();
        if ids.is_empty() {
            return Ok(known);
        }
        let wanted: HashSet<(UserId, &str)> = keys.iter().copied().collect();
        let ids = padded(&ids);
        let sql = format!(
            "SELECT user_id, client_id, seq, message_id FROM send_log
             WHERE id IN ({}) AND created_at > {}",
            db.placeholders(1, ids.len()),
            db.placeholders(1 + ids.len(), 1),
        );
        let mut query = sqlx::query_as::<_, (String, String, i64, String)>(&sql);
        for id in ids {
            query = query.bind(*id);
        }
        let query = query.bind(now_millis().saturating_sub(self.kept_ms));
        for (user, client_id, seq, message_id) in query.fetch_all(conn).await? {
            let user: UserId = user.parse()?;
            if wanted.contains(&(user, client_id.as_str())) {
                let ack = SendAccepted {
                    seq: u64::try_from(seq)?,
                    message_id: message_id.parse()?,
                };
                known.insert((user, client_id), ack);
            }
        }
        Ok(known)
    }

    /// Appends a group's keys, in its transaction, after [`Self::catch_up`]:
    /// they take the ids after the last one stored. The index learns them
    /// from [`Self::committed`].
    pub async fn append(
        &self,
        db: &Database,
        conn: &mut AnyConnection,
        keys: &[SendKey<'_>],
        now: i64,
    ) -> anyhow::Result<Appended> {
        let (first, rows) = {
            let index = self.index();
            let rows: Vec<(i64, u64, &SendKey<'_>)> = keys
                .iter()
                .zip(index.last_id + 1..)
                .map(|(key, id)| (id, index.hash(key.user, key.client_id), key))
                .collect();
            (index.last_id, rows)
        };
        db.insert_rows(conn, SEND_LOG, 6, "", &rows, |query, (id, _, key)| {
            key.bind(query.bind(*id), now)
        })
        .await?;
        tracing::trace!(first = first + 1, count = rows.len(), "send keys appended");
        Ok(Appended {
            keys: rows.iter().map(|(id, hash, _)| (*hash, *id)).collect(),
            at: now,
        })
    }

    /// Puts a group's appended keys in the index, once its transaction
    /// committed.
    pub fn committed(&self, appended: Appended) {
        let Some(&(_, last)) = appended.keys.last() else {
            return;
        };
        let mut index = self.index();
        index.keys.extend(appended.keys);
        index.appended(last, appended.at);
    }

    /// Removes the rows appended before the time keys are kept, from the
    /// log and from the index (all but the highest id stored, see the
    /// module's comment); returns how many rows were removed.
    pub async fn forget_old(&self, db: &Database) -> anyhow::Result<u64> {
        let cutoff = now_millis().saturating_sub(self.kept_ms);
        let through = {
            let mut index = self.index();
            let mut through = None;
            while let Some(&(id, at)) = index.appended_by.front() {
                if at > cutoff {
                    break;
                }
                through = Some(id);
                index.appended_by.pop_front();
            }
            through
        };
        let Some(through) = through else {
            return Ok(0);
        };
        let removed = sqlx::query(
            "DELETE FROM send_log WHERE id <= $1 AND id < (SELECT MAX(id) FROM send_log)",
        )
        .bind(through)
        .execute(&db.pool)
        .await?
        .rows_affected();
        self.index().keys.retain(|&(_, id)| id > through);
        Ok(removed)
    }
}
