//! A WebSocket connection speaking `unhidra.v1`: JSON text frames out
//! ([`ClientFrame`]) and in ([`ServerFrame`]), splittable into a sender and a
//! receiver for clients that send without waiting.

use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async_with_config,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};
use unhidra_core::protocol::{BEARER_PROTOCOL_PREFIX, ClientFrame, SUBPROTOCOL, ServerFrame};

use crate::{ClientError, Result, transport};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An open connection.
pub struct Connection {
    socket: Socket,
}

/// The sending half of a connection.
pub struct Sender {
    sink: SplitSink<Socket, Message>,
}

/// The receiving half of a connection.
pub struct Receiver {
    stream: SplitStream<Socket>,
}

impl Connection {
    /// Connects to `ws_url`, presenting `token` in the subprotocol header as a
    /// browser would (no token: for servers that need none).
    pub async fn open(ws_url: &str, token: Option<&str>) -> Result<Self> {
        let mut request = ws_url.into_client_request().map_err(transport)?;
        let protocols = match token {
            Some(token) => format!("{SUBPROTOCOL}, {BEARER_PROTOCOL_PREFIX}{token}"),
            None => SUBPROTOCOL.to_owned(),
        };
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&protocols).map_err(transport)?,
        );
        // Nagle's algorithm off: a lone small frame goes out at once.
        let (socket, _) = connect_async_with_config(request, None, true)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(response) => ClientError::Refused {
                    status: response.status().as_u16(),
                    body: response
                        .body()
                        .as_ref()
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or_else(|| unhidra_core::error::ErrorBody {
                            error: "unknown".into(),
                            message: "handshake refused".into(),
                        }),
                },
                other => transport(other),
            })?;
        Ok(Self { socket })
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        send(&mut self.socket, frame).await
    }

    /// The next server frame; `Ok(None)` once the server closed.
    pub async fn next(&mut self) -> Result<Option<ServerFrame>> {
        next(&mut self.socket).await
    }

    /// Closes with a normal close frame.
    pub async fn close(mut self) -> Result<()> {
        self.socket.close(None).await.map_err(transport)
    }

    pub fn split(self) -> (Sender, Receiver) {
        let (sink, stream) = self.socket.split();
        (Sender { sink }, Receiver { stream })
    }
}

impl Sender {
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        send(&mut self.sink, frame).await
    }

    /// Queues a frame without flushing; [`Sender::flush`] writes the queue.
    pub async fn feed(&mut self, frame: &ClientFrame) -> Result<()> {
        let text =
            serde_json::to_string(frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.sink.feed(Message::text(text)).await.map_err(transport)
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.sink.flush().await.map_err(transport)
    }

    pub async fn close(mut self) -> Result<()> {
        self.sink.close().await.map_err(transport)
    }
}

impl Receiver {
    /// The next server frame; `Ok(None)` once the server closed.
    pub async fn next(&mut self) -> Result<Option<ServerFrame>> {
        next(&mut self.stream).await
    }
}

async fn send<S>(sink: &mut S, frame: &ClientFrame) -> Result<()>
where
    S: SinkExt<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    let text = serde_json::to_string(frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
    sink.send(Message::text(text)).await.map_err(transport)
}

async fn next<S>(stream: &mut S) -> Result<Option<ServerFrame>>
where
    S: StreamExt<Item = std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>
        + Unpin,
{
    loop {
        match stream.next().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(transport(e)),
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str())
                    .map(Some)
                    .map_err(|e| ClientError::Protocol(format!("{e}: {}", text.as_str())));
            }
            Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(_)) => {}
        }
    }
}
