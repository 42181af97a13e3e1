//! Presence: who has an open connection on any gateway. Each gateway counts
//! its own users' connections and, every [`BEAT`], says which users it holds
//! and learns whom the others hold (the [`roster`]: over the bus, or in
//! Redis when configured); a gateway not heard from for [`DEAD_AFTER`] is
//! presumed dead, its users offline unless connected elsewhere. Once per
//! beat every gateway compares who is online with the beat before and tells
//! its connections about the users they share a room with that came or
//! went: changes are coalesced per beat, their rooms asked for in batches,
//! and each connection hears of a user once, however many rooms they share,
//! so a gateway restarting with thousands of users is no storm.
//! `GET /api/v1/rooms/{room_id}/presence` lists the room's members online.

mod roster;

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
use serde::Serialize;
use tokio::task::JoinHandle;
use unhidra_core::{
    error::ErrorBody,
    events::SCHEMA_VERSION,
    ids::{RoomId, UserId},
    protocol::ServerFrame,
    rpc::{MAX_USERS_PER_ROOMS_OF, MembershipRequest, RoomMembers, RoomsOf, RoomsOfRequest},
};
use unhidra_runtime::{ApiError, ApiState, CurrentUser, ServiceContext};

use crate::{Gateway, registry::lock};

use self::roster::Roster;

/// How often each gateway says whom it holds.
pub const BEAT: Duration = Duration::from_secs(2);
/// A gateway not heard from for this long is presumed dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(6);

pub struct Presence {
    /// This gateway's id for this run.
    gateway: String,
    local: DashMap<UserId, usize>,
    roster: Roster,
    /// Whom the other live gateways held at the last beat.
    others: Mutex<HashSet<UserId>>,
    /// Who was online, here or elsewhere, at the last beat.
    online: Mutex<HashSet<UserId>>,
}

impl Presence {
    pub fn new(ctx: &ServiceContext) -> anyhow::Result<Self> {
        Ok(Self {
            gateway: uuid::Uuid::new_v4().simple().to_string(),
            local: DashMap::new(),
            roster: Roster::from_context(ctx)?,
            others: Mutex::new(HashSet::new()),
            online: Mutex::new(HashSet::new()),
        })
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

    /// Whether `user` has a connection here, or had one on another live
    /// gateway at the last beat.
    pub fn is_online(&self, user: UserId) -> bool {
        self.local.contains_key(&user) || lock(&self.others).contains(&user)
    }

    fn local_users(&self) -> Vec<UserId> {
        self.local.iter().map(|entry| *entry.key()).collect()
    }

    /// Takes whom the others hold now, and answers who came online and who
    /// went offline since the last beat.
    fn changes(&self, others: HashSet<UserId>) -> Vec<(UserId, bool)> {
        let mut online = others.clone();
        online.extend(self.local_users());
        *lock(&self.others) = others;
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

/// Beats, learns whom the other gateways hold, and tells the connections of
/// presence changes, until shutdown; then says goodbye.
pub async fn spawn(gateway: Arc<Gateway>) -> anyhow::Result<JoinHandle<()>> {
    let presence = &gateway.presence;
    let mut beats = presence.roster.listen(&gateway.ctx).await?;
    Ok(tokio::spawn(async move {
        let presence = &gateway.presence;
        let mut every = tokio::time::interval(BEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = gateway.ctx.shutdown.cancelled() => {
                    presence.roster.leave(&gateway.ctx, &presence.gateway).await;
                    return;
                }
                beat = roster::next_beat(&mut beats) => match beat {
                    Some(message) => presence.roster.heard(&presence.gateway, &message),
                    None => {
                        tracing::error!("presence subscription ended");
                        return;
                    }
                },
                _ = every.tick() => {
                    let users = presence.local_users();
                    let Some(others) = presence.roster.beat(&gateway.ctx, &presence.gateway, users).await else {
                        continue;
                    };
                    let changes = presence.changes(others);
                    if !changes.is_empty() && !gateway.registry.is_empty() {
                        tell(&gateway, changes).await;
                    }
                }
            }
        }
    }))
}

/// Tells the connections that share a room with each changed user that it
/// came or went, asking for the users' rooms in batches.
async fn tell(gateway: &Gateway, changes: Vec<(UserId, bool)>) {
    for batch in changes.chunks(MAX_USERS_PER_ROOMS_OF) {
        let online: HashMap<UserId, bool> = batch.iter().copied().collect();
        let request = RoomsOfRequest {
            v: SCHEMA_VERSION,
            users: online.keys().copied().collect(),
        };
        let rooms = match gateway.ctx.rpc.call::<RoomsOf>(&request).await {
            Ok(rooms) => rooms,
            Err(e) => {
                tracing::debug!(users = batch.len(), error = %e, "rooms of users unavailable; presence changes not told");
                continue;
            }
        };
        for of_user in rooms {
            let Some(&online) = online.get(&of_user.user) else {
                continue;
            };
            let user = of_user.user;
            let frame = ServerFrame::Presence { user, online };
            let Ok(text) = serde_json::to_string(&frame) else {
                continue;
            };
            gateway
                .registry
                .deliver_once(&of_user.rooms, user, &Utf8Bytes::from(text));
        }
    }
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
