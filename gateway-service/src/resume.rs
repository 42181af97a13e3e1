//! `resume`: a reconnecting client names the last sequence it saw per room
//! and gets, per room, every message it missed, in order, then `resumed`;
//! live messages follow with no gap and no duplicate at the seam.
//!
//! How the seam holds: the connection was registered (so it receives every
//! message published from then on) before the resume; while a room is
//! resumed, its live messages are held back. chat-service then says the
//! room's latest sequence `H`: every message up to `H` is committed, so it is
//! either in history already, on its way there, or (published after the
//! registration) among the held messages. The missed range `last+1..=H` is
//! taken from what the hold caught, from the room's latest messages kept
//! here ([`crate::tail`]) and, for the rest, from history (waiting briefly
//! for what history has not stored yet), sent, and then the held messages
//! after `H` are released in order. A client further behind than
//! `UNHIDRA_RESUME_WINDOW`, or under another epoch, gets a `gap` instead.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    sync::Arc,
    time::Duration,
};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use unhidra_authn::Authenticated;
use unhidra_core::{
    events::SCHEMA_VERSION,
    ids::{RoomId, UserId},
    protocol::{ErrorCode, ResumePoint, ServerFrame},
    rpc::{HistoryRange, HistoryRangeRequest, MAX_RANGE, MembershipRequest, RoomHead},
};

use crate::{
    Gateway, feeds,
    pipeline::error,
    registry::{ConnId, Outbound},
};

/// How long a resume waits for history to store messages it has not yet.
const HISTORY_WAIT: Duration = Duration::from_secs(5);
/// Between reads of history while it lags: doubling from the first to the
/// second, so that many resumes waiting at once do not flood it.
const HISTORY_RETRY: Duration = Duration::from_millis(25);
const HISTORY_RETRY_MAX: Duration = Duration::from_millis(400);

/// Resumes each room in turn; frames go out on `outbound`.
pub async fn run(
    gateway: Arc<Gateway>,
    conn: ConnId,
    auth: Authenticated,
    rooms: BTreeMap<RoomId, ResumePoint>,
    outbound: mpsc::Sender<Outbound>,
) {
    let named: Vec<RoomId> = rooms.keys().copied().collect();
    gateway.registry.hold_only(conn, &named).await;
    for (room, point) in rooms {
        let after = match resume_room(&gateway, conn, &auth, room, &point, &outbound).await {
            Ok(after) => after,
            Err(frame) => {
                if !send(&outbound, &frame).await {
                    gateway.registry.release(conn, room, u64::MAX).await;
                    return;
                }
                // Not resumed: live messages flow as they would have.
                0
            }
        };
        gateway.registry.given_up_to(conn, room, after);
        gateway.registry.release(conn, room, after).await;
    }
}

/// Sends what `room` missed, then `resumed`; the sequence after which held
/// live messages are still to be sent, or the error frame to answer with.
async fn resume_room(
    gateway: &Gateway,
    conn: ConnId,
    auth: &Authenticated,
    room: RoomId,
    point: &ResumePoint,
    outbound: &mpsc::Sender<Outbound>,
) -> Result<u64, ServerFrame> {
    let (top, replayed) = catch_up(gateway, conn, auth.user, room, point, outbound).await?;
    if let Some(epoch) = replayed {
        send_all(
            outbound,
            &[ServerFrame::Resumed {
                room,
                epoch,
                seq: top,
            }],
        )
        .await?;
    }
    Ok(top)
}

/// Sends `room`'s messages after `point` up to its latest sequence (from
/// history and from what is held for connection `conn` of `user`), with a
/// `gap` for what cannot be had; that sequence (`u64::MAX` when the
/// connection is gone) and, when the missed messages were replayed rather
/// than all reported as a gap, the room's epoch; or the error frame to
/// answer with.
pub async fn catch_up(
    gateway: &Gateway,
    conn: ConnId,
    user: UserId,
    room: RoomId,
    point: &ResumePoint,
    outbound: &mpsc::Sender<Outbound>,
) -> Result<(u64, Option<String>), ServerFrame> {
    let head = gateway
        .ctx
        .rpc
        .call::<RoomHead>(&MembershipRequest {
            v: SCHEMA_VERSION,
            room,
            user,
        })
        .await
        .map_err(|e| {
            error(
                None,
                e.code.frame_code(),
                &format!("room {room}: {}", e.message),
            )
        })?;
    let (last, top, epoch) = (point.seq(), head.seq, head.epoch);
    let stale = point.epoch().is_some_and(|e| e != epoch) || last > top;
    let gap = |from_seq| ServerFrame::Gap {
        room,
        epoch: epoch.clone(),
        from_seq,
        to_seq: top,
    };
    if stale {
        // Another epoch (or a sequence the room never had): the client's
        // positions mean nothing here; it starts over from history.
        send_all(outbound, &[gap(1)]).await?;
        return Ok((top, None));
    }
    if top - last > gateway.ctx.config.resume_window {
        send_all(outbound, &[gap(last + 1)]).await?;
        return Ok((top, None));
    }
    let missed = missed(gateway, conn, room, last, top).await;
    let mut frames = Vec::with_capacity(missed.len() + 1);
    let mut next = last + 1;
    for (seq, frame) in missed {
        if seq > next {
            frames.push(Outbound::Frame(text(&ServerFrame::Gap {
                room,
                epoch: epoch.clone(),
                from_seq: next,
                to_seq: seq - 1,
            })?));
        }
        frames.push(Outbound::Frame(frame));
        next = seq + 1;
    }
    if next <= top {
        frames.push(Outbound::Frame(text(&gap(next))?));
    }
    for frame in frames {
        if outbound.send(frame).await.is_err() {
            return Ok((u64::MAX, None));
        }
    }
    Ok((top, Some(epoch)))
}

/// The messages `after+1..=up_to` of `room`, by sequence: from the live
/// messages held back for the connection, from the room's tail kept here,
/// and from history, waiting a little for history to store what it has not
/// yet. What is still missing after the wait is left out (the caller
/// reports it as a gap).
async fn missed(
    gateway: &Gateway,
    conn: ConnId,
    room: RoomId,
    after: u64,
    up_to: u64,
) -> BTreeMap<u64, Utf8Bytes> {
    let mut found: BTreeMap<u64, Utf8Bytes> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + HISTORY_WAIT;
    let mut retry = HISTORY_RETRY;
    loop {
        let held = gateway.registry.held(conn, room).into_iter();
        for (seq, frame) in held.chain(feeds::recent(gateway, room, after, up_to)) {
            if seq > after && seq <= up_to {
                found.entry(seq).or_insert(frame);
            }
        }
        // Read from the first missing sequence on, in chunks.
        let mut from = (after + 1..=up_to)
            .find(|seq| !found.contains_key(seq))
            .map_or(up_to, |first| first - 1);
        while from < up_to {
            let request = HistoryRangeRequest {
                v: SCHEMA_VERSION,
                room,
                after: from,
                up_to: up_to.min(from + MAX_RANGE),
            };
            match gateway.ctx.rpc.call::<HistoryRange>(&request).await {
                Ok(messages) => {
                    for m in messages {
                        if let Entry::Vacant(slot) = found.entry(m.seq) {
                            if let Ok(text) = text(&ServerFrame::from(m)) {
                                slot.insert(text);
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%room, error = %e, "history range unavailable");
                    break;
                }
            }
            from = request.up_to;
        }
        let complete = found.len() as u64 == up_to - after;
        if complete || tokio::time::Instant::now() >= deadline {
            if !complete {
                tracing::warn!(%room, after, up_to, found = found.len(), "resume incomplete: history lags");
            }
            return found;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(HISTORY_RETRY_MAX);
    }
}

fn text(frame: &ServerFrame) -> Result<Utf8Bytes, ServerFrame> {
    serde_json::to_string(frame)
        .map(Utf8Bytes::from)
        .map_err(|_| error(None, ErrorCode::Internal, "frame not serialisable"))
}

async fn send(outbound: &mpsc::Sender<Outbound>, frame: &ServerFrame) -> bool {
    match text(frame) {
        Ok(text) => outbound.send(Outbound::Frame(text)).await.is_ok(),
        Err(_) => false,
    }
}

async fn send_all(
    outbound: &mpsc::Sender<Outbound>,
    frames: &[ServerFrame],
) -> Result<(), ServerFrame> {
    for frame in frames {
        let text = text(frame)?;
        if outbound.send(Outbound::Frame(text)).await.is_err() {
            break;
        }
    }
    Ok(())
}
