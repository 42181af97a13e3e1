//! The connections of this gateway, indexed by user and by room so that a room
//! event reaches its member connections without a lookup per recipient. No
//! method holds entries of two maps at once, so they cannot deadlock.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use unhidra_core::{
    ids::{RoomId, SessionId, UserId},
    protocol::close,
};

pub type ConnId = u64;

/// What the writer of a connection sends.
#[derive(Debug, Clone)]
pub enum Outbound {
    Frame(Utf8Bytes),
    Close(u16, &'static str),
}

/// How to reach one connection: its bounded queue, the switch that cuts it
/// off when the queue is full, and the rooms whose live messages are held
/// back while a `resume` replays what the connection missed.
#[derive(Clone)]
struct Handle {
    outbound: mpsc::Sender<Outbound>,
    slow: CancellationToken,
    held: Arc<Held>,
}

/// Live messages held back per room, by sequence.
#[derive(Default)]
struct Held {
    /// Whether anything is held: deliveries skip the lock while it is not.
    active: AtomicBool,
    state: Mutex<HeldState>,
}

#[derive(Default)]
struct HeldState {
    /// Every room is held (a connection that announced a resume, until it
    /// sends it).
    all: bool,
    rooms: HashMap<RoomId, Vec<(u64, Utf8Bytes)>>,
}

/// The most live messages held back for one room during a resume; beyond
/// that the connection is cut off as a slow consumer.
const MAX_HELD: usize = 4096;

impl Handle {
    /// Queues `frame` (the message `seq` of `room`), or holds it back while
    /// the room is being resumed; refused when the connection is gone or
    /// (then cut off) cannot keep up.
    fn offer(&self, room: RoomId, seq: u64, frame: &Utf8Bytes) -> Result<(), Refused> {
        if self.held.active.load(Ordering::Acquire) {
            let mut held = lock(&self.held.state);
            if held.all || held.rooms.contains_key(&room) {
                let frames = held.rooms.entry(room).or_default();
                if frames.len() >= MAX_HELD {
                    self.slow.cancel();
                    return Err(Refused::Full);
                }
                frames.push((seq, frame.clone()));
                return Ok(());
            }
        }
        match self.outbound.try_send(Outbound::Frame(frame.clone())) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.slow.cancel();
                Err(Refused::Full)
            }
            Err(TrySendError::Closed(_)) => Err(Refused::Closed),
        }
    }
}

enum Refused {
    Full,
    Closed,
}

/// A poisoned lock is still used: what it guards stays consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

struct Conn {
    user: UserId,
    session: SessionId,
    handle: Handle,
    rooms: HashSet<RoomId>,
}

/// A connection in a room and the latest sequence it was given, live or by
/// a resume: a message at or below it is not given again (the replay may
/// have sent it before its live copy came through, and two publishers of a
/// room may both have published it).
struct Member {
    handle: Handle,
    last_seq: Option<u64>,
}

/// What one delivery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Connections the frame was queued on.
    pub delivered: u64,
    /// Connections cut off as slow consumers instead.
    pub cut_off: u64,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    conns: DashMap<ConnId, Conn>,
    by_user: DashMap<UserId, HashSet<ConnId>>,
    by_room: DashMap<RoomId, HashMap<ConnId, Member>>,
}

impl Registry {
    /// Adds a connection; with `hold_all`, the live messages of every room
    /// are held back until [`Registry::hold_only`] (it announced a resume).
    pub fn register(
        &self,
        user: UserId,
        session: SessionId,
        outbound: mpsc::Sender<Outbound>,
        slow: CancellationToken,
        hold_all: bool,
    ) -> ConnId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let held = Held {
            active: AtomicBool::new(hold_all),
            state: Mutex::new(HeldState {
                all: hold_all,
                rooms: HashMap::new(),
            }),
        };
        self.conns.insert(
            id,
            Conn {
                user,
                session,
                handle: Handle {
                    outbound,
                    slow,
                    held: Arc::new(held),
                },
                rooms: HashSet::new(),
            },
        );
        self.by_user.entry(user).or_default().insert(id);
        id
    }

    /// The connection now belongs to `session` (its token was refreshed).
    pub fn set_session(&self, id: ConnId, session: SessionId) {
        if let Some(mut conn) = self.conns.get_mut(&id) {
            conn.session = session;
        }
    }

    /// Subscribes a connection to rooms.
    pub fn add_rooms(&self, id: ConnId, rooms: &[RoomId]) {
        let handle = match self.conns.get_mut(&id) {
            Some(mut conn) => {
                conn.rooms.extend(rooms.iter().copied());
                conn.handle.clone()
            }
            None => return,
        };
        for room in rooms {
            self.by_room
                .entry(*room)
                .or_default()
                .entry(id)
                .or_insert_with(|| Member {
                    handle: handle.clone(),
                    last_seq: None,
                });
        }
    }

    /// Makes `rooms` exactly the rooms of a connection; the rooms it left.
    pub fn set_rooms(&self, id: ConnId, rooms: &[RoomId]) -> Vec<RoomId> {
        let wanted: HashSet<RoomId> = rooms.iter().copied().collect();
        let gone: Vec<RoomId> = match self.conns.get_mut(&id) {
            Some(mut conn) => {
                let gone = conn.rooms.difference(&wanted).copied().collect();
                conn.rooms.retain(|room| wanted.contains(room));
                gone
            }
            None => return Vec::new(),
        };
        for room in &gone {
            self.by_room.remove_if_mut(room, |_, members| {
                members.remove(&id);
                members.is_empty()
            });
        }
        self.add_rooms(id, rooms);
        gone
    }

    /// Whether a connection here is in `room`.
    pub fn has_members(&self, room: RoomId) -> bool {
        self.by_room.contains_key(&room)
    }

    /// The connection's queue.
    pub fn outbound(&self, id: ConnId) -> Option<mpsc::Sender<Outbound>> {
        self.handle(id).map(|handle| handle.outbound)
    }

    /// Holds back `room`'s live messages for connection `id` until
    /// [`Registry::release`].
    pub fn hold(&self, id: ConnId, room: RoomId) {
        if let Some(handle) = self.handle(id) {
            lock(&handle.held.state).rooms.entry(room).or_default();
            handle.held.active.store(true, Ordering::Release);
        }
    }

    pub fn connections_of(&self, user: UserId) -> Vec<ConnId> {
        self.by_user
            .get(&user)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Unsubscribes every connection of `user` from `room`: the next event of
    /// the room reaches none of them.
    pub fn user_left(&self, user: UserId, room: RoomId) {
        let ids = self.connections_of(user);
        for id in &ids {
            if let Some(mut conn) = self.conns.get_mut(id) {
                conn.rooms.remove(&room);
            }
        }
        self.by_room.remove_if_mut(&room, |_, members| {
            for id in &ids {
                members.remove(id);
            }
            members.is_empty()
        });
    }

    /// Closes (4003) every connection of `user` opened with one of
    /// `sessions`; how many.
    pub fn close_sessions(&self, user: UserId, sessions: &[SessionId]) -> usize {
        let mut closed = 0;
        for id in self.connections_of(user) {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            if !sessions.contains(&conn.session) {
                continue;
            }
            let handle = conn.handle.clone();
            drop(conn);
            let close = Outbound::Close(close::SESSION_REVOKED, "session revoked");
            if let Err(TrySendError::Full(_)) = handle.outbound.try_send(close) {
                // Its queue is full: cut it off without waiting for room.
                handle.slow.cancel();
            }
            closed += 1;
        }
        closed
    }

    /// Forgets a connection; the rooms it was in.
    pub fn unregister(&self, id: ConnId) -> Vec<RoomId> {
        let Some((_, conn)) = self.conns.remove(&id) else {
            return Vec::new();
        };
        self.by_user.remove_if_mut(&conn.user, |_, ids| {
            ids.remove(&id);
            ids.is_empty()
        });
        for room in &conn.rooms {
            self.by_room.remove_if_mut(room, |_, members| {
                members.remove(&id);
                members.is_empty()
            });
        }
        conn.rooms.into_iter().collect()
    }

    /// Queues `frame`, the message `seq` of `room`, on every connection in
    /// the room that was not given it (or a later one) yet, or holds it back
    /// where a resume of the room is under way; a connection whose queue is
    /// full is cut off as a slow consumer.
    pub fn deliver(&self, room: RoomId, seq: u64, frame: &Utf8Bytes) -> Fanout {
        let mut fanout = Fanout::default();
        let Some(mut members) = self.by_room.get_mut(&room) else {
            return fanout;
        };
        members.retain(|id, member| {
            if member.last_seq.is_some_and(|last| seq <= last) {
                return true;
            }
            match member.handle.offer(room, seq, frame) {
                Ok(()) => {
                    member.last_seq = Some(seq);
                    fanout.delivered += 1;
                    true
                }
                Err(Refused::Full) => {
                    tracing::warn!(conn = id, %room, "outbound queue full; closing slow consumer");
                    fanout.cut_off += 1;
                    false
                }
                Err(Refused::Closed) => false,
            }
        });
        fanout
    }

    /// Whether connection `id` is subscribed to `room` (its user a member).
    pub fn in_room(&self, id: ConnId, room: RoomId) -> bool {
        self.conns
            .get(&id)
            .is_some_and(|conn| conn.rooms.contains(&room))
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Queues an ephemeral `frame` (typing, presence) once on every
    /// connection in any of `rooms`, other than `except`'s; a full queue
    /// just misses it.
    pub fn deliver_once(&self, rooms: &[RoomId], except: UserId, frame: &Utf8Bytes) {
        let own = self.connections_of(except);
        let mut told: HashSet<ConnId> = HashSet::new();
        for room in rooms {
            let Some(members) = self.by_room.get(room) else {
                continue;
            };
            for (id, member) in members.iter() {
                if !own.contains(id) && told.insert(*id) {
                    let _ = member
                        .handle
                        .outbound
                        .try_send(Outbound::Frame(frame.clone()));
                }
            }
        }
    }

    /// Records that connection `id` was given `room`'s messages up to `seq`
    /// (by a resume), so their live copies are not given again.
    pub fn given_up_to(&self, id: ConnId, room: RoomId, seq: u64) {
        if let Some(mut members) = self.by_room.get_mut(&room) {
            if let Some(member) = members.get_mut(&id) {
                member.last_seq = Some(member.last_seq.map_or(seq, |last| last.max(seq)));
            }
        }
    }

    /// Holds back only the live messages of `rooms` from now on: what was
    /// held for other rooms is queued, in order, and they flow again.
    pub async fn hold_only(&self, id: ConnId, rooms: &[RoomId]) {
        self.narrow_hold(id, rooms, false).await;
    }

    /// A connection that announced a resume and never sent it: every room
    /// flows again (unless its resume began meanwhile).
    pub async fn end_awaited_resume(&self, id: ConnId) {
        self.narrow_hold(id, &[], true).await;
    }

    async fn narrow_hold(&self, id: ConnId, rooms: &[RoomId], only_if_all: bool) {
        let Some(handle) = self.handle(id) else {
            return;
        };
        let released: Vec<RoomId> = {
            let mut held = lock(&handle.held.state);
            if only_if_all && !held.all {
                return;
            }
            held.all = false;
            for room in rooms {
                held.rooms.entry(*room).or_default();
            }
            held.rooms
                .keys()
                .filter(|room| !rooms.contains(room))
                .copied()
                .collect()
        };
        for room in released {
            self.release(id, room, 0).await;
        }
    }

    /// The live messages of `room` held back so far for `id`.
    pub fn held(&self, id: ConnId, room: RoomId) -> Vec<(u64, Utf8Bytes)> {
        let Some(handle) = self.handle(id) else {
            return Vec::new();
        };
        let held = lock(&handle.held.state);
        held.rooms.get(&room).cloned().unwrap_or_default()
    }

    /// Ends the hold of `room` for `id`: the held messages after `seq` are
    /// queued in order (waiting for room in the queue; what arrives
    /// meanwhile is held and queued next), then the hold ends, under its
    /// lock, with nothing left behind, so no delivery overtakes them.
    pub async fn release(&self, id: ConnId, room: RoomId, mut seq: u64) {
        let Some(handle) = self.handle(id) else {
            return;
        };
        loop {
            let batch = {
                let mut held = lock(&handle.held.state);
                let Some(frames) = held.rooms.get_mut(&room) else {
                    return;
                };
                let batch: std::collections::BTreeMap<u64, Utf8Bytes> = std::mem::take(frames)
                    .into_iter()
                    .filter(|(s, _)| *s > seq)
                    .collect();
                if batch.is_empty() {
                    held.rooms.remove(&room);
                    if held.rooms.is_empty() && !held.all {
                        handle.held.active.store(false, Ordering::Release);
                    }
                    return;
                }
                batch
            };
            for (frame_seq, frame) in batch {
                if handle.outbound.send(Outbound::Frame(frame)).await.is_err() {
                    return;
                }
                seq = frame_seq;
            }
        }
    }

    fn handle(&self, id: ConnId) -> Option<Handle> {
        self.conns.get(&id).map(|conn| conn.handle.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_owned())
    }

    fn delivered(fanout: Fanout) -> u64 {
        fanout.delivered
    }

    #[test]
    fn room_events_reach_members_only_and_joins_apply_to_every_connection() {
        let registry = Registry::default();
        let (alice, bob, room) = (UserId::new(), UserId::new(), RoomId::new());
        let (tx_a, mut rx_a) = mpsc::channel(4);
        let (tx_b1, mut rx_b1) = mpsc::channel(4);
        let (tx_b2, mut rx_b2) = mpsc::channel(4);
        let a = registry.register(
            alice,
            SessionId::new(),
            tx_a,
            CancellationToken::new(),
            false,
        );
        registry.register(
            bob,
            SessionId::new(),
            tx_b1,
            CancellationToken::new(),
            false,
        );
        registry.register(
            bob,
            SessionId::new(),
            tx_b2,
            CancellationToken::new(),
            false,
        );
        registry.add_rooms(a, &[room]);
        assert_eq!(delivered(registry.deliver(room, 1, &frame("one"))), 1);
        for id in registry.connections_of(bob) {
            registry.add_rooms(id, &[room]);
        }
        assert!(registry.has_members(room));
        assert_eq!(delivered(registry.deliver(room, 2, &frame("two"))), 3);
        assert!(matches!(rx_a.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "one"));
        assert!(matches!(rx_b1.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "two"));
        assert!(matches!(rx_b2.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "two"));

        assert_eq!(registry.unregister(a), [room]);
        assert_eq!(delivered(registry.deliver(room, 3, &frame("three"))), 2);

        // Leaving applies to every connection of the user, and only the room left.
        let other = RoomId::new();
        for id in registry.connections_of(bob) {
            registry.add_rooms(id, &[other]);
        }
        registry.user_left(bob, room);
        assert!(!registry.has_members(room));
        assert_eq!(delivered(registry.deliver(room, 4, &frame("four"))), 0);
        assert_eq!(delivered(registry.deliver(other, 5, &frame("five"))), 2);
        assert!(matches!(rx_b1.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "three"));
        assert!(matches!(rx_b1.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "five"));
    }

    #[test]
    fn a_message_published_twice_reaches_a_connection_once() {
        let registry = Registry::default();
        let (user, room) = (UserId::new(), RoomId::new());
        let (tx, mut rx) = mpsc::channel(8);
        let id = registry.register(user, SessionId::new(), tx, CancellationToken::new(), false);
        registry.add_rooms(id, &[room]);
        // Two publishers of the room: one got to 3, the other starts over.
        for (seq, body) in [
            (1, "one"),
            (2, "two"),
            (3, "three"),
            (2, "two"),
            (3, "three"),
        ] {
            registry.deliver(room, seq, &frame(body));
        }
        assert_eq!(delivered(registry.deliver(room, 4, &frame("four"))), 1);
        let mut got = Vec::new();
        while let Ok(Outbound::Frame(f)) = rx.try_recv() {
            got.push(f.as_str().to_owned());
        }
        assert_eq!(got, ["one", "two", "three", "four"]);
    }

    #[test]
    fn revoking_a_session_closes_its_connections_only() {
        let registry = Registry::default();
        let (alice, bob) = (UserId::new(), UserId::new());
        let (kept, revoked) = (SessionId::new(), SessionId::new());
        let (tx_kept, mut rx_kept) = mpsc::channel(4);
        let (tx_revoked, mut rx_revoked) = mpsc::channel(4);
        let (tx_bob, mut rx_bob) = mpsc::channel(4);
        registry.register(alice, kept, tx_kept, CancellationToken::new(), false);
        registry.register(alice, revoked, tx_revoked, CancellationToken::new(), false);
        registry.register(bob, revoked, tx_bob, CancellationToken::new(), false);
        assert_eq!(registry.close_sessions(alice, &[revoked]), 1);
        assert!(matches!(
            rx_revoked.try_recv(),
            Ok(Outbound::Close(close::SESSION_REVOKED, _))
        ));
        assert!(rx_kept.try_recv().is_err());
        assert!(
            rx_bob.try_recv().is_err(),
            "another user's session of the same id"
        );
    }

    #[test]
    fn a_full_queue_cuts_the_connection_off() {
        let registry = Registry::default();
        let (user, room) = (UserId::new(), RoomId::new());
        let (tx, _rx) = mpsc::channel(1);
        let slow = CancellationToken::new();
        let id = registry.register(user, SessionId::new(), tx, slow.clone(), false);
        registry.add_rooms(id, &[room]);
        assert_eq!(delivered(registry.deliver(room, 6, &frame("fits"))), 1);
        assert!(!slow.is_cancelled());
        assert_eq!(
            registry.deliver(room, 7, &frame("overflows")),
            Fanout {
                delivered: 0,
                cut_off: 1
            }
        );
        assert!(slow.is_cancelled());
        assert_eq!(delivered(registry.deliver(room, 8, &frame("after"))), 0);
    }

    #[tokio::test]
    async fn a_resumed_room_is_held_then_released_in_order_without_repeats() {
        let registry = Registry::default();
        let (user, room, other) = (UserId::new(), RoomId::new(), RoomId::new());
        let (tx, mut rx) = mpsc::channel(16);
        let id = registry.register(user, SessionId::new(), tx, CancellationToken::new(), true);
        registry.add_rooms(id, &[room, other]);
        // Announced a resume: nothing flows yet.
        registry.deliver(room, 4, &frame("r4"));
        registry.deliver(other, 1, &frame("o1"));
        registry.deliver(room, 5, &frame("r5"));
        assert!(rx.try_recv().is_err());

        // The resume names `room` only: `other` flows at once.
        registry.hold_only(id, &[room]).await;
        assert!(matches!(rx.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "o1"));
        assert_eq!(registry.held(id, room).len(), 2);
        registry.deliver(room, 6, &frame("r6"));

        // Replayed up to 4: the held 5 and 6 follow in order, once.
        registry.given_up_to(id, room, 4);
        registry.release(id, room, 4).await;
        let got: Vec<String> = std::iter::from_fn(|| match rx.try_recv() {
            Ok(Outbound::Frame(f)) => Some(f.as_str().to_owned()),
            _ => None,
        })
        .collect();
        assert_eq!(got, ["r5", "r6"]);
        registry.deliver(room, 4, &frame("late copy"));
        registry.deliver(room, 7, &frame("r7"));
        assert!(matches!(rx.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "r7"));
        assert!(rx.try_recv().is_err());
    }
}
