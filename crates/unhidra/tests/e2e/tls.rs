//! Native TLS: with `UNHIDRA_TLS_CERT` and `UNHIDRA_TLS_KEY` the embedded
//! server speaks `https://` and `wss://` only, with a certificate from a test
//! CA; a message goes end to end over it; a renewed certificate written over
//! the files is served to new connections without a restart; HTTP/2 is
//! offered by ALPN and answers a request; and the container healthcheck
//! probes over TLS.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::Connector;
use unhidra_core::Config;

use crate::harness::*;

/// A test CA that issues certificates for `localhost`.
struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
}

impl TestCa {
    fn new() -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Unhidra test CA");
        let der = params.clone().self_signed(&key)?.der().clone();
        Ok(Self { params, key, der })
    }

    /// Writes a new certificate for `localhost`, named `name`, and its key.
    fn issue(&self, name: &str, cert: &Path, key: &Path) -> Result<CertificateDer<'static>, Error> {
        let issuer = self.params.clone().self_signed(&self.key)?;
        let leaf_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        let leaf = params.signed_by(&leaf_key, &issuer, &self.key)?;
        // The key first: the server must ride out a pair caught half written.
        std::fs::write(key, leaf_key.serialize_pem())?;
        std::fs::write(cert, leaf.pem())?;
        Ok(leaf.der().clone())
    }

    fn client(&self, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, Error> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone())?;
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

async fn dial(
    config: Arc<ClientConfig>,
    address: SocketAddr,
) -> Result<TlsStream<TcpStream>, Error> {
    let tcp = TcpStream::connect(address).await?;
    let name = ServerName::try_from("localhost")?;
    Ok(TlsConnector::from(config).connect(name, tcp).await?)
}

/// The certificate the server showed.
fn served(stream: &TlsStream<TcpStream>) -> Option<CertificateDer<'static>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.clone().into_owned())
}

/// One HTTP/1.0 request over TLS: the status and the JSON body.
async fn https(
    config: Arc<ClientConfig>,
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value), Error> {
    let mut stream = dial(config, address).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    // A TLS peer that closes without close_notify still gave a whole answer.
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8(answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head.split(' ').nth(1).ok_or("no status")?.parse::<u16>()?;
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok((status, body))
}

#[tokio::test]
async fn a_message_goes_over_wss_and_a_renewed_certificate_is_served_without_a_restart()
-> TestResult {
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let ca = TestCa::new()?;
    let first = ca.issue("first", &cert, &key)?;
    let stack = Embedded::start_with(Config {
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        tls_reload_secs: 1,
        ..unhidra_testkit::config()
    })
    .await?;
    let address = stack.app.address;
    let h1 = ca.client(&[b"http/1.1"])?;

    // Plain HTTP on the TLS port gets nowhere.
    assert!(
        get(&format!("{}/healthz", stack.app.http()), None)
            .await
            .is_err()
    );
    let mut ready = false;
    for _ in 0..100 {
        if https(h1.clone(), address, "GET", "/readyz", None, None)
            .await?
            .0
            == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "never ready over TLS");

    let email = unique_email("tls");
    let credentials = json!({"email": email, "password": "correct horse battery"});
    let (status, _) = https(
        h1.clone(),
        address,
        "POST",
        "/api/v1/auth/register",
        None,
        Some(credentials.clone()),
    )
    .await?;
    assert_eq!(status, 201);
    let (status, login) = https(
        h1.clone(),
        address,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(credentials),
    )
    .await?;
    assert_eq!(status, 200, "{login}");
    let token = login["access_token"].as_str().ok_or("no token")?.to_owned();
    let (status, room) = https(
        h1.clone(),
        address,
        "POST",
        "/api/v1/rooms",
        Some(&token),
        Some(json!({"name": "secure", "visibility": "public"})),
    )
    .await?;
    assert_eq!(status, 201, "{room}");
    let room = room["room_id"].as_str().ok_or("no room")?.to_owned();

    let wss = format!("wss://localhost:{}/ws", address.port());
    let tcp = TcpStream::connect(address).await?;
    let (mut socket, _) = tokio_tungstenite::client_async_tls_with_config(
        handshake(&wss, &token)?,
        tcp,
        None,
        Some(Connector::Rustls(h1.clone())),
    )
    .await?;
    send(
        &mut socket,
        json!({"type": "send", "id": "s-1", "room": room, "body": "over TLS"}),
    )
    .await?;
    let ack = next_of(&mut socket, "ack").await?;
    assert_eq!(ack["seq"], 1, "{ack}");
    let message = next_of(&mut socket, "message").await?;
    assert_eq!(message["body"], "over TLS");

    // HTTP/2 is offered to clients that ask for it, and serves them.
    let h2 = dial(ca.client(&[b"h2", b"http/1.1"])?, address).await?;
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(served(&h2), Some(first.clone()));
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2)).await?;
    tokio::spawn(connection);
    let healthz = hyper::Request::get(format!("https://localhost:{}/healthz", address.port()))
        .body(Empty::<Bytes>::new())?;
    let answer = h2.send_request(healthz).await?;
    assert_eq!(answer.version(), hyper::Version::HTTP_2);
    assert_eq!(answer.status(), 200);

    // The container healthcheck speaks TLS too.
    let probe = tokio::process::Command::new(env!("CARGO_BIN_EXE_unhidra"))
        .arg("healthcheck")
        .env("UNHIDRA_BIND", address.to_string())
        .env("UNHIDRA_TLS_CERT", &cert)
        .env("UNHIDRA_TLS_KEY", &key)
        .output()
        .await?;
    assert!(probe.status.success(), "{probe:?}");

    // A renewal written over the files is served without a restart, and the
    // open WebSocket goes on.
    let renewed = ca.issue("renewed", &cert, &key)?;
    assert_ne!(renewed, first);
    let mut now_served = None;
    for _ in 0..50 {
        now_served = served(&dial(h1.clone(), address).await?);
        if now_served.as_ref() == Some(&renewed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        now_served,
        Some(renewed),
        "the renewed certificate is not served"
    );
    send(
        &mut socket,
        json!({"type": "send", "id": "s-2", "room": room, "body": "still here"}),
    )
    .await?;
    assert_eq!(next_of(&mut socket, "ack").await?["seq"], 2);

    // A pair that does not load is refused, and the one in use kept.
    std::fs::write(&cert, "not a certificate")?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(served(&dial(h1, address).await?).is_some());
    stack.app.stop().await
}
