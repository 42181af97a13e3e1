//! The scaled-out bus: NATS core subjects for pub/sub and request/reply,
//! JetStream for streams and durable pull consumers.

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, consumer::pull, context::PublishErrorKind, stream},
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::{
    Bus, BusError, Deliveries, Delivery, Headers, Message, Outgoing, Result, Settle, Subscription,
};
use unhidra_core::streams::{ConsumerSpec, StreamSpec};

/// A [`Bus`] over a NATS server with JetStream enabled.
#[derive(Clone, Debug)]
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

fn transport(e: impl std::fmt::Display) -> BusError {
    BusError::Transport(e.to_string())
}

impl NatsBus {
    /// Connects to `url` (`nats://host:4222`, credentials in the URL if any),
    /// receiving replies under `inbox` (a NATS user restricted to its own
    /// inbox cannot read other services' replies).
    pub async fn connect(url: &str, inbox: &str) -> Result<Self> {
        let (options, server) = with_credentials(async_nats::ConnectOptions::new(), url)?;
        let client = options
            .name("unhidra")
            .custom_inbox_prefix(inbox)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(server)
            .await
            .map_err(transport)?;
        // retry_on_initial_connect returns at once; wait (briefly) for the first
        // connection so a wrong URL is reported at start-up, not later.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(BusError::Transport(format!(
                    "cannot reach NATS at {}",
                    redact(url)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            jetstream: jetstream::new(client.clone()),
            client,
        })
    }
}

/// The server `url` names, and its credentials (`user:password@` or
/// `token@`, percent-encoded) as connect options: async-nats does not take
/// them from the URL.
fn with_credentials(
    options: async_nats::ConnectOptions,
    url: &str,
) -> Result<(async_nats::ConnectOptions, async_nats::ServerAddr)> {
    let server: async_nats::ServerAddr = url
        .parse()
        .map_err(|e| BusError::Transport(format!("invalid NATS URL {}: {e}", redact(url))))?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let options = match (server.username(), server.password()) {
        (Some(user), Some(password)) => options.user_and_password(decode(user), decode(password)),
        (Some(token), None) => options.token(decode(token)),
        _ => options,
    };
    Ok((options, server))
}

/// The URL without credentials, for messages.
fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((scheme_and_credentials, host)) => {
            let scheme = scheme_and_credentials.split("://").next().unwrap_or("nats");
            format!("{scheme}://***@{host}")
        }
        None => url.to_owned(),
    }
}

fn publish_error(subject: &str, kind: PublishErrorKind) -> BusError {
    match kind {
        PublishErrorKind::StreamNotFound => BusError::NoStream(subject.to_owned()),
        other => BusError::Transport(format!("publish to {subject}: {other:?}")),
    }
}

fn to_nats(headers: Headers) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(name, value.as_str());
    }
    map
}

fn from_nats(message: async_nats::Message) -> Message {
    let headers = message
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .filter_map(|(name, values)| {
                    values
                        .first()
                        .map(|v| (name.to_string(), v.as_str().to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    Message {
        subject: message.subject.to_string(),
        headers,
        payload: message.payload,
        reply: message.reply.map(|r| r.to_string()),
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<()> {
        self.client
            .publish_with_headers(subject.to_owned(), to_nats(headers), payload)
            .await
            .map_err(transport)
    }

    async fn publish_durable(
        &self,
        subject: &str,
        msg_id: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<()> {
        self.publish_durable_batch(vec![Outgoing {
            subject: subject.to_owned(),
            msg_id: msg_id.to_owned(),
            headers,
            payload,
        }])
        .await
    }

    async fn publish_durable_batch(&self, messages: Vec<Outgoing>) -> Result<()> {
        // Every message is sent first (in order, on one connection), then the
        // acknowledgements are awaited together.
        let mut acks = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = to_nats(m.headers);
            headers.insert("Nats-Msg-Id", m.msg_id.as_str());
            let ack = self
                .jetstream
                .publish_with_headers(m.subject.clone(), headers, m.payload)
                .await
                .map_err(|e| publish_error(&m.subject, e.kind()))?;
            acks.push(async move {
                ack.await
                    .map_err(|e| publish_error(&m.subject, e.kind()))
                    .map(drop)
            });
        }
        futures::future::try_join_all(acks).await.map(drop)
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription> {
        let subscriber = self
            .client
            .subscribe(pattern.to_owned())
            .await
            .map_err(transport)?;
        // Sent now, not with the next write: what is published once the
        // subscriber's own next step is seen arrives.
        self.client.flush().await.map_err(transport)?;
        Ok(subscriber.map(from_nats).boxed())
    }

    async fn subscribe_queue(&self, pattern: &str, group: &str) -> Result<Subscription> {
        let subscriber = self
            .client
            .queue_subscribe(pattern.to_owned(), group.to_owned())
            .await
            .map_err(transport)?;
        Ok(subscriber.map(from_nats).boxed())
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        let request =
            self.client
                .request_with_headers(subject.to_owned(), to_nats(headers), payload);
        match tokio::time::timeout(timeout, request).await {
            Err(_) => Err(BusError::Timeout(subject.to_owned())),
            Ok(Ok(reply)) => Ok(from_nats(reply)),
            Ok(Err(e)) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    BusError::NoResponders(subject.to_owned())
                }
                async_nats::RequestErrorKind::TimedOut => BusError::Timeout(subject.to_owned()),
                _ => transport(e),
            }),
        }
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<()> {
        let config = stream::Config {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            max_age: spec.max_age,
            max_bytes: i64::try_from(spec.max_bytes).unwrap_or(i64::MAX),
            // Kept until every consumer acknowledged it; when full, new
            // publishes are refused instead of unprocessed ones dropped.
            retention: stream::RetentionPolicy::Interest,
            discard: stream::DiscardPolicy::New,
            duplicate_window: spec.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        // Services starting together race to create a stream: the loser's
        // create is refused ("subjects overlap"), and once more, finding the
        // winner's stream, it updates it to the same configuration.
        let created = match self.jetstream.create_or_update_stream(config.clone()).await {
            Ok(_) => Ok(()),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.jetstream
                    .create_or_update_stream(config)
                    .await
                    .map(|_| ())
            }
        };
        created.map_err(|e| {
            BusError::Transport(format!(
                "stream {}: {e} (a stream made by an older Unhidra keeps every message; \
                     once its consumers have caught up, delete it with `nats stream rm {}` \
                     and restart)",
                spec.name, spec.name
            ))
        })?;
        let stream = self
            .jetstream
            .get_stream(&spec.name)
            .await
            .map_err(transport)?;
        for consumer in &spec.consumers {
            stream
                .create_consumer(pull_config(consumer))
                .await
                .map_err(transport)?;
        }
        Ok(())
    }

    async fn consume(&self, spec: &ConsumerSpec) -> Result<Deliveries> {
        let stream = self
            .jetstream
            .get_stream(&spec.stream)
            .await
            .map_err(|_| BusError::UnknownStream(spec.stream.clone()))?;
        let consumer = stream
            .create_consumer(pull_config(spec))
            .await
            .map_err(transport)?;
        let messages = consumer.messages().await.map_err(transport)?;
        Ok(messages
            .map(|next| {
                let message = next.map_err(transport)?;
                let attempt = message
                    .info()
                    .map(|info| u64::try_from(info.delivered).unwrap_or(1))
                    .unwrap_or(1);
                Ok(Delivery {
                    message: from_nats(message.message.clone()),
                    attempt,
                    settle: Box::new(NatsSettle(message)),
                })
            })
            .boxed())
    }

    async fn consumer_pending(&self, spec: &ConsumerSpec) -> Result<u64> {
        let stream = self
            .jetstream
            .get_stream(&spec.stream)
            .await
            .map_err(|_| BusError::UnknownStream(spec.stream.clone()))?;
        let info = stream
            .consumer_info(&spec.durable)
            .await
            .map_err(transport)?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    async fn consumed(&self, _stream: &str) -> Result<()> {
        Ok(())
    }

    async fn healthy(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn streams_outlive_process(&self) -> bool {
        true
    }

    /// JetStream keeps what its streams hold; unacknowledged deliveries go
    /// to the consumers again after the restart.
    async fn close_streams(&self) {}
}

/// The JetStream consumer a [`ConsumerSpec`] describes (the same whether
/// the stream creates it or a consumer resumes it).
fn pull_config(spec: &ConsumerSpec) -> pull::Config {
    pull::Config {
        durable_name: Some(spec.durable.clone()),
        filter_subject: spec.filter.clone().unwrap_or_default(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver: spec.max_deliver.map_or(-1, i64::from),
        ..Default::default()
    }
}

struct NatsSettle(jetstream::Message);

#[async_trait]
impl Settle for NatsSettle {
    async fn ack(&self) -> Result<()> {
        // Sent without waiting for the server to confirm it (a double ack is
        // a round trip per message): an acknowledgement lost with the
        // connection means one redelivery, which consumers absorb.
        self.0.ack().await.map_err(transport)
    }

    async fn nak(&self, delay: Duration) -> Result<()> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(transport)
    }
}
