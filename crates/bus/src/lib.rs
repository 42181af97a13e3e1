//! The message bus every Unhidra service talks through: one [`Bus`] trait with
//! two implementations, [`NatsBus`] (NATS core + JetStream, for the scaled-out
//! deployment) and [`MemoryBus`] (in-process, for the embedded default). The
//! conformance suite in `tests/` holds both to the same behaviour.
//! [`RpcClient`] calls the typed request/reply contracts of `unhidra-core`.

mod authorization;
mod memory;
mod nats;
mod rpc;

use std::{collections::BTreeMap, fmt, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use authorization::{nats_authorization, password_variable};
pub use memory::MemoryBus;
pub use nats::NatsBus;
pub use rpc::RpcClient;
use unhidra_core::streams::{ConsumerSpec, StreamSpec};
pub use unhidra_core::subjects::matches;

/// Message headers (trace context, request id, schema version...).
pub type Headers = BTreeMap<String, String>;

/// A message as a subscriber or consumer sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
    /// Where to send the answer, for a request.
    pub reply: Option<String>,
}

/// A message to publish into a stream, with its deduplication id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Everything the bus can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("no service is listening on `{0}`")]
    NoResponders(String),
    #[error("no reply on `{0}` in time")]
    Timeout(String),
    #[error("no stream stores subject `{0}`")]
    NoStream(String),
    #[error("stream `{0}` does not exist")]
    UnknownStream(String),
    /// The stream holds `max_bytes` of unprocessed messages; retry later.
    #[error("stream `{0}` is full")]
    StreamFull(String),
    /// The process is shutting down: the in-process bus's streams take
    /// nothing more.
    #[error("the bus is shutting down")]
    Closed,
    #[error("bus: {0}")]
    Transport(String),
}

pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// A stream of messages from a subscription.
pub type Subscription = BoxStream<'static, Message>;

/// A stream of deliveries from a durable consumer.
pub type Deliveries = BoxStream<'static, Result<Delivery>>;

/// Settles one delivery; implemented by each bus.
#[async_trait]
trait Settle: Send + Sync {
    async fn ack(&self) -> Result<()>;
    async fn nak(&self, delay: Duration) -> Result<()>;
}

/// One delivery from a durable consumer; settle it with [`Delivery::ack`] once
/// its effects are committed, or [`Delivery::nak`] to have it redelivered.
pub struct Delivery {
    pub message: Message,
    /// 1 on the first delivery, more on redeliveries.
    pub attempt: u64,
    settle: Box<dyn Settle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Delivery {
    /// Done with it: it will not be delivered again, unless the
    /// acknowledgement is lost on its way (the connection breaks first), so
    /// consumers apply what they receive idempotently. The server records it
    /// soon after this returns, not necessarily before.
    pub async fn ack(self) -> Result<()> {
        self.settle.ack().await
    }

    /// Not done: deliver it again after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<()> {
        self.settle.nak(delay).await
    }
}

/// Publish/subscribe with `*` and `>` wildcards, request/reply, and durable
/// streams with explicit acknowledgement.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Fire-and-forget publish; subscribers that are listening now receive it.
    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<()>;

    /// Publish into the stream that stores `subject`; returns once it is stored.
    /// A repeated `msg_id` within the stream's duplicate window is stored once.
    async fn publish_durable(
        &self,
        subject: &str,
        msg_id: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<()>;

    /// Publishes `messages` into their streams, in order, and returns once
    /// every one is stored: one round of acknowledgements for the lot rather
    /// than one round trip each. On an error some may be stored already;
    /// publishing them again is deduplicated by `msg_id`.
    async fn publish_durable_batch(&self, messages: Vec<Outgoing>) -> Result<()>;

    /// Every message on subjects matching `pattern`.
    async fn subscribe(&self, pattern: &str) -> Result<Subscription>;

    /// Like `subscribe`, but each message goes to one member of `group`: how
    /// service replicas share requests.
    async fn subscribe_queue(&self, pattern: &str, group: &str) -> Result<Subscription>;

    /// Sends a request and waits up to `timeout` for the first reply.
    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message>;

    /// Creates the stream, or updates it to `spec` if it exists.
    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<()>;

    /// Creates (or resumes) a durable consumer and streams its deliveries.
    async fn consume(&self, spec: &ConsumerSpec) -> Result<Deliveries>;

    /// Messages the durable consumer has not acknowledged yet: its lag.
    async fn consumer_pending(&self, spec: &ConsumerSpec) -> Result<u64>;

    /// Returns once every durable consumer of `stream` has acknowledged
    /// everything the stream took before this call: from then on, what the
    /// publisher keeps of those messages for a crash (an outbox) is no
    /// longer needed. At once where streams outlive the process (JetStream
    /// keeps what it took until its consumers have it, across restarts of
    /// either), and for a stream without consumers or that does not exist.
    async fn consumed(&self, stream: &str) -> Result<()>;

    /// Whether the bus is usable right now (for readiness checks).
    async fn healthy(&self) -> bool;

    /// Whether what the streams hold survives this process. JetStream's does;
    /// the in-process bus's does not, so at shutdown its consumers handle
    /// everything left before they stop (see [`Bus::close_streams`]).
    fn streams_outlive_process(&self) -> bool;

    /// At shutdown, once no request is in flight: streams that end with the
    /// process take nothing more (publishing into them fails with
    /// [`BusError::Closed`]), and each consumer's deliveries end once it has
    /// acknowledged all it was given. Streams that outlive the process are
    /// left as they are.
    async fn close_streams(&self);
}
