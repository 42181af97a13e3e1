//! A connection's pipeline: every frame the client sent is answered in the
//! order it arrived, while its sends travel to chat-service in batches, one
//! batch in flight at a time (with other connections' batches:
//! [`crate::sends`]). The gateway keeps reading while a batch is in
//! flight, so a client that sends without waiting is limited by group commit
//! throughput, not by one round trip per message; and since a connection's
//! batches are sequential, its sends to a room are numbered in sending order.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::sends;
use unhidra_core::{
    ids::RoomId,
    protocol::{ErrorCode, ServerFrame},
    rpc::{Draft, RpcCode, RpcError, RpcReply, SendAccepted},
};

enum Slot {
    /// Answered; goes out once every earlier slot has.
    Ready(ServerFrame),
    /// A send waiting for the next batch, and when it was read.
    Queued(Draft, Instant),
    /// A send in the batch in flight, and when it was read.
    Submitted {
        id: String,
        room: RoomId,
        read_at: Instant,
    },
}

/// The frames of one connection that are read but not yet written.
#[derive(Default)]
pub struct Pipeline {
    slots: VecDeque<Slot>,
}

pub fn error(id: Option<String>, code: ErrorCode, message: &str) -> ServerFrame {
    ServerFrame::Error {
        id,
        code,
        message: message.to_owned(),
        retry_after_ms: None,
    }
}

impl Pipeline {
    /// Frames read and not yet written.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// A frame answered at once (pong, refusal).
    pub fn push_ready(&mut self, frame: ServerFrame) {
        self.slots.push_back(Slot::Ready(frame));
    }

    /// A send, read now, answered when its batch comes back.
    pub fn push_send(&mut self, draft: Draft) {
        self.slots.push_back(Slot::Queued(draft, Instant::now()));
    }

    /// The answers that may be written now: the leading answered frames.
    pub fn take_ready(&mut self) -> Vec<ServerFrame> {
        let mut ready = Vec::new();
        while matches!(self.slots.front(), Some(Slot::Ready(_))) {
            if let Some(Slot::Ready(frame)) = self.slots.pop_front() {
                ready.push(frame);
            }
        }
        ready
    }

    /// The next batch: up to `max` queued sends with bodies of up to
    /// `max_bytes` together as JSON writes them (at least one send), in
    /// order, now in flight; and those bodies' bytes.
    pub fn next_batch(&mut self, max: usize, max_bytes: usize) -> (Vec<Draft>, usize) {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for slot in &mut self.slots {
            if batch.len() == max {
                break;
            }
            if let Slot::Queued(draft, read_at) = slot {
                let size = sends::wire_bytes(&draft.body);
                if !batch.is_empty() && bytes + size > max_bytes {
                    break;
                }
                bytes += size;
                let submitted = Slot::Submitted {
                    id: draft.id.clone(),
                    room: draft.room,
                    read_at: *read_at,
                };
                if let Slot::Queued(draft, _) = std::mem::replace(slot, submitted) {
                    batch.push(draft);
                }
            }
        }
        (batch, bytes)
    }

    /// Answers the sends of the batch in flight with its outcome: an ack or
    /// an error frame each, in order; `answered` is told how long each
    /// waited since it was read.
    pub fn complete(
        &mut self,
        outcome: Result<Vec<RpcReply<SendAccepted>>, RpcError>,
        mut answered: impl FnMut(Duration),
    ) {
        let (mut replies, refused) = match outcome {
            Ok(replies) => (replies.into_iter(), None),
            Err(e) => (Vec::new().into_iter(), Some(e)),
        };
        let now = Instant::now();
        for slot in &mut self.slots {
            let Slot::Submitted { id, room, read_at } = slot else {
                continue;
            };
            let (id, room) = (std::mem::take(id), *room);
            answered(now.saturating_duration_since(*read_at));
            let answer = match (&refused, replies.next().as_ref()) {
                (Some(e), _) | (None, Some(RpcReply::Err(e))) => {
                    error(Some(id), e.code.frame_code(), &e.message)
                }
                (None, Some(RpcReply::Ok(accepted))) => ServerFrame::Ack {
                    id,
                    room,
                    seq: accepted.seq,
                    message_id: accepted.message_id,
                },
                (None, None) => {
                    tracing::error!("chat-service answered fewer sends than it was sent");
                    let internal = RpcCode::Internal;
                    error(Some(id), internal.frame_code(), "internal error")
                }
            };
            *slot = Slot::Ready(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use unhidra_core::ids::MessageId;

    use super::*;

    fn draft(id: &str, room: RoomId, body: &str) -> Draft {
        Draft {
            id: id.to_owned(),
            room,
            body: body.to_owned(),
        }
    }

    fn ids(frames: &[ServerFrame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match f {
                ServerFrame::Ack { id, seq, .. } => format!("ack {id} {seq}"),
                ServerFrame::Pong { id } => format!("pong {}", id.as_deref().unwrap_or("")),
                ServerFrame::Error { id, code, .. } => {
                    format!("error {} {code:?}", id.as_deref().unwrap_or(""))
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn accepted(seq: u64) -> RpcReply<SendAccepted> {
        RpcReply::Ok(SendAccepted {
            seq,
            message_id: MessageId::new(),
        })
    }

    #[test]
    fn answers_keep_the_order_frames_arrived_in() {
        let room = RoomId::new();
        let began = Instant::now();
        let mut pipeline = Pipeline::default();
        pipeline.push_ready(ServerFrame::Pong {
            id: Some("p0".into()),
        });
        pipeline.push_send(draft("s1", room, "one"));
        pipeline.push_ready(ServerFrame::Pong {
            id: Some("p1".into()),
        });
        pipeline.push_send(draft("s2", room, "two"));
        pipeline.push_send(draft("s3", room, "three"));
        assert_eq!(ids(&pipeline.take_ready()), vec!["pong p0"]);

        // At most two sends per batch; the pong between them waits its turn.
        let (batch, bytes) = pipeline.next_batch(2, 1024);
        assert_eq!(bytes, "onetwo".len());
        assert_eq!(
            batch.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(),
            vec!["one", "two"]
        );
        assert!(pipeline.take_ready().is_empty());
        let mut waited = Vec::new();
        let pause = Duration::from_millis(5);
        std::thread::sleep(pause);
        pipeline.complete(
            Ok(vec![
                accepted(7),
                RpcReply::Err(RpcError::new(RpcCode::Forbidden, "not a member")),
            ]),
            |w| waited.push(w),
        );
        assert_eq!(waited.len(), 2, "each send of the batch, acked or refused");
        assert_eq!(
            ids(&pipeline.take_ready()),
            vec!["ack s1 7", "pong p1", "error s2 Forbidden"]
        );
        assert_eq!(pipeline.len(), 1);

        let (batch, _) = pipeline.next_batch(2, 1024);
        assert_eq!(batch.len(), 1);
        pipeline.complete(
            Err(RpcError::new(RpcCode::Unavailable, "retry later")),
            |w| waited.push(w),
        );
        assert_eq!(ids(&pipeline.take_ready()), vec!["error s3 Unavailable"]);
        assert_eq!(waited.len(), 3);
        // Each waited from its reading, before the pause, to its answer.
        let longest = began.elapsed();
        assert!(
            waited.iter().all(|w| *w >= pause && *w <= longest),
            "{waited:?}"
        );
        assert_eq!(pipeline.len(), 0);
    }

    #[test]
    fn a_batch_is_bounded_by_its_bodies_bytes_but_takes_at_least_one_send() {
        let room = RoomId::new();
        let mut pipeline = Pipeline::default();
        for (id, bytes) in [("a", 600), ("b", 400), ("c", 30), ("d", 5000), ("e", 10)] {
            pipeline.push_send(draft(id, room, &"x".repeat(bytes)));
        }
        let mut batches = Vec::new();
        loop {
            let (batch, bytes) = pipeline.next_batch(10, 1000);
            if batch.is_empty() {
                break;
            }
            let ids: Vec<&str> = batch.iter().map(|d| d.id.as_str()).collect();
            batches.push((ids.join(" "), bytes));
            let accepted = (0..batch.len() as u64).map(accepted).collect();
            pipeline.complete(Ok(accepted), |_| {});
        }
        assert_eq!(
            batches,
            [
                ("a b".to_owned(), 1000),
                ("c".to_owned(), 30),
                ("d".to_owned(), 5000),
                ("e".to_owned(), 10)
            ]
        );
    }

    #[test]
    fn a_short_answer_leaves_no_send_unanswered() {
        let room = RoomId::new();
        let mut pipeline = Pipeline::default();
        pipeline.push_send(draft("a", room, "a"));
        pipeline.push_send(draft("b", room, "b"));
        pipeline.next_batch(10, 1024);
        pipeline.complete(Ok(vec![accepted(1)]), |_| {});
        assert_eq!(
            ids(&pipeline.take_ready()),
            vec!["ack a 1", "error b Internal"]
        );
    }
}
