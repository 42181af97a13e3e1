//! Typed configuration, read from `UNHIDRA_*` environment variables over an
//! optional TOML file named by `UNHIDRA_CONFIG`. Every field has a default that
//! suits the embedded mode; `Config::load` refuses anything invalid at start-up.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

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
    /// `UNHIDRA_BUS_TIMEOUT_MS`: how long a service waits for another's reply (5000).
    pub bus_timeout_ms: u64,
    /// `UNHIDRA_ALLOWED_ORIGINS`: comma-separated browser origins allowed to open
    /// WebSockets. Same-origin requests and clients that send no `Origin` are
    /// always allowed; `*` allows every origin.
    #[serde(deserialize_with = "comma_list")]
    pub allowed_origins: Vec<String>,
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
    /// `UNHIDRA_MAX_FRAME_BYTES`: largest WebSocket frame the gateway processes
    /// (65536). Larger frames get a `too_large` error; frames over 32 times this
    /// close the connection with 1009.
    pub max_frame_bytes: usize,
    /// `UNHIDRA_OUTBOUND_QUEUE`: frames queued per connection before it is
    /// closed as a slow consumer (256).
    pub outbound_queue: usize,
    /// `UNHIDRA_WS_READ_BUFFER_BYTES`: how much a WebSocket reads from its
    /// socket at a time (4096). Kept small so an idle connection costs little;
    /// larger frames still arrive whole.
    pub ws_read_buffer_bytes: usize,
    /// `UNHIDRA_WS_WRITE_BUFFER_BYTES`: frames are gathered up to this many
    /// bytes before a write to the socket (4096).
    pub ws_write_buffer_bytes: usize,
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
            bus_timeout_ms: 5_000,
            allowed_origins: Vec::new(),
            token_issuer: "unhidra".to_owned(),
            token_audience: "unhidra".to_owned(),
            access_token_ttl_secs: 900,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            password_hash_concurrency: 2,
            max_frame_bytes: 64 * 1024,
            outbound_queue: 256,
            ws_read_buffer_bytes: 4096,
            ws_write_buffer_bytes: 4096,
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
        if !(1024..=16 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return invalid("max_frame_bytes must be between 1024 and 16777216");
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
        if self.access_token_ttl_secs == 0 || self.refresh_token_ttl_secs == 0 {
            return invalid("token lifetimes must be at least one second");
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return invalid("otlp_endpoint must be an http:// or https:// URL");
            }
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

    pub fn bus_timeout(&self) -> Duration {
        Duration::from_millis(self.bus_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
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
        ] {
            let err = with(toml).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(field), "{toml}: {err}");
        }
    }
}
