//! The connections of this gateway, indexed by user and by room so that a room
//! event reaches its member connections without a lookup per recipient. No
//! method holds entries of two maps at once, so they cannot deadlock.

use std::{
    collections::{HashMap, HashSet},
    sync::atomic::{AtomicU64, Ordering},
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

/// How to reach one connection: its bounded queue, and the switch that cuts
/// it off when the queue is full.
#[derive(Clone)]
struct Handle {
    outbound: mpsc::Sender<Outbound>,
    slow: CancellationToken,
}

struct Conn {
    user: UserId,
    session: SessionId,
    handle: Handle,
    rooms: HashSet<RoomId>,
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
    by_room: DashMap<RoomId, HashMap<ConnId, Handle>>,
}

impl Registry {
    pub fn register(
        &self,
        user: UserId,
        session: SessionId,
        outbound: mpsc::Sender<Outbound>,
        slow: CancellationToken,
    ) -> ConnId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns.insert(
            id,
            Conn {
                user,
                session,
                handle: Handle { outbound, slow },
                rooms: HashSet::new(),
            },
        );
        self.by_user.entry(user).or_default().insert(id);
        id
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
                .insert(id, handle.clone());
        }
    }

    fn connections_of(&self, user: UserId) -> Vec<ConnId> {
        self.by_user
            .get(&user)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Subscribes every connection of `user` to `room`.
    pub fn user_joined(&self, user: UserId, room: RoomId) {
        for id in self.connections_of(user) {
            self.add_rooms(id, &[room]);
        }
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

    pub fn unregister(&self, id: ConnId) {
        let Some((_, conn)) = self.conns.remove(&id) else {
            return;
        };
        self.by_user.remove_if_mut(&conn.user, |_, ids| {
            ids.remove(&id);
            ids.is_empty()
        });
        for room in conn.rooms {
            self.by_room.remove_if_mut(&room, |_, members| {
                members.remove(&id);
                members.is_empty()
            });
        }
    }

    /// Queues `frame` on every connection in `room`; a connection whose queue
    /// is full is cut off as a slow consumer.
    pub fn deliver(&self, room: RoomId, frame: &Utf8Bytes) -> Fanout {
        let mut fanout = Fanout::default();
        let Some(mut members) = self.by_room.get_mut(&room) else {
            return fanout;
        };
        members.retain(|id, handle| {
            match handle.outbound.try_send(Outbound::Frame(frame.clone())) {
                Ok(()) => {
                    fanout.delivered += 1;
                    true
                }
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(conn = id, %room, "outbound queue full; closing slow consumer");
                    fanout.cut_off += 1;
                    handle.slow.cancel();
                    false
                }
                Err(TrySendError::Closed(_)) => false,
            }
        });
        fanout
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
        let a = registry.register(alice, SessionId::new(), tx_a, CancellationToken::new());
        registry.register(bob, SessionId::new(), tx_b1, CancellationToken::new());
        registry.register(bob, SessionId::new(), tx_b2, CancellationToken::new());
        registry.add_rooms(a, &[room]);
        assert_eq!(delivered(registry.deliver(room, &frame("one"))), 1);
        registry.user_joined(bob, room);
        assert_eq!(delivered(registry.deliver(room, &frame("two"))), 3);
        assert!(matches!(rx_a.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "one"));
        assert!(matches!(rx_b1.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "two"));
        assert!(matches!(rx_b2.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "two"));

        registry.unregister(a);
        assert_eq!(delivered(registry.deliver(room, &frame("three"))), 2);

        // Leaving applies to every connection of the user, and only the room left.
        let other = RoomId::new();
        registry.user_joined(bob, other);
        registry.user_left(bob, room);
        assert_eq!(delivered(registry.deliver(room, &frame("four"))), 0);
        assert_eq!(delivered(registry.deliver(other, &frame("five"))), 2);
        assert!(matches!(rx_b1.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "three"));
        assert!(matches!(rx_b1.try_recv(), Ok(Outbound::Frame(f)) if f.as_str() == "five"));
    }

    #[test]
    fn revoking_a_session_closes_its_connections_only() {
        let registry = Registry::default();
        let (alice, bob) = (UserId::new(), UserId::new());
        let (kept, revoked) = (SessionId::new(), SessionId::new());
        let (tx_kept, mut rx_kept) = mpsc::channel(4);
        let (tx_revoked, mut rx_revoked) = mpsc::channel(4);
        let (tx_bob, mut rx_bob) = mpsc::channel(4);
        registry.register(alice, kept, tx_kept, CancellationToken::new());
        registry.register(alice, revoked, tx_revoked, CancellationToken::new());
        registry.register(bob, revoked, tx_bob, CancellationToken::new());
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
        let id = registry.register(user, SessionId::new(), tx, slow.clone());
        registry.add_rooms(id, &[room]);
        assert_eq!(delivered(registry.deliver(room, &frame("fits"))), 1);
        assert!(!slow.is_cancelled());
        assert_eq!(
            registry.deliver(room, &frame("overflows")),
            Fanout {
                delivered: 0,
                cut_off: 1
            }
        );
        assert!(slow.is_cancelled());
        assert_eq!(delivered(registry.deliver(room, &frame("after"))), 0);
    }
}
