//! What every Unhidra service process shares: connecting the bus and database
//! the configuration names, the process's metric registry, the HTTP glue (the
//! API error type, the current-user extractor), request/reply responders,
//! durable consumers and recorders, audit publishing, the `/healthz`,
//! `/readyz` and `/metrics` routes, and serving until shutdown. A service is a
//! [`Service`] built on a [`ServiceContext`]; the all-in-one binary serves
//! several on one listener, each service binary serves its own.

pub mod batch;
mod client_ip;
pub mod consumer;
mod current_user;
mod error;
mod health;
mod instrumented;
mod limits;
pub mod openapi;
mod origin;
pub mod recorder;
pub mod rpc;
mod server;
mod tls;
mod verifier_sync;

use std::{future::Future, sync::Arc};

use axum::{Router, extract::FromRef};
use secrecy::ExposeSecret;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use unhidra_authn::TokenVerifier;
use unhidra_bus::{Bus, MemoryBus, NatsBus, RpcClient};
use unhidra_core::{
    Config,
    clock::{SharedClock, SystemClock},
    events::AuditEvent,
    subjects::Subjects,
};
use unhidra_store::{Database, sqlite_url};
use unhidra_telemetry::{http::HttpMetrics, metrics::Metrics};

use crate::{consumer::ConsumerMetrics, instrumented::InstrumentedBus};
/// Every Unhidra process allocates with mimalloc: faster than the system
/// allocator on the message path, and it returns freed memory to the system,
/// where glibc's per-thread arenas kept argon2's 19 MiB blocks (hundreds of
/// MB after a burst of logins).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use crate::{
    client_ip::ClientIp,
    current_user::{AdminUser, CurrentUser, SessionUser, authenticate, bearer_token},
    error::{ApiError, ApiJson},
    limits::{Blocked, Limits, Throttle},
    server::body_limit,
};

/// One service, ready to serve: its routes, its database (for readiness) and
/// its background tasks (which stop when the context's shutdown fires).
pub struct Service {
    pub name: &'static str,
    pub router: Router,
    /// The OpenAPI paths of `router`.
    pub openapi: utoipa::openapi::OpenApi,
    pub database: Option<Database>,
    pub tasks: Vec<JoinHandle<()>>,
    /// Answers the paths no route matches, outside the API's guard (the
    /// gateway's forwarding to the services, which apply their own limits
    /// to the client: counted here too, a client's shared budget would be
    /// spent twice per request).
    pub fallback: Option<Router>,
}

/// The state of a service whose handlers may extract [`CurrentUser`]: the
/// context and the service's own part (its repositories, its metrics).
#[derive(Clone)]
pub struct ApiState<S> {
    pub ctx: ServiceContext,
    pub service: S,
}

impl<S> FromRef<ApiState<S>> for Arc<TokenVerifier> {
    fn from_ref(state: &ApiState<S>) -> Self {
        Arc::clone(&state.ctx.verifier)
    }
}

impl<S> FromRef<ApiState<S>> for Limits {
    fn from_ref(state: &ApiState<S>) -> Self {
        state.ctx.limits.clone()
    }
}

/// Configuration, bus, metrics and shutdown signal, shared by the services of
/// a process.
#[derive(Clone)]
pub struct ServiceContext {
    pub config: Arc<Config>,
    pub bus: Arc<dyn Bus>,
    /// Calls to other services' request/reply contracts.
    pub rpc: RpcClient,
    pub subjects: Subjects,
    /// The process's registry: each service registers its own metrics here
    /// when it is built; `/metrics` renders it.
    pub metrics: Metrics,
    consumer_metrics: ConsumerMetrics,
    http_metrics: HttpMetrics,
    pub shutdown: CancellationToken,
    /// Work that shutdown waits for besides the background tasks: WebSocket
    /// connections and requests being answered.
    pub in_flight: TaskTracker,
    /// Access-token verification, with one JWKS cache per process.
    pub verifier: Arc<TokenVerifier>,
    /// The time, for everything that expires (a test may move it).
    pub clock: SharedClock,
    /// The process's rate limiter and shared limits.
    pub limits: Limits,
}

impl ServiceContext {
    /// Connects `service`'s bus (`nats_url`, else in-process) and the rate
    /// limiter (`redis_url`, else in-process), and arms shutdown.
    pub async fn connect(
        service: &str,
        config: Config,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Self> {
        Self::connect_with_clock(service, config, Arc::new(SystemClock), shutdown).await
    }

    /// [`ServiceContext::connect`] on a given clock.
    pub async fn connect_with_clock(
        service: &str,
        config: Config,
        clock: SharedClock,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let subjects =
            Subjects::new(&config.bus_prefix).with_stream_max_bytes(config.stream_max_bytes);
        let bus: Arc<dyn Bus> = match &config.nats_url {
            Some(url) => {
                Arc::new(NatsBus::connect(url.expose_secret(), &subjects.inbox(service)).await?)
            }
            None => Arc::new(MemoryBus::new()),
        };
        let metrics = Metrics::new()?;
        let bus: Arc<dyn Bus> = Arc::new(InstrumentedBus::new(bus, &subjects, &metrics)?);
        let token = CancellationToken::new();
        let trigger = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        let rpc = RpcClient::new(Arc::clone(&bus), subjects.clone(), config.bus_timeout());
        Ok(Self {
            verifier: Arc::new(TokenVerifier::new(&config, rpc.clone())),
            limits: Limits::new(&config, Arc::clone(&clock), &metrics)?,
            clock,
            rpc,
            subjects,
            consumer_metrics: ConsumerMetrics::register(&metrics)?,
            http_metrics: HttpMetrics::register(&metrics)?,
            metrics,
            config: Arc::new(config),
            bus,
            shutdown: token,
            in_flight: TaskTracker::new(),
        })
    }

    /// The service's database (`database_url`, else its own SQLite file),
    /// whose pool reports its connections in `/metrics`.
    pub async fn open_database(&self, service: &str) -> anyhow::Result<Database> {
        let url = match &self.config.database_url {
            Some(url) => url.expose_secret().to_owned(),
            None => sqlite_url(&self.config.data_dir, service),
        };
        let db = Database::connect(&url, self.config.database_max_connections).await?;
        self.metrics.register(db.pool_collector(service)?)?;
        Ok(db)
    }

    /// Publishes `event` as JSON on the core `subject`: whoever listens now
    /// receives it; nothing is stored.
    pub async fn announce<T: serde::Serialize>(
        &self,
        subject: &str,
        event: &T,
    ) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(event)?;
        self.bus
            .publish(subject, Default::default(), payload.into())
            .await?;
        Ok(())
    }

    /// Records a security event, with the origin of the request being
    /// handled; a failure is logged, never shown to the user.
    pub async fn audit(&self, mut event: AuditEvent) {
        origin::stamp(&mut event);
        let subject = self.subjects.audit(event.kind.as_str());
        let payload = match serde_json::to_vec(&event) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "audit event not serialisable");
                return;
            }
        };
        let id = event.id.to_string();
        if let Err(e) = self
            .bus
            .publish_durable(&subject, &id, Default::default(), payload.into())
            .await
        {
            tracing::error!(error = %e, kind = event.kind.as_str(), event_id = %id, "audit event lost");
        }
    }

    /// Serves `services` on `listener` until shutdown, then waits (up to the
    /// configured deadline) for in-flight requests and background tasks.
    pub async fn serve(&self, listener: TcpListener, services: Vec<Service>) -> anyhow::Result<()> {
        let mut router = Router::new();
        let mut databases = Vec::new();
        let mut tasks = Vec::new();
        let mut docs = Vec::new();
        let mut fallback = None;
        for service in services {
            tracing::info!(service = service.name, "service started");
            router = router.merge(service.router);
            docs.push(service.openapi);
            if let Some(db) = service.database {
                databases.push((service.name, db));
            }
            tasks.extend(service.tasks);
            fallback = fallback.or(service.fallback);
        }
        tasks.push(verifier_sync::spawn(self));
        let mut router = server::guard_api(router, &self.config, self.limits.clone())
            .merge(health::routes(
                Arc::clone(&self.bus),
                databases,
                self.limits.clone(),
                self.metrics.clone(),
            ))
            .merge(openapi::routes(openapi::document(docs)));
        if let Some(fallback) = fallback {
            router = router.fallback_service(fallback);
        }
        let router = router.layer(axum::middleware::from_fn_with_state(
            self.http_metrics.clone(),
            unhidra_telemetry::http::track,
        ));
        let tls = tls::Tls::from_config(&self.config)?;
        if let Some(tls) = &tls {
            let every = std::time::Duration::from_secs(self.config.tls_reload_secs);
            Arc::clone(tls).watch(every, self.shutdown.clone());
        }
        tracing::info!(address = %listener.local_addr()?, tls = tls.is_some(), "listening");
        let header_timeout = std::time::Duration::from_secs(self.config.http_header_timeout_secs);
        let server = tokio::spawn(server::serve(
            listener,
            router,
            header_timeout,
            tls,
            self.shutdown.clone(),
        ));
        self.shutdown.cancelled().await;
        let deadline = self.config.shutdown_timeout();
        let in_flight = self.in_flight.clone();
        let drained = tokio::time::timeout(deadline, async {
            let served = server.await;
            // No request is in flight any more: what the in-process bus's
            // streams hold now is all their consumers have left to handle.
            self.bus.close_streams().await;
            for task in tasks {
                let _ = task.await;
            }
            in_flight.close();
            in_flight.wait().await;
            served
        })
        .await;
        match drained {
            Ok(Ok(())) => {
                tracing::info!("shut down");
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                tracing::warn!(?deadline, "shutdown deadline passed with work in flight");
                Ok(())
            }
        }
    }
}

/// Runs one database-backed service alone on `listener` until `shutdown`
/// resolves: what each service binary does.
pub async fn run_service<F, Fut>(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    name: &'static str,
    build: F,
) -> anyhow::Result<()>
where
    F: FnOnce(ServiceContext, Database) -> Fut,
    Fut: Future<Output = anyhow::Result<Service>>,
{
    let ctx = ServiceContext::connect(name, config, shutdown).await?;
    let db = ctx.open_database(name).await?;
    let service = build(ctx.clone(), db).await?;
    ctx.serve(listener, vec![service]).await
}

/// `<binary> healthcheck`: exits 0 when the service on this configuration's
/// port answers `/healthz` with 200 (for container HEALTHCHECKs, without curl),
/// over TLS when the configuration names a certificate.
async fn healthcheck(address: std::net::SocketAddr, tls: bool) -> anyhow::Result<()> {
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], address.port()));
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(target).await?;
        if tls {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let stream = tls::loopback_probe()?.connect(name, tcp).await?;
            ask_healthz(stream).await
        } else {
            ask_healthz(tcp).await
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), probe).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => anyhow::bail!("{target}/healthz did not answer 200"),
        Ok(Err(e)) => anyhow::bail!("{target}/healthz: {e}"),
        Err(_) => anyhow::bail!("{target}/healthz timed out"),
    }
}

async fn ask_healthz(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
) -> anyhow::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut head = [0_u8; 12];
    stream.read_exact(&mut head).await?;
    Ok(head.ends_with(b" 200"))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
}

/// The body of every service binary: configuration, the runtime, logs
/// and traces, listener, run.
pub fn main_for<F, Fut>(service: &str, default_port: u16, run: F) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener, Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = Config::load()?;
    runtime(&config)?.block_on(async move {
        let address = config.bind_or(default_port);
        if std::env::args().nth(1).as_deref() == Some("healthcheck") {
            return healthcheck(address, config.tls_cert.is_some()).await;
        }
        let _traces = unhidra_telemetry::init(&unhidra_telemetry::Reporting {
            json: config.log_format == unhidra_core::config::LogFormat::Json,
            filter: &config.log,
            otlp_endpoint: config.otlp_endpoint.as_deref(),
            service,
        })?;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))?;
        run(listener, config).await
    })
}

/// The runtime a process runs on: `worker_threads` threads for its tasks,
/// or one per CPU it may use when that is 0. Always set here, so that
/// `UNHIDRA_WORKER_THREADS` is the one way to choose it (tokio would
/// otherwise read `TOKIO_WORKER_THREADS`).
pub fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = match config.worker_threads {
        0 => std::thread::available_parallelism()?.get(),
        n => n,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(workers)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_has_the_configured_worker_threads() -> anyhow::Result<()> {
        let workers = |worker_threads| -> anyhow::Result<usize> {
            let config = Config {
                worker_threads,
                ..Config::default()
            };
            Ok(runtime(&config)?
                .block_on(async { tokio::runtime::Handle::current().metrics().num_workers() }))
        };
        assert_eq!(workers(1)?, 1);
        assert_eq!(workers(3)?, 3);
        // 0: one per CPU the process may use.
        assert_eq!(workers(0)?, std::thread::available_parallelism()?.get());
        Ok(())
    }
}
