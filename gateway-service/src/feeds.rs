//! The rooms this gateway follows on the bus: one subscription per room that
//! a connection here is in (`<prefix>.room.<room>.*`: its messages, typing
//! and leaves, in the order they were published), made when the first
//! member connection arrives and dropped when the last one goes. A gateway's
//! bus traffic grows with its own connections, not with the whole system's.
//! Each followed room keeps its latest messages ([`RoomTail`]) for resumes.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use tokio::{sync::watch, task::AbortHandle};
use unhidra_core::ids::RoomId;

use crate::{Gateway, fanout, registry::lock, tail::RoomTail};

/// Events dispatched between two yields to the other tasks.
const YIELD_EVERY: u32 = 16;
/// How long a failed subscription waits before it is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// The rooms followed, each with whether its subscription is made yet.
#[derive(Default)]
pub struct Feeds {
    state: std::sync::Mutex<State>,
    /// Counts what may change a user's rooms as this gateway sees them: a
    /// join or leave event arriving, a room's subscription made. A
    /// connection whose rooms were loaded while it stood still needs no
    /// second load once registered.
    changes: AtomicU64,
}

impl Feeds {
    /// Called before the registry learns of a join or leave, and when a
    /// room's subscription is made.
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
struct State {
    followed: HashMap<RoomId, Feed>,
    /// Rooms of connections being opened, not registered yet: followed
    /// already, so that what is sent to them once the client sees its
    /// connection open reaches it.
    pinned: HashMap<RoomId, usize>,
}

struct Feed {
    subscribed: watch::Receiver<bool>,
    task: AbortHandle,
    tail: Arc<Mutex<RoomTail>>,
}

/// Follows `room` if a connection here is in it and stops following it if
/// none is; when followed, whether it is subscribed yet.
///
/// Called after every change of the room's connections: the registry is read
/// under the feeds' lock, so the last call leaves the feed as the registry
/// is, whatever the order of concurrent calls.
pub fn update(gateway: &Arc<Gateway>, room: RoomId) -> Option<watch::Receiver<bool>> {
    let mut state = lock(&gateway.feeds.state);
    let wanted = state.pinned.contains_key(&room) || gateway.registry.has_members(room);
    let followed = &mut state.followed;
    let subscribed = match (wanted, followed.get(&room)) {
        (true, Some(feed)) => return Some(feed.subscribed.clone()),
        (false, None) => return None,
        (true, None) => {
            let (tx, rx) = watch::channel(false);
            let tail = Arc::new(Mutex::new(RoomTail::new(gateway.ctx.config.room_tail)));
            let feed = follow(Arc::clone(gateway), room, tx, Arc::clone(&tail));
            let task = tokio::spawn(feed).abort_handle();
            followed.insert(
                room,
                Feed {
                    subscribed: rx.clone(),
                    task,
                    tail,
                },
            );
            Some(rx)
        }
        (false, Some(_)) => {
            if let Some(feed) = followed.remove(&room) {
                feed.task.abort();
            }
            None
        }
    };
    gateway.metrics.rooms_followed.set(followed.len() as i64);
    subscribed
}

/// The messages of `room` with `after < seq <= up_to` that came on its feed
/// lately (at most `UNHIDRA_ROOM_TAIL`), in order; none if it is not
/// followed.
pub fn recent(gateway: &Gateway, room: RoomId, after: u64, up_to: u64) -> Vec<(u64, Utf8Bytes)> {
    let tail = match lock(&gateway.feeds.state).followed.get(&room) {
        Some(feed) => Arc::clone(&feed.tail),
        None => return Vec::new(),
    };
    lock(&tail).range(after, up_to)
}

/// `rooms` followed until the connection that is in them is registered
/// (this is dropped).
pub struct Pinned {
    gateway: Arc<Gateway>,
    rooms: Vec<RoomId>,
    /// [`Feeds::changes`] before the rooms were loaded.
    loaded_at: u64,
    /// Whether every room's subscription was made in time.
    subscribed: bool,
}

impl Pinned {
    pub fn rooms(&self) -> &[RoomId] {
        &self.rooms
    }

    /// Whether the rooms may have changed since they were loaded (asked once
    /// the connection is registered, so a later change reaches it): a join
    /// or leave arrived, or a subscription was made or missed, meanwhile.
    pub fn may_be_stale(&self) -> bool {
        !self.subscribed || self.gateway.feeds.changes() != self.loaded_at
    }
}

/// What [`pin`] is given after the rooms are loaded: taken before they are.
pub fn before_loading(gateway: &Gateway) -> u64 {
    gateway.feeds.changes()
}

impl Drop for Pinned {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.gateway.feeds.state);
            for room in &self.rooms {
                if let Some(count) = state.pinned.get_mut(room) {
                    *count -= 1;
                    if *count == 0 {
                        state.pinned.remove(room);
                    }
                }
            }
        }
        for room in &self.rooms {
            update(&self.gateway, *room);
        }
    }
}

/// Follows `rooms`, loaded after [`before_loading`] gave `loaded_at`, for a
/// connection not registered yet; returns once they are subscribed (or a
/// bounded time passed).
pub async fn pin(gateway: &Arc<Gateway>, rooms: Vec<RoomId>, loaded_at: u64) -> Pinned {
    {
        let mut state = lock(&gateway.feeds.state);
        for room in &rooms {
            *state.pinned.entry(*room).or_default() += 1;
        }
    }
    let subscribed = follow_rooms(gateway, &rooms).await;
    Pinned {
        gateway: Arc::clone(gateway),
        rooms,
        loaded_at,
        subscribed,
    }
}

/// [`update`]s every room of `rooms`, then waits (a bounded time) until
/// those followed are subscribed; whether they all were.
pub async fn follow_rooms(gateway: &Arc<Gateway>, rooms: &[RoomId]) -> bool {
    let pending: Vec<_> = rooms
        .iter()
        .filter_map(|room| update(gateway, *room))
        .collect();
    let all = futures::future::join_all(pending.into_iter().map(|mut subscribed| async move {
        let _ = subscribed.wait_for(|done| *done).await;
    }));
    let in_time = tokio::time::timeout(gateway.ctx.config.bus_timeout(), all)
        .await
        .is_ok();
    if !in_time {
        tracing::warn!(
            rooms = rooms.len(),
            "room subscriptions not made in time; messages may be missed until they are"
        );
    }
    in_time
}

/// Subscribes to `room`'s events (retrying until it can) and dispatches
/// them in order, keeping the latest messages in `tail`, until aborted or
/// shutdown.
async fn follow(
    gateway: Arc<Gateway>,
    room: RoomId,
    subscribed: watch::Sender<bool>,
    tail: Arc<Mutex<RoomTail>>,
) {
    let subject = gateway.ctx.subjects.room_events(room);
    let shutdown = gateway.ctx.shutdown.clone();
    let mut events = loop {
        match gateway.ctx.bus.subscribe(&subject).await {
            Ok(events) => break events,
            Err(e) => {
                tracing::warn!(%room, error = %e, "room subscription failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    };
    // A leave published before now did not come here.
    gateway.feeds.changed();
    let _ = subscribed.send(true);
    let mut dispatched: u32 = 0;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.next() => event,
        };
        let Some(event) = event else {
            tracing::error!(%room, "room subscription ended");
            return;
        };
        fanout::dispatch(&gateway, &event, &tail);
        // A burst of events must not keep the connections' writers from
        // draining their queues in between.
        dispatched = dispatched.wrapping_add(1);
        if dispatched % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
    }
}
