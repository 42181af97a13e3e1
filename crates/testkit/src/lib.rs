//! Test support: finds the NATS, Redis and Postgres servers the integration
//! tests need (addresses from `UNHIDRA_TEST_NATS_URL`, `UNHIDRA_TEST_REDIS_URL`
//! and `UNHIDRA_TEST_POSTGRES_URL`, with loopback defaults), and gives each test isolated data: its own database and
//! its own bus prefix. Outside CI a missing server skips the test with a message
//! saying why; with `CI=true` it fails the test. [`on_each_database`] runs one
//! repository suite on SQLite and on Postgres.

use std::{panic::AssertUnwindSafe, time::Duration};

use futures::FutureExt;
use sqlx::{Connection, Executor, PgConnection};

/// Whether the suite runs under CI, where every service is required.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports a missing service: panics under CI, otherwise prints why the test is
/// skipped.
fn missing(service: &str, url: &str, why: &str) {
    assert!(
        !in_ci(),
        "{service} is required under CI=true but is not usable at {url}: {why}"
    );
    eprintln!("SKIPPED: {service} not usable at {url} ({why}); set CI=true to make this a failure");
}

async fn reachable(url: &str) -> Result<(), String> {
    let host_port = host_port(url);
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(&host_port),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".to_owned()),
    }
}

/// The NATS URL, if a server answers there. The first call of a test
/// process also deletes the streams tests left over an hour ago (every
/// stream reserves its `max_bytes` of JetStream storage).
pub async fn nats_url() -> Option<String> {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let url = std::env::var("UNHIDRA_TEST_NATS_URL")
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    match reachable(&url).await {
        Ok(()) => {
            SWEPT.get_or_init(|| sweep_stale_streams(&url)).await;
            Some(url)
        }
        Err(why) => {
            missing("NATS", &url, &why);
            None
        }
    }
}

/// Deletes the streams of test prefixes ([`unique_prefix`], and the
/// deployment check's `check...`) created over an hour ago.
async fn sweep_stale_streams(url: &str) {
    use futures::StreamExt;
    let Ok(client) = async_nats::connect(url).await else {
        return;
    };
    let jetstream = async_nats::jetstream::new(client);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let mut stale = Vec::new();
    let mut streams = jetstream.streams();
    while let Some(Ok(info)) = streams.next().await {
        let name = &info.config.name;
        let prefix = name.split('_').next().unwrap_or_default();
        let test_prefix = (prefix.len() == 13
            && prefix.starts_with('T')
            && prefix[1..].chars().all(|c| c.is_ascii_hexdigit()))
            || prefix.starts_with("CHECK");
        if test_prefix && info.created.unix_timestamp() + 3600 < now {
            stale.push(name.clone());
        }
    }
    for name in stale {
        let _ = jetstream.delete_stream(&name).await;
    }
}

/// The Redis URL, if a server answers there (`UNHIDRA_TEST_REDIS_URL`).
pub async fn redis_url() -> Option<String> {
    let url = std::env::var("UNHIDRA_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    match reachable(&url).await {
        Ok(()) => Some(url),
        Err(why) => {
            missing("Redis", &url, &why);
            None
        }
    }
}

/// The default configuration with every rate limit off and the connection
/// caps out of the way: for tests about something else, which register and
/// connect many users from one address.
pub fn config() -> unhidra_core::Config {
    use unhidra_core::rate::Rate;
    unhidra_core::Config {
        limit_http_ip: Rate::Off,
        limit_http_user: Rate::Off,
        limit_login_ip: Rate::Off,
        limit_login_account: Rate::Off,
        limit_register_ip: Rate::Off,
        limit_refresh_ip: Rate::Off,
        limit_register_account: Rate::Off,
        limit_refresh_account: Rate::Off,
        limit_ws_connect_ip: Rate::Off,
        limit_ws_frames: Rate::Off,
        limit_ws_bytes: Rate::Off,
        limit_messages_user: Rate::Off,
        ws_connections_per_user: usize::MAX,
        ws_connections_per_ip: usize::MAX,
        ip_block_failures: 0,
        ip_block_long_failures: 0,
        lockout_failures: 0,
        // Every stream reserves this on the shared NATS; tests need little.
        stream_max_bytes: 8 * 1024 * 1024,
        // Stopping a test's gateway should not take long.
        drain_secs: 1,
        ..unhidra_core::Config::default()
    }
}

/// A bus prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A database that belongs to one test.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    backend: &'static str,
    /// Postgres: the administrator's URL and the database's name.
    admin: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// A fresh SQLite file in a temporary directory.
    pub async fn sqlite() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
        Ok(Self {
            url,
            backend: "sqlite",
            admin: None,
            _dir: Some(dir),
        })
    }

    /// A freshly created Postgres database with a random name, if Postgres
    /// answers. Test databases left by runs over an hour old are dropped.
    pub async fn postgres() -> anyhow::Result<Option<Self>> {
        let admin = std::env::var("UNHIDRA_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let mut conn = match PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(e) => {
                missing("Postgres", &admin, &e.to_string());
                return Ok(None);
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let hour_ago = now - 3600;
        let databases = "SELECT datname FROM pg_database WHERE datname LIKE 'unhidra_test_%'";
        drop_stale(&mut conn, databases, "DATABASE", hour_ago).await?;
        // Their roles (see `role`), now that nothing they own is left.
        let roles = "SELECT rolname FROM pg_roles WHERE rolname LIKE 'unhidra_test_%'";
        drop_stale(&mut conn, roles, "ROLE", hour_ago).await?;
        let name = format!(
            "unhidra_test_{now}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        conn.execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await?;
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        Ok(Some(Self {
            url: format!("{base}/{name}"),
            backend: "postgres",
            admin: Some((admin.clone(), name)),
            _dir: None,
        }))
    }

    /// The URL of a login role of this database's own, as a deployment gives
    /// each service: on Postgres the role owns a schema of its name (where its
    /// tables go, by the default `search_path` of `"$user", public`) and may
    /// use no other; on SQLite, the same file.
    pub async fn role(&self, service: &str) -> anyhow::Result<String> {
        let Some((admin, database)) = &self.admin else {
            return Ok(self.url.clone());
        };
        let role = format!("{database}_{}", service.replace('-', "_"));
        let mut conn = PgConnection::connect(admin).await?;
        conn.execute(format!("CREATE ROLE \"{role}\" LOGIN").as_str())
            .await?;
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        let mut conn = PgConnection::connect(&format!("{base}/{database}")).await?;
        conn.execute(
            format!(
                "REVOKE ALL ON SCHEMA public FROM PUBLIC;
                 CREATE SCHEMA \"{role}\" AUTHORIZATION \"{role}\""
            )
            .as_str(),
        )
        .await?;
        let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        Ok(format!("{scheme}://{role}@{host}/{database}"))
    }
}

/// Drops (`DROP <kind> ... IF EXISTS`) what `names` (a query of one name
/// column) lists of test objects created before `time`; failures are left
/// for the next run.
async fn drop_stale(
    conn: &mut PgConnection,
    names: &str,
    kind: &str,
    time: u64,
) -> anyhow::Result<()> {
    let stale: Vec<String> = sqlx::query_scalar(names).fetch_all(&mut *conn).await?;
    let force = if kind == "DATABASE" {
        " WITH (FORCE)"
    } else {
        ""
    };
    for name in stale.into_iter().filter(|name| created_before(name, time)) {
        let _ = conn
            .execute(format!("DROP {kind} IF EXISTS \"{name}\"{force}").as_str())
            .await;
    }
    Ok(())
}

/// Whether a test database or role (`unhidra_test_<unix secs>_...`) was
/// created before `time`.
fn created_before(name: &str, time: u64) -> bool {
    name.split('_')
        .nth(2)
        .and_then(|s| s.parse::<u64>().ok())
        .is_some_and(|created| created < time)
}

/// Runs `suite` on a fresh SQLite database, then on a fresh Postgres database
/// (skipped outside CI when Postgres does not answer). A failure, returned or
/// panicked, names the backend it happened on.
pub async fn on_each_database<F, Fut>(suite: F) -> anyhow::Result<()>
where
    F: Fn(TestDatabase) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut databases = vec![TestDatabase::sqlite().await?];
    databases.extend(TestDatabase::postgres().await?);
    for db in databases {
        let backend = db.backend();
        match AssertUnwindSafe(suite(db)).catch_unwind().await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context(format!("on {backend}"))),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                panic!("on {backend}: {message}");
            }
        }
    }
    Ok(())
}

/// A TCP proxy in front of a server, which a test can cut (dropping every
/// connection and refusing new ones) and restore, to play an outage.
#[derive(Debug)]
pub struct Proxy {
    pub address: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Proxies `upstream` (`host:port`) from a fresh loopback port.
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        use std::sync::{
            Arc, Mutex,
            atomic::{AtomicBool, Ordering},
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let upstream = upstream.to_owned();
        let accept = {
            let (open, connections) = (Arc::clone(&open), Arc::clone(&connections));
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue;
                    }
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    if let Ok(mut list) = connections.lock() {
                        list.push(task.abort_handle());
                    }
                }
            })
        };
        Ok(Self {
            address,
            open,
            connections,
            accept,
        })
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut list) = self.connections.lock() {
            for connection in list.drain(..) {
                connection.abort();
            }
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// `host:port` of a URL such as `nats://127.0.0.1:4222` or
/// `postgres://user@host:5432/db`.
pub fn host_port(url: &str) -> String {
    url.split("://")
        .nth(1)
        .unwrap_or(url)
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A nats-server of a test's own (to configure users, or to look at its
/// subscriptions), on a free loopback port with JetStream in a temporary
/// directory and monitoring on another; killed on drop.
/// The binary is `UNHIDRA_TEST_NATS_SERVER`, else `nats-server` on the PATH or
/// in /usr/sbin.
pub struct NatsServer {
    port: u16,
    monitor_port: u16,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server whose configuration is `config` (without `listen` or
    /// `jetstream`, which are added) with `env` in its environment. `None`
    /// (the test skipped) outside CI when there is no nats-server binary.
    pub async fn start(config: &str, env: &[(String, String)]) -> anyhow::Result<Option<Self>> {
        let binary = std::env::var("UNHIDRA_TEST_NATS_SERVER").ok().or_else(|| {
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .chain(["/usr/sbin".into()])
                .map(|dir| dir.join("nats-server"))
                .find(|path| path.is_file())
                .map(|path| path.display().to_string())
        });
        let Some(binary) = binary else {
            missing(
                "nats-server",
                "UNHIDRA_TEST_NATS_SERVER or the PATH",
                "no binary",
            );
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let free_port = || -> std::io::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (port, monitor_port) = (free_port()?, free_port()?);
        let file = dir.path().join("nats.conf");
        std::fs::write(
            &file,
            format!(
                "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor_port}\"\n\
                 jetstream {{ store_dir: \"{}\" }}\n{config}",
                dir.path().join("js").display()
            ),
        )?;
        let child = std::process::Command::new(&binary)
            .arg("-c")
            .arg(&file)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("nats.log"))?)
            .spawn()?;
        let mut server = Self {
            port,
            monitor_port,
            child,
            dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while reachable(&server.url()).await.is_err() {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("nats-server exited ({status}): {}", server.log()?);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Some(server))
    }

    /// What it logged so far (refusals among it).
    pub fn log(&self) -> std::io::Result<String> {
        let log = std::fs::read(self.dir.path().join("nats.log"))?;
        Ok(String::from_utf8_lossy(&log).into_owned())
    }

    /// Its monitoring endpoint (`/connz?subs=1` lists every subscription).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Its URL, without credentials.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its URL with a user's credentials.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[should_panic(expected = "on sqlite: assertion `left == right` failed: rows differ")]
    async fn a_failed_assertion_names_the_backend() {
        let _ = on_each_database(|db| async move {
            assert_eq!(db.backend(), "postgres", "rows differ");
            Ok(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_returned_error_names_the_backend() {
        let outcome = on_each_database(|_| async { anyhow::bail!("no such table") }).await;
        let message = outcome.err().map(|e| format!("{e:#}"));
        assert_eq!(message.as_deref(), Some("on sqlite: no such table"));
    }
}
