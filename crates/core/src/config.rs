//! Typed configuration, read from `UNHIDRA_*` environment variables over an
//! optional TOML file named by `UNHIDRA_CONFIG`. Every field has a default that
//! suits the embedded mode; `Config::load` refuses anything invalid at start-up.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    path::PathBuf,
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::rate::Rate;

/// Log output style.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Who may register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone.
    #[default]
    Open,
    /// With an invite code an admin created.
    Invite,
    /// Nobody; admins create accounts (`unhidra admin create`).
    Closed,
}

/// The whole configuration of every Unhidra service.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `UNHIDRA_BIND`: address to listen on. Unset, each binary uses 127.0.0.1 and
    /// its own port (unhidra and gateway 9000, auth-api 9200, chat 9300, history
    /// 9400, audit 9500).
    pub bind: Option<SocketAddr>,
    /// `UNHIDRA_DATA_DIR`: where the embedded SQLite databases live (`./data`).
    pub data_dir: PathBuf,
    /// `UNHIDRA_DATABASE_URL`: `postgres://...` or `sqlite://...`. Unset, each
    /// service keeps its own SQLite file under `data_dir`.
    pub database_url: Option<SecretString>,
    /// `UNHIDRA_DATABASE_MAX_CONNECTIONS`: pool size per service (10).
    pub database_max_connections: u32,
    /// `UNHIDRA_NATS_URL`: NATS with JetStream. Unset, the in-process bus is used,
    /// which only works when every service runs in one process.
    pub nats_url: Option<SecretString>,
    /// `UNHIDRA_BUS_PREFIX`: first token of every subject and stream name
    /// (`unhidra`); lets several deployments or tests share one NATS.
    pub bus_prefix: String,
    /// `UNHIDRA_REDIS_URL`: Redis for the rate-limit state that every node
    /// shares. Unset, limits are kept in-process (right for one process).
    pub redis_url: Option<SecretString>,
    /// `UNHIDRA_STREAM_MAX_BYTES`: the most each durable stream (room
    /// events, audit events) holds of messages not yet processed, on
    /// JetStream's disk or in the in-process bus's memory (256 MiB). A full
    /// stream refuses publishes, which wait in chat-service's outbox; nothing
    /// unprocessed is dropped.
    pub stream_max_bytes: u64,
    /// `UNHIDRA_BUS_TIMEOUT_MS`: how long a service waits for another's reply (5000).
    pub bus_timeout_ms: u64,
    /// `UNHIDRA_GROUP_COMMIT_LINGER_MS`: how long chat-service's group commit
    /// waits for more sends before committing a group that is not full
    /// (2; 0 commits at once). Fewer, larger transactions below
    /// capacity; each send waits at most this long before its transaction.
    pub group_commit_linger_ms: u64,
    /// `UNHIDRA_WORKER_THREADS`: threads that run the process's tasks (0:
    /// one per CPU the process may use). Services sharing a few cores with
    /// each other, NATS and Postgres spend less CPU on waking threads with
    /// fewer each (docs/operations.md).
    pub worker_threads: usize,
    /// `UNHIDRA_ALLOWED_ORIGINS`: comma-separated browser origins allowed to open
    /// WebSockets. Same-origin requests and clients that send no `Origin` are
    /// always allowed; `*` allows every origin.
    #[serde(deserialize_with = "comma_list")]
    pub allowed_origins: Vec<String>,
    /// `UNHIDRA_TRUSTED_PROXIES`: comma-separated addresses or CIDR ranges of
    /// reverse proxies whose `X-Forwarded-For` / `Forwarded` header names the
    /// client. Empty (the default), the client is the socket's peer.
    #[serde(deserialize_with = "ip_ranges")]
    pub trusted_proxies: Vec<IpNet>,
    /// `UNHIDRA_HTTP_HEADER_TIMEOUT_SECS`: a client must send its request
    /// headers (or WebSocket handshake) within this time (10).
    pub http_header_timeout_secs: u64,
    /// `UNHIDRA_HTTP_REQUEST_TIMEOUT_SECS`: longest time a request may take,
    /// body included, before it is answered 408 (30).
    pub http_request_timeout_secs: u64,
    /// `UNHIDRA_HTTP_MAX_CONCURRENT_REQUESTS`: requests handled at once per
    /// process; beyond it requests get 503 at once (1024).
    pub http_max_concurrent_requests: usize,
    /// `UNHIDRA_HTTP_BODY_LIMIT_BYTES`: largest request body of the API (1 MiB).
    pub http_body_limit_bytes: usize,
    /// `UNHIDRA_AUTH_BODY_LIMIT_BYTES`: largest body of a credential route
    /// such as login or register (16 KiB).
    pub auth_body_limit_bytes: usize,
    /// `UNHIDRA_LIMIT_HTTP_IP`: requests per client IP, every route (1200/min).
    pub limit_http_ip: Rate,
    /// `UNHIDRA_LIMIT_HTTP_USER`: requests per authenticated user (1200/min).
    pub limit_http_user: Rate,
    /// `UNHIDRA_LIMIT_LOGIN_IP`: logins per client IP (5/min).
    pub limit_login_ip: Rate,
    /// `UNHIDRA_LIMIT_LOGIN_ACCOUNT`: logins per account email (10/min).
    pub limit_login_account: Rate,
    /// `UNHIDRA_LIMIT_REGISTER_IP`: registrations per client IP (3/min).
    pub limit_register_ip: Rate,
    /// `UNHIDRA_LIMIT_REGISTER_ACCOUNT`: registrations per email (3/h).
    pub limit_register_account: Rate,
    /// `UNHIDRA_LIMIT_REFRESH_IP`: token refreshes per client IP (30/min).
    pub limit_refresh_ip: Rate,
    /// `UNHIDRA_LIMIT_REFRESH_ACCOUNT`: token refreshes per user (30/min).
    pub limit_refresh_account: Rate,
    /// `UNHIDRA_IP_BLOCK_FAILURES`: failed logins from one address within
    /// `ip_block_window_secs` that block it for `ip_block_secs` (5; 0 turns
    /// this stage off).
    pub ip_block_failures: u32,
    /// `UNHIDRA_IP_BLOCK_WINDOW_SECS` (900).
    pub ip_block_window_secs: u64,
    /// `UNHIDRA_IP_BLOCK_SECS` (900).
    pub ip_block_secs: u64,
    /// `UNHIDRA_IP_BLOCK_LONG_FAILURES`: failed logins from one address
    /// within `ip_block_long_window_secs` that block it for
    /// `ip_block_long_secs` (10; 0 turns this stage off).
    pub ip_block_long_failures: u32,
    /// `UNHIDRA_IP_BLOCK_LONG_WINDOW_SECS` (86400).
    pub ip_block_long_window_secs: u64,
    /// `UNHIDRA_IP_BLOCK_LONG_SECS` (86400).
    pub ip_block_long_secs: u64,
    /// `UNHIDRA_LOCKOUT_FAILURES`: failed logins in a row that lock an
    /// account (5; 0 turns lockout off).
    pub lockout_failures: u32,
    /// `UNHIDRA_LOCKOUT_SECS`: the first lock (60); each further lock of the
    /// same account doubles it.
    pub lockout_secs: u64,
    /// `UNHIDRA_LOCKOUT_MAX_SECS`: the longest lock (3600).
    pub lockout_max_secs: u64,
    /// `UNHIDRA_MAX_ROOMS_PER_USER`: rooms a user may belong to (1000).
    pub max_rooms_per_user: u32,
    /// `UNHIDRA_MAX_MEMBERS_PER_ROOM`: members a room may have (10000).
    pub max_members_per_room: u32,
    /// `UNHIDRA_SMTP_URL`: where auth-api sends mail (password resets), such
    /// as `smtps://user:password@mail.example.com` or
    /// `smtp://mail.example.com:587?tls=required`. Unset, mail is written to
    /// `<data_dir>/outbox` as `.eml` files and to the log, so the flows work
    /// on a laptop.
    pub smtp_url: Option<SecretString>,
    /// `UNHIDRA_MAIL_FROM`: the sender of that mail (`Unhidra
    /// <no-reply@localhost>`).
    pub mail_from: String,
    /// `UNHIDRA_PUBLIC_URL`: where users reach this deployment, for links in
    /// mail (`http://127.0.0.1:9000`).
    pub public_url: String,
    /// `UNHIDRA_REGISTRATION`: `open` (the default), `invite` or `closed`.
    pub registration: Registration,
    /// `UNHIDRA_EMAIL_VERIFICATION`: new accounts must confirm their email
    /// before logging in (false). Registration then answers the same for a
    /// new and a taken email, and mails the owner of a taken one instead.
    pub email_verification: bool,
    /// `UNHIDRA_SIGNING_KEY_SECRET`: 32 random bytes, base64, that encrypt the
    /// token signing keys in the auth database (XChaCha20-Poly1305). Unset,
    /// they are stored as they are. Set later, the stored keys are encrypted
    /// at the next start. Generate with `openssl rand -base64 32`.
    pub signing_key_secret: Option<SecretString>,
    /// `UNHIDRA_BOOTSTRAP_ADMIN_EMAIL` and `UNHIDRA_BOOTSTRAP_ADMIN_PASSWORD`:
    /// at start, auth-api makes this account an admin, creating it with this
    /// password if it does not exist (an existing account keeps its
    /// password). Both or neither.
    pub bootstrap_admin_email: Option<String>,
    pub bootstrap_admin_password: Option<SecretString>,
    /// `UNHIDRA_TOKEN_ISSUER`: `iss` of access tokens (`unhidra`).
    pub token_issuer: String,
    /// `UNHIDRA_TOKEN_AUDIENCE`: `aud` of access tokens (`unhidra`).
    pub token_audience: String,
    /// `UNHIDRA_ACCESS_TOKEN_TTL_SECS`: lifetime of an access token (900).
    pub access_token_ttl_secs: u64,
    /// `UNHIDRA_REFRESH_TOKEN_TTL_SECS`: lifetime of a refresh token (30 days).
    pub refresh_token_ttl_secs: u64,
    /// `UNHIDRA_PASSWORD_HASH_CONCURRENCY`: argon2id hashes computed at once (2);
    /// each takes 19 MiB and a CPU core for tens of milliseconds.
    pub password_hash_concurrency: usize,
    /// `UNHIDRA_PASSWORD_HASH_QUEUE`: requests that may wait for a hashing
    /// slot (64); beyond it they get 503 with `Retry-After` at once.
    pub password_hash_queue: usize,
    /// `UNHIDRA_PASSWORD_HASH_WAIT_MS`: longest wait for a hashing slot
    /// before 503 with `Retry-After` (2000).
    pub password_hash_wait_ms: u64,
    /// `UNHIDRA_MAX_FRAME_BYTES`: largest WebSocket frame the gateway processes
    /// (65536, at most 1 MiB). Larger frames get a `too_large` error; frames
    /// over 32 times this, or over 1 MiB, close the connection with 1009.
    pub max_frame_bytes: usize,
    /// `UNHIDRA_LIMIT_WS_CONNECT_IP`: WebSocket connection attempts per client
    /// IP (60/min).
    pub limit_ws_connect_ip: Rate,
    /// `UNHIDRA_WS_CONNECTIONS_PER_USER`: open WebSockets per user on one
    /// gateway (10).
    pub ws_connections_per_user: usize,
    /// `UNHIDRA_WS_CONNECTIONS_PER_IP`: open WebSockets per client IP on one
    /// gateway (100).
    pub ws_connections_per_ip: usize,
    /// `UNHIDRA_LIMIT_WS_FRAMES`: frames per connection (100/s).
    pub limit_ws_frames: Rate,
    /// `UNHIDRA_LIMIT_WS_BYTES`: bytes of frames per connection (1048576/s).
    pub limit_ws_bytes: Rate,
    /// `UNHIDRA_LIMIT_MESSAGES_USER`: messages a user sends per second
    /// across all their connections, on every gateway (Redis when
    /// configured) (50/s).
    pub limit_messages_user: Rate,
    /// `UNHIDRA_OUTBOUND_QUEUE`: frames queued per connection before it is
    /// closed as a slow consumer (256).
    pub outbound_queue: usize,
    /// `UNHIDRA_RESUME_WINDOW`: the most messages of one room a `resume`
    /// replays; a client further behind gets a `gap` and pages history (5000).
    pub resume_window: u64,
    /// `UNHIDRA_ROOM_TAIL`: the latest messages of each room it follows a
    /// gateway keeps in memory, so that a `resume` or a join catch-up takes
    /// them from there rather than from history (256, at most 256 KiB per
    /// room; 0 keeps none).
    pub room_tail: usize,
    /// `UNHIDRA_WS_PING_SECS`: how often the gateway pings each WebSocket
    /// (25).
    pub ws_ping_secs: u64,
    /// `UNHIDRA_WS_IDLE_TIMEOUT_SECS`: a WebSocket from which nothing (not
    /// even a pong) came for this long is closed with 4009 (60).
    pub ws_idle_timeout_secs: u64,
    /// `UNHIDRA_DRAIN_SECS`: on shutdown a gateway closes its WebSockets
    /// (1012) spread over this long, so their reconnects do not all land at
    /// once; less than `UNHIDRA_SHUTDOWN_TIMEOUT_SECS` (5).
    pub drain_secs: u64,
    /// `UNHIDRA_TOKEN_WARNING_SECS`: how long before a connection's access
    /// token expires it gets `token_expiring` (60).
    pub token_warning_secs: u64,
    /// `UNHIDRA_SEND_IDEMPOTENCY_SECS`: how long a send's client id is
    /// remembered, so that a retry gets the original ack (3600).
    pub send_idempotency_secs: u64,
    /// `UNHIDRA_WS_READ_BUFFER_BYTES`: how much a WebSocket reads from its
    /// socket at a time (2048). Kept small because every connection holds it
    /// (filled) while idle; larger frames still arrive whole.
    pub ws_read_buffer_bytes: usize,
    /// `UNHIDRA_WS_WRITE_BUFFER_BYTES`: frames are gathered up to this many
    /// bytes before a write to the socket (4096).
    pub ws_write_buffer_bytes: usize,
    /// `UNHIDRA_AUTH_API_URL`, `UNHIDRA_CHAT_URL`, `UNHIDRA_HISTORY_URL`:
    /// where a scaled-out gateway finds the services (`http://auth-api:9200`),
    /// to route the public API to them so clients use the gateway's address
    /// for everything. Unset (the embedded mode, or an ingress that routes),
    /// the gateway answers only its own paths.
    pub auth_api_url: Option<String>,
    pub chat_url: Option<String>,
    pub history_url: Option<String>,
    /// `UNHIDRA_TLS_CERT` and `UNHIDRA_TLS_KEY`: PEM files of a certificate
    /// chain and its private key; set, the port speaks TLS only (`https://`,
    /// `wss://`; HTTP/2 and HTTP/1.1 by ALPN). Both or neither. Unset, plain
    /// HTTP, for TLS ended at an ingress or proxy in front.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `UNHIDRA_TLS_RELOAD_SECS`: how often the TLS files are checked for a
    /// change; a changed pair is served from the next connection on (10).
    pub tls_reload_secs: u64,
    /// `UNHIDRA_SHUTDOWN_TIMEOUT_SECS`: how long shutdown waits for in-flight
    /// work (10).
    pub shutdown_timeout_secs: u64,
    /// `UNHIDRA_LOG_FORMAT`: `pretty` or `json`.
    pub log_format: LogFormat,
    /// `UNHIDRA_LOG`: a tracing filter such as `info` or `info,chat_service=debug`.
    pub log: String,
    /// `UNHIDRA_OTLP_ENDPOINT`: OTLP/HTTP collector for traces, such as
    /// `http://otel-collector:4318`. Unset, no traces are recorded.
    pub otlp_endpoint: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: None,
            data_dir: PathBuf::from("./data"),
            database_url: None,
            database_max_connections: 10,
            nats_url: None,
            bus_prefix: "unhidra".to_owned(),
            redis_url: None,
            stream_max_bytes: 256 * 1024 * 1024,
            bus_timeout_ms: 5_000,
            group_commit_linger_ms: 2,
            worker_threads: 0,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            http_header_timeout_secs: 10,
            http_request_timeout_secs: 30,
            http_max_concurrent_requests: 1024,
            http_body_limit_bytes: 1024 * 1024,
            auth_body_limit_bytes: 16 * 1024,
            limit_http_ip: per_minute(1200),
            limit_http_user: per_minute(1200),
            limit_login_ip: per_minute(5),
            limit_login_account: per_minute(10),
            limit_register_ip: per_minute(3),
            limit_register_account: NonZeroU32::new(3).map_or(Rate::Off, |n| Rate::Every {
                count: n,
                period: Duration::from_secs(3600),
            }),
            limit_refresh_ip: per_minute(30),
            limit_refresh_account: per_minute(30),
            ip_block_failures: 5,
            ip_block_window_secs: 900,
            ip_block_secs: 900,
            ip_block_long_failures: 10,
            ip_block_long_window_secs: 86_400,
            ip_block_long_secs: 86_400,
            smtp_url: None,
            mail_from: "Unhidra <no-reply@localhost>".to_owned(),
            public_url: "http://127.0.0.1:9000".to_owned(),
            registration: Registration::Open,
            email_verification: false,
            signing_key_secret: None,
            bootstrap_admin_email: None,
            bootstrap_admin_password: None,
            max_rooms_per_user: 1000,
            max_members_per_room: 10_000,
            lockout_failures: 5,
            lockout_secs: 60,
            lockout_max_secs: 3600,
            token_issuer: "unhidra".to_owned(),
            token_audience: "unhidra".to_owned(),
            access_token_ttl_secs: 900,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            password_hash_concurrency: 2,
            password_hash_queue: 64,
            password_hash_wait_ms: 2_000,
            max_frame_bytes: 64 * 1024,
            limit_ws_connect_ip: per_minute(60),
            ws_connections_per_user: 10,
            ws_connections_per_ip: 100,
            limit_ws_frames: Rate::new(100, Duration::from_secs(1)),
            limit_ws_bytes: Rate::new(1024 * 1024, Duration::from_secs(1)),
            limit_messages_user: Rate::new(50, Duration::from_secs(1)),
            outbound_queue: 256,
            resume_window: 5000,
            room_tail: 256,
            send_idempotency_secs: 3600,
            token_warning_secs: 60,
            ws_ping_secs: 25,
            ws_idle_timeout_secs: 60,
            drain_secs: 5,
            ws_read_buffer_bytes: 2048,
            ws_write_buffer_bytes: 4096,
            auth_api_url: None,
            chat_url: None,
            history_url: None,
            tls_cert: None,
            tls_key: None,
            tls_reload_secs: 10,
            shutdown_timeout_secs: 10,
            log_format: LogFormat::Pretty,
            log: "info".to_owned(),
            otlp_endpoint: None,
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file, unknown key or mistyped value; the message names it.
    #[error("configuration: {0}")]
    Parse(Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads the process environment (and `UNHIDRA_CONFIG`, if set).
    pub fn load() -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Ok(path) = std::env::var("UNHIDRA_CONFIG") {
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(figment.merge(Self::env()))
    }

    fn env() -> Env {
        // UNHIDRA_TEST_* belong to the test suite, UNHIDRA_CONFIG names the file.
        Env::prefixed("UNHIDRA_").filter(|key| key != "config" && !key.starts_with("test_"))
    }

    /// Extracts and validates a configuration from any figment.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Self = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        let prefix_ok = !self.bus_prefix.is_empty()
            && self
                .bus_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !prefix_ok {
            return invalid("bus_prefix must be non-empty ASCII letters, digits, '_' or '-'");
        }
        if !(1024..=MAX_FRAME_LIMIT).contains(&self.max_frame_bytes) {
            return invalid("max_frame_bytes must be between 1024 and 1048576");
        }
        if self.stream_max_bytes < 64 * 1024 {
            return invalid("stream_max_bytes must be at least 65536");
        }
        if self.http_header_timeout_secs == 0 || self.http_request_timeout_secs == 0 {
            return invalid(
                "http_header_timeout_secs and http_request_timeout_secs must be at least 1",
            );
        }
        if self.http_max_concurrent_requests == 0 {
            return invalid("http_max_concurrent_requests must be at least 1");
        }
        let body_ok = |size: usize| (1024..=64 * 1024 * 1024).contains(&size);
        if !body_ok(self.http_body_limit_bytes) || !body_ok(self.auth_body_limit_bytes) {
            return invalid(
                "http_body_limit_bytes and auth_body_limit_bytes must be between 1024 and 67108864",
            );
        }
        if self.lockout_secs == 0 || self.lockout_max_secs < self.lockout_secs {
            return invalid("lockout_secs must be at least 1 and at most lockout_max_secs");
        }
        let stage_ok =
            |failures: u32, window: u64, block: u64| failures == 0 || (window > 0 && block > 0);
        if !stage_ok(
            self.ip_block_failures,
            self.ip_block_window_secs,
            self.ip_block_secs,
        ) || !stage_ok(
            self.ip_block_long_failures,
            self.ip_block_long_window_secs,
            self.ip_block_long_secs,
        ) {
            return invalid("an IP block stage needs a window and a block of at least one second");
        }
        if !(self.public_url.starts_with("http://") || self.public_url.starts_with("https://")) {
            return invalid("public_url must be an http:// or https:// URL");
        }
        if let Some(url) = &self.smtp_url {
            let url = url.expose_secret();
            if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
                return invalid("smtp_url must start with smtp:// or smtps://");
            }
        }
        if self.bootstrap_admin_email.is_some() != self.bootstrap_admin_password.is_some() {
            return invalid(
                "set both bootstrap_admin_email and bootstrap_admin_password, or neither",
            );
        }
        if self.max_rooms_per_user == 0 || self.max_members_per_room == 0 {
            return invalid("max_rooms_per_user and max_members_per_room must be at least 1");
        }
        if self.ws_connections_per_user == 0 || self.ws_connections_per_ip == 0 {
            return invalid("ws_connections_per_user and ws_connections_per_ip must be at least 1");
        }
        if let Rate::Every { count, .. } = self.limit_ws_bytes {
            if (count.get() as usize) < self.max_frame_bytes {
                return invalid(
                    "limit_ws_bytes must allow at least max_frame_bytes per period, or be off",
                );
            }
        }
        let buffer_ok = |size: usize| (512..=1024 * 1024).contains(&size);
        if !buffer_ok(self.ws_read_buffer_bytes) || !buffer_ok(self.ws_write_buffer_bytes) {
            return invalid(
                "ws_read_buffer_bytes and ws_write_buffer_bytes must be between 512 and 1048576",
            );
        }
        if self.outbound_queue == 0 || self.password_hash_concurrency == 0 {
            return invalid("outbound_queue and password_hash_concurrency must be at least 1");
        }
        if self.drain_secs >= self.shutdown_timeout_secs {
            return invalid("drain_secs must be less than shutdown_timeout_secs");
        }
        if self.ws_ping_secs == 0 || self.ws_idle_timeout_secs <= self.ws_ping_secs {
            return invalid("ws_ping_secs must be at least 1 and less than ws_idle_timeout_secs");
        }
        if !(1..=100_000).contains(&self.resume_window) {
            return invalid("resume_window must be 1 to 100000");
        }
        if self.room_tail > 10_000 {
            return invalid("room_tail must be at most 10000");
        }
        for url in [&self.auth_api_url, &self.chat_url, &self.history_url]
            .into_iter()
            .flatten()
        {
            if !url.starts_with("http://") || url.len() <= "http://".len() {
                return invalid(
                    "auth_api_url, chat_url and history_url must be http:// URLs of the services",
                );
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("set both tls_cert and tls_key, or neither");
        }
        if self.tls_reload_secs == 0 {
            return invalid("tls_reload_secs must be at least 1");
        }
        if self.access_token_ttl_secs == 0 || self.refresh_token_ttl_secs == 0 {
            return invalid("token lifetimes must be at least one second");
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return invalid("otlp_endpoint must be an http:// or https:// URL");
            }
        }
        if self.group_commit_linger_ms > 100 {
            return invalid("group_commit_linger_ms must be at most 100");
        }
        if self.worker_threads > 1024 {
            return invalid("worker_threads must be at most 1024");
        }
        if self.database_max_connections == 0 {
            return invalid("database_max_connections must be at least 1");
        }
        if let Some(url) = &self.database_url {
            let url = url.expose_secret();
            if !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
            {
                return invalid("database_url must start with postgres:// or sqlite:");
            }
        }
        Ok(())
    }

    /// The listen address, or 127.0.0.1 with the service's default port.
    pub fn bind_or(&self, default_port: u16) -> SocketAddr {
        self.bind
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], default_port)))
    }

    /// The frame size beyond which the WebSocket layer itself refuses a
    /// frame and closes the connection.
    pub fn hard_frame_limit(&self) -> usize {
        self.max_frame_bytes
            .saturating_mul(HARD_FRAME_FACTOR)
            .min(MAX_FRAME_LIMIT)
    }

    pub fn bus_timeout(&self) -> Duration {
        Duration::from_millis(self.bus_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

/// Frames over `max_frame_bytes` get an error frame; frames over this many
/// times that (and never more than [`MAX_FRAME_LIMIT`]) close the connection.
const HARD_FRAME_FACTOR: usize = 32;
/// No WebSocket frame is ever read beyond this size.
pub const MAX_FRAME_LIMIT: usize = 1024 * 1024;

fn per_minute(count: u32) -> Rate {
    NonZeroU32::new(count).map_or(Rate::Off, Rate::per_minute)
}

fn ip_ranges<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    comma_list(deserializer)?
        .iter()
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!("`{item}` is not an IP address or CIDR range"))
                })
        })
        .collect()
}

fn comma_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        One(String),
        Many(Vec<String>),
    }
    let items = match List::deserialize(deserializer)? {
        List::One(s) => s.split(',').map(str::to_owned).collect(),
        List::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().trim_end_matches('/').to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(toml: &str) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    #[test]
    fn defaults_suit_the_embedded_mode() -> Result<(), ConfigError> {
        let config = with("")?;
        assert_eq!(config.bind_or(9000).to_string(), "127.0.0.1:9000");
        assert!(config.nats_url.is_none() && config.database_url.is_none());
        assert_eq!(config.max_frame_bytes, 65536);
        Ok(())
    }

    #[test]
    fn proxies_and_rates_are_read_as_written() -> Result<(), ConfigError> {
        let config = with(
            r#"
            trusted_proxies = "10.0.0.0/8, 192.0.2.7"
            limit_login_ip = "20/h"
            limit_http_user = "off"
            "#,
        )?;
        let proxies: Vec<String> = config
            .trusted_proxies
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(proxies, ["10.0.0.0/8", "192.0.2.7/32"]);
        assert_eq!(config.limit_login_ip.to_string(), "20/h");
        assert_eq!(config.limit_http_user, Rate::Off);
        assert_eq!(
            with("max_frame_bytes = 1048576")?.hard_frame_limit(),
            1048576
        );
        Ok(())
    }

    #[test]
    fn origins_are_a_comma_list() -> Result<(), ConfigError> {
        let config = with(r#"allowed_origins = "https://a.example/, https://b.example""#)?;
        assert_eq!(
            config.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        Ok(())
    }

    #[test]
    fn invalid_values_are_refused_with_the_field_named() {
        for (toml, field) in [
            ("max_frame_bytes = 12", "max_frame_bytes"),
            (r#"database_url = "mysql://x""#, "database_url"),
            ("no_such_setting = 1", "no_such_setting"),
            ("outbound_queue = \"many\"", "outbound_queue"),
            ("ws_read_buffer_bytes = 16", "ws_read_buffer_bytes"),
            ("max_frame_bytes = 2097152", "max_frame_bytes"),
            (r#"trusted_proxies = "10.0.0.0/33""#, "10.0.0.0/33"),
            (r#"limit_login_ip = "5 per minute""#, "5 per minute"),
            (r#"limit_ws_bytes = "100/s""#, "limit_ws_bytes"),
            (r#"tls_cert = "/etc/tls/tls.crt""#, "tls_key"),
            ("tls_reload_secs = 0", "tls_reload_secs"),
            (r#"chat_url = "chat:9300""#, "chat_url"),
            ("group_commit_linger_ms = 1000", "group_commit_linger_ms"),
            ("worker_threads = 5000", "worker_threads"),
            ("worker_threads = -1", "worker_threads"),
        ] {
            let err = with(toml).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(field), "{toml}: {err}");
        }
    }
}
