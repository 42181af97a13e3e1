//! Durable streams and their consumers, as plain data: what a stream keeps and
//! how a durable consumer reads it. `unhidra-bus` creates them on NATS
//! JetStream or in memory; [`crate::subjects::Subjects`] names Unhidra's own.

use std::time::Duration;

/// A stream persisting every message published on its subjects until each
/// of its durable consumers has acknowledged it (interest retention), so a
/// stream holds what is still to be processed, not everything ever sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
    /// Messages older than this are discarded, acknowledged or not.
    pub max_age: Duration,
    /// Stored messages take at most this many bytes. A full stream refuses
    /// new publishes (the publisher keeps them and retries) rather than
    /// dropping unacknowledged ones.
    pub max_bytes: u64,
    /// Publishes with the same message id within this window are stored once.
    pub duplicate_window: Duration,
    /// The durable consumers created with the stream: every message is kept
    /// until all of them acknowledged it, even before they first run.
    pub consumers: Vec<ConsumerSpec>,
}

/// A durable consumer of a stream: its position survives restarts, and every
/// message is redelivered until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub stream: String,
    pub durable: String,
    /// Only messages on subjects matching this pattern.
    pub filter: Option<String>,
    /// Unacknowledged deliveries are redelivered after this long.
    pub ack_wait: Duration,
    /// Give up on a message after this many deliveries; `None` never gives up.
    pub max_deliver: Option<u32>,
}
