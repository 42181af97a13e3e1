//! A WebSocket connection speaking `unhidra.v1`: JSON text frames out
//! ([`ClientFrame`]) and in ([`ServerFrame`]), splittable into a sender and a
//! receiver for clients that send without waiting.

use std::net::{IpAddr, SocketAddr};

use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, client_async_with_config,
    tungstenite::{
        Message, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig,
    },
};
use unhidra_core::protocol::{BEARER_PROTOCOL_PREFIX, ClientFrame, SUBPROTOCOL, ServerFrame};

use crate::{ClientError, Result, transport};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The connection's read buffer. tungstenite fills the buffer's whole
/// capacity with zeros before each read from the socket, so its default
/// (128 KiB) cost a 128 KiB memset per read and as much memory per
/// connection; larger frames still arrive whole, over several reads.
const READ_BUFFER_BYTES: usize = 8 * 1024;

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
        Self::open_from(ws_url, token, None).await
    }

    /// [`Connection::open`] from the local address `source` (any port), when
    /// given: a load client spreads its connections over several addresses,
    /// each with its own range of ports.
    pub async fn open_from(
        ws_url: &str,
        token: Option<&str>,
        source: Option<IpAddr>,
    ) -> Result<Self> {
        let mut request = ws_url.into_client_request().map_err(transport)?;
        let protocols = match token {
            Some(token) => format!("{SUBPROTOCOL}, {BEARER_PROTOCOL_PREFIX}{token}"),
            None => SUBPROTOCOL.to_owned(),
        };
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&protocols).map_err(transport)?,
        );
        let uri = request.uri();
        if uri.scheme_str() != Some("ws") {
            return Err(transport(
                "only ws:// URLs: this client is built without TLS",
            ));
        }
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(80);
        let server = tokio::net::lookup_host((host, port))
            .await
            .map_err(transport)?
            .next()
            .ok_or_else(|| transport(format!("{host} has no address")))?;
        let tcp = tcp_connect(server, source).await.map_err(transport)?;
        let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
        let (socket, _) =
            client_async_with_config(request, MaybeTlsStream::Plain(tcp), Some(config))
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

/// A TCP connection to `server` from `source` (when given), Nagle's
/// algorithm off: a lone small frame goes out at once.
async fn tcp_connect(server: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        // The port is chosen at connect, among those whose address pair
        // with `server` is free, instead of one free for every server: bind
        // with port 0 alone searches long and runs out early.
        #[cfg(target_os = "linux")]
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )?;
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    use super::*;

    #[tokio::test]
    async fn a_connection_opened_from_an_address_comes_from_it() -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}/ws", listener.local_addr()?);
        let source: IpAddr = [127, 0, 0, 2].into();
        let opening =
            tokio::spawn(async move { Connection::open_from(&url, None, Some(source)).await });
        let (stream, peer) = listener.accept().await?;
        assert_eq!(peer.ip(), source);
        // Not a WebSocket server: the handshake fails, as a clear error.
        drop(stream);
        let refused = opening.await.map_err(std::io::Error::other)?;
        assert!(refused.is_err());
        Ok(())
    }

    #[tokio::test]
    async fn a_frame_many_times_the_read_buffer_arrives_whole()
    -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}/ws", listener.local_addr()?);
        let frame = ServerFrame::Pong {
            id: Some("é".repeat(40 * READ_BUFFER_BYTES)),
        };
        let sent = frame.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await?;
            // tungstenite's callback type, error response included.
            #[allow(clippy::result_large_err)]
            let agree = |_: &Request, mut response: Response| {
                let protocol = HeaderValue::from_static(SUBPROTOCOL);
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", protocol);
                Ok(response)
            };
            let mut socket = tokio_tungstenite::accept_hdr_async(stream, agree).await?;
            socket
                .send(Message::text(serde_json::to_string(&sent)?))
                .await?;
            // Open until the client has read it.
            socket.next().await;
            std::result::Result::<(), Box<dyn std::error::Error + Send + Sync>>::Ok(())
        });
        let mut connection = Connection::open(&url, None).await?;
        assert_eq!(connection.next().await?, Some(frame));
        connection.close().await?;
        server.await??;
        Ok(())
    }

    #[tokio::test]
    async fn wss_is_refused_without_tls() {
        let refused = Connection::open("wss://127.0.0.1:1/ws", None).await;
        assert!(
            matches!(&refused, Err(ClientError::Transport(m)) if m.contains("without TLS")),
            "{:?}",
            refused.err()
        );
    }
}
