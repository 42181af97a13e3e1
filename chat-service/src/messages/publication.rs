//! What publishing accepted messages sends on the bus: each message live on
//! its room's subject, for the gateways that follow the room, and all of
//! them into the rooms stream, many to a stream message
//! ([`CommittedMessages`]), for history-service. The stream and its
//! consumer then store, deliver and acknowledge a batch where they did a
//! message each; the live subjects are not stored.

use std::collections::HashMap;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use unhidra_bus::{Bus, BusError, Headers, Outgoing};
use unhidra_core::{events::SCHEMA_VERSION, ids::MessageId, subjects::Subjects};

use super::outbox::Pending;

/// Bytes of messages one stream message holds at most (a single larger
/// message goes alone); NATS refuses payloads above 1 MiB by default.
const MAX_STORED_BYTES: usize = 256 * 1024;

/// A room's message, live.
struct Live {
    subject: String,
    headers: Headers,
    payload: Bytes,
}

/// The bus messages of some accepted messages.
pub struct Publication {
    live: Vec<Live>,
    stored: Vec<Outgoing>,
}

impl Publication {
    /// The bus messages of `pending` (in the order numbered), each with the
    /// headers of the request that sent it, taken from `headers`.
    pub fn new(
        subjects: &Subjects,
        pending: Vec<Pending>,
        headers: &mut HashMap<MessageId, Headers>,
    ) -> Result<Self, serde_json::Error> {
        let mut stored = Vec::new();
        let mut batch = Batch::default();
        let mut live = Vec::with_capacity(pending.len());
        for p in pending {
            let headers = headers.remove(&p.message_id).unwrap_or_default();
            let entry = entry(&headers, &p.payload)?;
            if !batch.is_empty() && batch.bytes + entry.len() > MAX_STORED_BYTES {
                stored.push(std::mem::take(&mut batch).into_outgoing(subjects));
            }
            batch.push(p.message_id, entry);
            live.push(Live {
                subject: subjects.room_messages(p.room),
                headers,
                payload: p.payload.into(),
            });
        }
        if !batch.is_empty() {
            stored.push(batch.into_outgoing(subjects));
        }
        Ok(Self { live, stored })
    }

    /// Publishes every message live, then into the rooms stream; returns
    /// once the stream stored them all. On an error some may have been
    /// sent: publishing them again is absorbed (the gateways give a
    /// connection no sequence twice, history stores a message id once).
    pub async fn send(self, bus: &dyn Bus) -> Result<(), BusError> {
        for m in self.live {
            bus.publish(&m.subject, m.headers, m.payload).await?;
        }
        bus.publish_durable_batch(self.stored).await
    }
}

/// One message of a stream message: `{"headers":…,"message":…}`, the
/// message as serialised when it was accepted.
fn entry(headers: &Headers, payload: &str) -> Result<String, serde_json::Error> {
    let headers = serde_json::to_string(headers)?;
    Ok(format!("{{\"headers\":{headers},\"message\":{payload}}}"))
}

/// A stream message being filled.
#[derive(Default)]
struct Batch {
    ids: Sha256,
    entries: Vec<String>,
    bytes: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push(&mut self, id: MessageId, entry: String) {
        self.ids.update(id.0.as_bytes());
        self.bytes += entry.len();
        self.entries.push(entry);
    }

    /// A [`CommittedMessages`](unhidra_core::events::CommittedMessages),
    /// identified by its messages' ids: published again with the same
    /// messages, the stream stores it once.
    fn into_outgoing(self, subjects: &Subjects) -> Outgoing {
        let payload = format!(
            "{{\"v\":{SCHEMA_VERSION},\"messages\":[{}]}}",
            self.entries.join(",")
        );
        let digest = self.ids.finalize();
        let msg_id = digest
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        Outgoing {
            subject: subjects.committed_messages(),
            msg_id,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use unhidra_core::{
        events::{CommittedMessages, RoomMessage},
        ids::{RoomId, UserId},
    };

    use super::*;

    fn pending(room: RoomId, seq: u64, body: &str) -> (Pending, RoomMessage) {
        let message = RoomMessage {
            v: SCHEMA_VERSION,
            room,
            seq,
            message_id: MessageId::new(),
            sender: UserId::new(),
            body: body.to_owned(),
            sent_at: Utc::now(),
        };
        let pending = Pending {
            message_id: message.message_id,
            room,
            seq,
            payload: serde_json::to_string(&message).expect("a message serialises"),
        };
        (pending, message)
    }

    fn decoded(publication: &Publication) -> Vec<CommittedMessages> {
        publication
            .stored
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).expect("a stream message decodes"))
            .collect()
    }

    #[test]
    fn each_message_goes_live_to_its_room_and_stored_with_its_request_headers() {
        let subjects = Subjects::new("p");
        let (a, b) = (RoomId::new(), RoomId::new());
        let (pa, ma) = pending(a, 1, "to a");
        let (pb, mb) = pending(b, 7, "to b");
        let sent = Headers::from([("x-request-id".to_owned(), "r1".to_owned())]);
        let mut headers = HashMap::from([(ma.message_id, sent.clone())]);
        let publication = Publication::new(&subjects, vec![pa, pb], &mut headers).expect("built");

        let live: Vec<(&str, &Headers, RoomMessage)> = publication
            .live
            .iter()
            .map(|l| {
                let message = serde_json::from_slice(&l.payload).expect("live message decodes");
                (l.subject.as_str(), &l.headers, message)
            })
            .collect();
        let (room_a, room_b) = (subjects.room_messages(a), subjects.room_messages(b));
        assert_eq!(
            live,
            [
                (room_a.as_str(), &sent, ma.clone()),
                (room_b.as_str(), &Headers::new(), mb.clone())
            ]
        );

        assert_eq!(publication.stored.len(), 1);
        assert_eq!(publication.stored[0].subject, subjects.committed_messages());
        let stored = &decoded(&publication)[0];
        assert_eq!(stored.v, SCHEMA_VERSION);
        let messages: Vec<(&Headers, &RoomMessage)> = stored
            .messages
            .iter()
            .map(|m| (&m.headers, &m.message))
            .collect();
        assert_eq!(messages, [(&sent, &ma), (&Headers::new(), &mb)]);
    }

    #[test]
    fn large_publications_are_stored_in_bounded_stream_messages_in_order() {
        let subjects = Subjects::new("p");
        let room = RoomId::new();
        let body = "x".repeat(MAX_STORED_BYTES / 10);
        let (pending, messages): (Vec<Pending>, Vec<RoomMessage>) =
            (1..=25).map(|seq| pending(room, seq, &body)).unzip();
        let publication = Publication::new(&subjects, pending, &mut HashMap::new()).expect("built");
        assert!(
            publication.stored.len() >= 3,
            "{}",
            publication.stored.len()
        );
        for m in &publication.stored {
            assert!(
                m.payload.len() <= MAX_STORED_BYTES + 1024,
                "{}",
                m.payload.len()
            );
        }
        let stored: Vec<RoomMessage> = decoded(&publication)
            .into_iter()
            .flat_map(|batch| batch.messages.into_iter().map(|m| m.message))
            .collect();
        assert_eq!(stored, messages);
        let ids: std::collections::HashSet<&str> = publication
            .stored
            .iter()
            .map(|m| m.msg_id.as_str())
            .collect();
        assert_eq!(ids.len(), publication.stored.len(), "each its own id");
    }

    #[test]
    fn the_same_messages_are_stored_under_the_same_id_other_messages_not() {
        let subjects = Subjects::new("p");
        let room = RoomId::new();
        let (one, _) = pending(room, 1, "one");
        let (two, _) = pending(room, 2, "two");
        let id = |pending: Vec<Pending>| {
            Publication::new(&subjects, pending, &mut HashMap::new())
                .expect("built")
                .stored[0]
                .msg_id
                .clone()
        };
        let both = id(vec![one.clone(), two.clone()]);
        assert_eq!(both, id(vec![one.clone(), two.clone()]));
        assert_ne!(both, id(vec![one]));
        assert_ne!(both, id(vec![two]));
    }
}
