//! Presence: who has an open connection on any gateway. Each gateway counts
//! its own users' connections and says which users it holds on the bus
//! every [`BEAT`] (`presence.beats`); it keeps the others' beats, and a
//! gateway silent for [`DEAD_AFTER`] is presumed dead, its users offline
//! unless connected elsewhere. Once per beat every gateway compares who is
//! online with the beat before and tells its connections about the users
//! they share a room with that came or went: changes are coalesced per
//! beat, and each connection hears of a user once, however many rooms they
//! share, so a gateway restarting with thousands of users is no storm.
//! `GET /api/v1/rooms/{room_id}/presence` lists the room's members online.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json,
    extract::ws::Utf8Bytes,
    extract::{Path, State},
};
use dashmap::DashMap;
use futures::StreamExt;
use serde::Serialize;
use tokio::{task::JoinHandle, time::Instant};
use unhidra_core::{
    error::ErrorBody,
    events::{PresenceBeat, SCHEMA_VERSION},
    ids::{RoomId, UserId},
    protocol::ServerFrame,
    rpc::{MembershipRequest, RoomMembers, RoomsOf, RoomsOfRequest},
};
use unhidra_runtime::{ApiError, ApiState, CurrentUser};

use crate::{Gateway, registry::lock};

/// How often each gateway says who it holds.
pub const BEAT: Duration = Duration::from_secs(2);
/// A gateway not heard from for this long is presumed dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(6);

pub struct Presence {
    /// This gateway's id for this run.
    gateway: String,
    local: DashMap<UserId, usize>,
    remote: Mutex<HashMap<String, (Instant, HashSet<UserId>)>>,
    /// Who was online at the last beat.
    online: Mutex<HashSet<UserId>>,
}

impl Presence {
    pub fn new() -> Self {
        Self {
            gateway: uuid::Uuid::new_v4().simple().to_string(),
            local: DashMap::new(),
            remote: Mutex::new(HashMap::new()),
            online: Mutex::new(HashSet::new()),
        }
    }

    pub fn connected(&self, user: UserId) {
        *self.local.entry(user).or_default() += 1;
    }

    pub fn disconnected(&self, user: UserId) {
        self.local.remove_if_mut(&user, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }

    /// Whether `user` has a connection on this or another live gateway.
    pub fn is_online(&self, user: UserId) -> bool {
        if self.local.contains_key(&user) {
            return true;
        }
        let now = Instant::now();
        lock(&self.remote)
            .values()
            .any(|(at, users)| now.duration_since(*at) < DEAD_AFTER && users.contains(&user))
    }

    fn beat(&self, leaving: bool) -> PresenceBeat {
        PresenceBeat {
            v: SCHEMA_VERSION,
            gateway: self.gateway.clone(),
            users: if leaving {
                Vec::new()
            } else {
                self.local.iter().map(|entry| *entry.key()).collect()
            },
            leaving,
        }
    }

    fn heard(&self, beat: PresenceBeat) {
        if beat.gateway == self.gateway {
            return;
        }
        let mut remote = lock(&self.remote);
        if beat.leaving {
            remote.remove(&beat.gateway);
        } else {
            remote.insert(
                beat.gateway,
                (Instant::now(), beat.users.into_iter().collect()),
            );
        }
    }

    /// Who came online and who went offline since the last call.
    fn changes(&self) -> Vec<(UserId, bool)> {
        let now = Instant::now();
        let mut online: HashSet<UserId> = self.local.iter().map(|entry| *entry.key()).collect();
        {
            let mut remote = lock(&self.remote);
            remote.retain(|_, (at, _)| now.duration_since(*at) < DEAD_AFTER);
            for (_, users) in remote.values() {
                online.extend(users.iter().copied());
            }
        }
        let mut before = lock(&self.online);
        let mut changes: Vec<(UserId, bool)> = online
            .difference(&before)
            .map(|user| (*user, true))
            .collect();
        changes.extend(before.difference(&online).map(|user| (*user, false)));
        *before = online;
        changes
    }
}

/// Beats, listens to the other gateways' beats, and tells the connections
/// of presence changes, until shutdown; then says goodbye.
pub async fn spawn(gateway: Arc<Gateway>) -> anyhow::Result<JoinHandle<()>> {
    let subject = gateway.ctx.subjects.presence_beats();
    let mut beats = gateway.ctx.bus.subscribe(&subject).await?;
    Ok(tokio::spawn(async move {
        let mut every = tokio::time::interval(BEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = gateway.ctx.shutdown.cancelled() => {
                    let goodbye = gateway.presence.beat(true);
                    if let Err(e) = gateway.ctx.announce(&subject, &goodbye).await {
                        tracing::debug!(error = %e, "presence goodbye not sent");
                    }
                    return;
                }
                beat = beats.next() => match beat {
                    Some(message) => match serde_json::from_slice::<PresenceBeat>(&message.payload) {
                        Ok(beat) => gateway.presence.heard(beat),
                        Err(e) => tracing::warn!(error = %e, "unreadable presence beat"),
                    },
                    None => {
                        tracing::error!("presence subscription ended");
                        return;
                    }
                },
                _ = every.tick() => {
                    let beat = gateway.presence.beat(false);
                    if let Err(e) = gateway.ctx.announce(&subject, &beat).await {
                        tracing::warn!(error = %e, "presence beat not sent");
                    }
                    for (user, online) in gateway.presence.changes() {
                        tell(&gateway, user, online).await;
                    }
                }
            }
        }
    }))
}

/// Tells the connections that share a room with `user` that it came or went.
async fn tell(gateway: &Gateway, user: UserId, online: bool) {
    let request = RoomsOfRequest {
        v: SCHEMA_VERSION,
        user,
    };
    let rooms = match gateway.ctx.rpc.call::<RoomsOf>(&request).await {
        Ok(rooms) => rooms,
        Err(e) => {
            tracing::debug!(user_id = %user, error = %e, "rooms of user unavailable; presence change not told");
            return;
        }
    };
    let Ok(text) = serde_json::to_string(&ServerFrame::Presence { user, online }) else {
        return;
    };
    gateway
        .registry
        .deliver_once(&rooms, user, &Utf8Bytes::from(text));
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RoomPresence {
    room: RoomId,
    /// The members with an open connection on any gateway.
    online: Vec<UserId>,
}

/// The room's members online now.
#[utoipa::path(get, path = "/api/v1/rooms/{room_id}/presence", tag = "rooms",
    security(("bearer" = []), ("api_key" = [])),
    params(("room_id" = String, Path, description = "A room id")),
    responses(
        (status = 200, description = "The members online", body = RoomPresence),
        (status = 403, description = "`forbidden`: not a member of the room", body = ErrorBody),
    ))]
pub async fn room(
    State(state): State<ApiState<Arc<Gateway>>>,
    CurrentUser(me): CurrentUser,
    Path(room): Path<String>,
) -> Result<Json<RoomPresence>, ApiError> {
    let room: RoomId = room
        .parse()
        .map_err(|_| ApiError::NotFound("no such room".into()))?;
    let request = MembershipRequest {
        v: SCHEMA_VERSION,
        room,
        user: me.user,
    };
    let gateway = &state.service;
    let members = gateway.ctx.rpc.call::<RoomMembers>(&request).await?;
    let online = members
        .into_iter()
        .filter(|user| gateway.presence.is_online(*user))
        .collect();
    Ok(Json(RoomPresence { room, online }))
}
