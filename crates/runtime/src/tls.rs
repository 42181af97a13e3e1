//! Native TLS (`wss://`, `https://`) from a certificate chain and a private
//! key in PEM files (`UNHIDRA_TLS_CERT`, `UNHIDRA_TLS_KEY`). The files are
//! read again when they change (checked every `UNHIDRA_TLS_RELOAD_SECS`), so
//! a renewed certificate is served without a restart; a pair that does not
//! load is logged and the one in use kept. ALPN offers HTTP/2 and HTTP/1.1.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use rustls::{
    ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use unhidra_core::Config;

pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    /// When each file was last modified, as it was loaded.
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

impl Tls {
    /// The TLS of `config`; `None` when no certificate is configured. Fails
    /// when the files do not hold a certificate chain and its key.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Arc<Self>>> {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Ok(None);
        };
        let current = RwLock::new(load(cert, key)?);
        Ok(Some(Arc::new(Self {
            cert: cert.clone(),
            key: key.clone(),
            current,
        })))
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        read(&self.current).acceptor.clone()
    }

    /// Checks the files every `every` until `shutdown`, and serves a changed
    /// pair from the next connection on.
    pub fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => self.reload_if_changed(),
                }
            }
        });
    }

    fn reload_if_changed(&self) {
        let stamps = (modified(&self.cert), modified(&self.key));
        if read(&self.current).stamps == stamps {
            return;
        }
        match load(&self.cert, &self.key) {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                // Tried again at the next check; until then the pair in use
                // is served. A renewal tool that writes the two files one
                // after the other passes through here.
                tracing::warn!(
                    error = format!("{e:#}"),
                    "TLS certificate not reloaded; the one in use is kept"
                );
            }
        }
    }
}

fn read(lock: &RwLock<Loaded>) -> std::sync::RwLockReadGuard<'_, Loaded> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> anyhow::Result<Loaded> {
    let stamps = (modified(cert), modified(key));
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("tls_cert {}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("tls_cert {}: no certificate in the file", cert.display());
    }
    let private =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("tls_key {}", key.display()))?;
    let mut server = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .context("tls_cert and tls_key do not make a pair")?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        stamps,
    })
}

/// A client for `healthcheck` only: it asks this host's own port for
/// `/healthz`, sends nothing secret, and so takes whatever certificate the
/// server shows (its name need not be `localhost`), checking only that the
/// handshake is sound.
pub fn loopback_probe() -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
