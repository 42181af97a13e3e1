//! The sends of this gateway's connections to chat-service. A connection
//! hands over its batch (its user's sends, in order) and has one out at a
//! time, so its sends to a room are numbered in the order it sent them. The
//! batches of many connections travel together: a `chat.send` request takes
//! every batch waiting when it goes, and at most [`IN_FLIGHT`] requests are
//! out at once. An idle gateway sends a batch at once; a busy one sends
//! fewer, larger requests, which NATS, chat-service and the gateway each
//! handle once instead of once per connection.

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::sync::{mpsc, oneshot};
use unhidra_bus::RpcClient;
use unhidra_core::{
    events::SCHEMA_VERSION,
    ids::UserId,
    rpc::{
        ChatSend, Draft, MAX_SENDS_PER_BATCH, RpcCode, RpcError, RpcReply, SendAccepted, SendBatch,
        UserSends,
    },
};
use unhidra_telemetry::request_id;

/// Requests out at once at most.
const IN_FLIGHT: usize = 4;
/// Bytes of message bodies one request carries at most, as written in its
/// JSON ([`wire_bytes`]), unless a single connection's batch is larger
/// (NATS refuses payloads above 1 MiB by default, and a body of control
/// characters takes six times its size there). A connection's batch is
/// bounded the same way, so one client's sends cannot make a request that
/// fails for the others in it.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Batches waiting for a request before a connection waits to hand its own
/// over.
const WAITING: usize = 4096;

/// What chat-service answered to a batch: one outcome per send, in order.
pub type Outcome = Result<Vec<RpcReply<SendAccepted>>, RpcError>;

struct Batch {
    sends: UserSends,
    bytes: usize,
    answer: oneshot::Sender<Outcome>,
}

/// Hands batches over; clones share one sending task.
#[derive(Clone)]
pub struct Sends {
    batches: mpsc::Sender<Batch>,
}

impl Sends {
    /// Starts the sending task; it ends once every [`Sends`] is dropped,
    /// so connections draining at shutdown still send.
    pub fn start(rpc: RpcClient) -> Self {
        let (batches, queue) = mpsc::channel(WAITING);
        tokio::spawn(send_together(rpc, queue));
        Self { batches }
    }

    /// Sends `sends` of `user` (in order) and waits for their outcomes;
    /// `bytes` is their bodies' size as [`wire_bytes`] counts it (the
    /// pipeline counted it when it took them).
    pub async fn send(&self, user: UserId, sends: Vec<Draft>, bytes: usize) -> Outcome {
        let unavailable = || RpcError::new(RpcCode::Unavailable, "chat unavailable");
        let (answer, answered) = oneshot::channel();
        let batch = Batch {
            sends: UserSends { user, sends },
            bytes,
            answer,
        };
        self.batches.send(batch).await.map_err(|_| unavailable())?;
        // Dropped unanswered only if the request could not be made.
        answered.await.map_err(|_| unavailable())?
    }
}

/// The bytes `body` takes as a JSON string's contents: what JSON escapes
/// (quotes, backslashes, control characters) takes two or six.
pub fn wire_bytes(body: &str) -> usize {
    body.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// The batches for one request: those waiting now, up to the bounds; the
/// first that would exceed them is `carried` to the next.
fn gather(
    queue: &mut mpsc::Receiver<Batch>,
    first: Batch,
    carried: &mut Option<Batch>,
) -> Vec<Batch> {
    let (mut sends, mut bytes) = (first.sends.sends.len(), first.bytes);
    let mut batches = vec![first];
    while let Ok(next) = queue.try_recv() {
        let (more_sends, more_bytes) = (sends + next.sends.sends.len(), bytes + next.bytes);
        if more_sends > MAX_SENDS_PER_BATCH || more_bytes > MAX_REQUEST_BYTES {
            *carried = Some(next);
            break;
        }
        (sends, bytes) = (more_sends, more_bytes);
        batches.push(next);
    }
    batches
}

/// Sends what waits, as requests free up, until every [`Sends`] is gone.
async fn send_together(rpc: RpcClient, mut queue: mpsc::Receiver<Batch>) {
    let mut out = FuturesUnordered::new();
    let mut carried: Option<Batch> = None;
    loop {
        if out.len() >= IN_FLIGHT {
            out.next().await;
            continue;
        }
        let first = match carried.take() {
            Some(batch) => batch,
            None => tokio::select! {
                Some(()) = out.next(), if !out.is_empty() => continue,
                next = queue.recv() => match next {
                    Some(batch) => batch,
                    None => break,
                },
            },
        };
        // Connections whose answers came together hand their next batches
        // over together: let them, before gathering.
        tokio::task::yield_now().await;
        let batches = gather(&mut queue, first, &mut carried);
        out.push(request(rpc.clone(), batches));
    }
    while out.next().await.is_some() {}
}

/// One `chat.send` for `batches`, under a request id of its own; each batch
/// gets its part of the answer.
async fn request(rpc: RpcClient, batches: Vec<Batch>) {
    let mut answers = Vec::with_capacity(batches.len());
    let mut users = Vec::with_capacity(batches.len());
    for batch in batches {
        answers.push((batch.sends.sends.len(), batch.answer));
        users.push(batch.sends);
    }
    let request = SendBatch {
        v: SCHEMA_VERSION,
        users,
    };
    let outcome = request_id::scope("ws frame", request_id::generate(), async {
        let outcome = rpc.call::<ChatSend>(&request).await;
        if let Ok(replies) = &outcome {
            let sends = request
                .users
                .iter()
                .flat_map(|u| u.sends.iter().map(move |d| (u.user, d)));
            for ((user, draft), reply) in sends.zip(replies) {
                if let RpcReply::Ok(accepted) = reply {
                    tracing::debug!(
                        user_id = %user,
                        room_id = %draft.room,
                        seq = accepted.seq,
                        message_id = %accepted.message_id,
                        "message sent"
                    );
                }
            }
        }
        outcome
    })
    .await;
    match outcome {
        Ok(replies) => {
            let mut replies = replies.into_iter();
            for (count, answer) in answers {
                // A short answer leaves the rest for the pipeline to refuse.
                let _ = answer.send(Ok(replies.by_ref().take(count).collect()));
            }
        }
        Err(e) => {
            for (_, answer) in answers {
                let _ = answer.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tokio::sync::Semaphore;
    use unhidra_core::{
        Config,
        ids::{MessageId, RoomId},
    };
    use unhidra_runtime::{ServiceContext, rpc::respond};

    use super::*;

    /// Sends whose bodies are the numbers `from..from + count`.
    fn numbered(from: u64, count: u64) -> Vec<Draft> {
        (from..from + count)
            .map(|n| Draft {
                id: format!("c{n}"),
                room: RoomId::new(),
                body: n.to_string(),
            })
            .collect()
    }

    /// Each request's users and how many sends each.
    type Asked = Arc<Mutex<Vec<Vec<(UserId, usize)>>>>;

    #[tokio::test]
    async fn batches_waiting_while_requests_are_out_go_together_each_answered_its_own()
    -> anyhow::Result<()> {
        let ctx =
            ServiceContext::connect("test", Config::default(), std::future::pending()).await?;
        // Each request's users and their sends; answered once the test lets
        // it, each send accepted with its body's number as its sequence.
        let asked: Asked = Arc::default();
        let gate = Arc::new(Semaphore::new(0));
        {
            let (asked, gate) = (Arc::clone(&asked), Arc::clone(&gate));
            respond::<ChatSend, _, _>(&ctx, "test", move |request| {
                let (asked, gate) = (Arc::clone(&asked), Arc::clone(&gate));
                async move {
                    let users = request.users.iter().map(|u| (u.user, u.sends.len()));
                    asked.lock().expect("asked").push(users.collect());
                    gate.acquire().await.expect("gate").forget();
                    let sends = request.users.iter().flat_map(|u| &u.sends);
                    Ok(sends
                        .map(|d| {
                            RpcReply::Ok(SendAccepted {
                                seq: d.body.parse().unwrap_or_default(),
                                message_id: MessageId::new(),
                            })
                        })
                        .collect())
                }
            })
            .await?;
        }
        let sends = Sends::start(ctx.rpc.clone());
        let send = |from: u64, count: u64| {
            let sends = sends.clone();
            let user = UserId::new();
            let drafts = numbered(from, count);
            let bytes = drafts.iter().map(|d| wire_bytes(&d.body)).sum();
            let task = tokio::spawn(async move { sends.send(user, drafts, bytes).await });
            (user, task)
        };
        let asked_len = || asked.lock().expect("asked").len();

        // Every request the gateway may have out is out, unanswered (one
        // batch each: each is handed over once the one before is out).
        let mut first = Vec::new();
        for i in 0..IN_FLIGHT {
            first.push(send(100 * i as u64, 1));
            while asked_len() <= i {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Three connections hand batches over meanwhile.
        let waiting: Vec<_> = (1..=3).map(|i| send(1000 * i, 2)).collect();
        while sends.batches.capacity() > WAITING - waiting.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gate.add_permits(IN_FLIGHT + 1);

        for (_, task) in first {
            task.await??;
        }
        let mut together = Vec::new();
        for (i, (user, task)) in waiting.into_iter().enumerate() {
            let mut seqs = Vec::new();
            for reply in task.await?? {
                match reply {
                    RpcReply::Ok(accepted) => seqs.push(accepted.seq),
                    RpcReply::Err(e) => anyhow::bail!("refused: {e:?}"),
                }
            }
            let from = 1000 * (i as u64 + 1);
            assert_eq!(seqs, [from, from + 1], "each batch gets its own answers");
            together.push((user, 2));
        }
        let asked = asked.lock().expect("asked").clone();
        assert_eq!(asked.len(), IN_FLIGHT + 1, "{asked:?}");
        assert_eq!(asked[IN_FLIGHT], together, "the three went in one request");
        ctx.shutdown.cancel();
        Ok(())
    }

    fn batch(sends: u64, bytes: usize) -> Batch {
        let mut drafts = numbered(0, sends);
        if let Some(first) = drafts.first_mut() {
            first.body = "x".repeat(bytes);
        }
        let bytes = drafts.iter().map(|d| wire_bytes(&d.body)).sum();
        Batch {
            sends: UserSends {
                user: UserId::new(),
                sends: drafts,
            },
            bytes,
            answer: oneshot::channel().0,
        }
    }

    #[test]
    fn bodies_count_as_many_bytes_as_their_json_takes() -> anyhow::Result<()> {
        for body in [
            "plain",
            "é ✓",
            "\"quoted\" \\",
            "line\nbreak\t",
            "\u{1}\u{1f}\u{7f}",
        ] {
            let json = serde_json::to_string(body)?;
            assert_eq!(wire_bytes(body), json.len() - 2, "{json}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_request_stops_before_the_batch_that_would_exceed_its_bounds() {
        let (tx, mut queue) = mpsc::channel(8);
        let big = MAX_REQUEST_BYTES / 2;
        for b in [
            batch(1, big),
            batch(1, big - 100),
            batch(1, 200),
            batch(200, 1),
        ] {
            assert!(tx.try_send(b).is_ok());
        }
        let counts = |batches: &[Batch]| -> Vec<usize> {
            batches.iter().map(|b| b.sends.sends.len()).collect()
        };
        let mut carried = None;
        let first = batch(10, 1);
        // 10 + 1 + 1 sends fit, as do their bytes; the third batch's bytes not.
        let one = gather(&mut queue, first, &mut carried);
        assert_eq!(counts(&one), [10, 1, 1]);
        let next = carried.take().expect("carried");
        assert_eq!(next.bytes, 200);
        // 1 + 200 sends fit; then the queue is empty.
        let two = gather(&mut queue, next, &mut carried);
        assert_eq!(counts(&two), [1, 200]);
        assert!(carried.is_none());
        // A batch of more sends than a request takes follows one that fits.
        for b in [batch(100, 1), batch(MAX_SENDS_PER_BATCH as u64, 1)] {
            assert!(tx.try_send(b).is_ok());
        }
        let three = gather(&mut queue, batch(1, 1), &mut carried);
        assert_eq!(counts(&three), [1, 100]);
        let alone = carried.take().expect("carried");
        assert_eq!(
            counts(&gather(&mut queue, alone, &mut carried)),
            [MAX_SENDS_PER_BATCH]
        );
    }
}
