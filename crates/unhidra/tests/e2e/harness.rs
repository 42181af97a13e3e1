//! Starts stacks on port 0 with isolated data, and speaks to them as a client
//! would: JSON over HTTP, JSON frames over a WebSocket.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue},
};
use tokio_util::sync::CancellationToken;
use unhidra_core::{Config, bus_access::Role};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub const WAIT: Duration = Duration::from_secs(10);

/// One running service (or the all-in-one process).
pub struct Running {
    pub address: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn start<F, Fut>(config: Config, run: F) -> Result<Self, Error>
    where
        F: FnOnce(TcpListener, Config, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), config, run).await
    }

    /// On `address`: a service restarted where the gateway expects it.
    pub async fn start_at<F, Fut>(
        address: SocketAddr,
        config: Config,
        run: F,
    ) -> Result<Self, Error>
    where
        F: FnOnce(TcpListener, Config, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let handle = tokio::spawn(run(
            listener,
            config,
            Box::pin(async move { signal.cancelled().await }),
        ));
        Ok(Self {
            address,
            stop,
            handle,
        })
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn ws(&self) -> String {
        format!("ws://{}/ws", self.address)
    }

    /// Waits until `/readyz` answers 200; if the service stopped instead, its
    /// error.
    pub async fn ready(&mut self) -> TestResult {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.handle.is_finished() {
                let outcome = (&mut self.handle).await?;
                return Err(format!("{} stopped: {outcome:?}", self.http()).into());
            }
            match get(&format!("{}/readyz", self.http()), None).await {
                Ok((status, _)) if status.is_success() => return Ok(()),
                last if tokio::time::Instant::now() > deadline => {
                    return Err(format!("{} never became ready: {last:?}", self.http()).into());
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Shuts it down and waits until it has stopped.
    pub async fn stop(self) -> Result<(), Error> {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.handle).await???;
        Ok(())
    }
}

/// Every service in one process with SQLite in a temporary directory, or
/// with the Postgres database `database_url` names.
pub struct Embedded {
    pub app: Running,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    _dir: tempfile::TempDir,
}

/// Where a test's embedded stack keeps its data: `None` for SQLite files
/// (the default), or a fresh Postgres database.
pub type Store = Option<std::sync::Arc<unhidra_testkit::TestDatabase>>;

/// `config` keeping its data in `store`.
pub fn on(store: &Store, config: Config) -> Config {
    Config {
        database_url: store.as_ref().map(|db| db.url().to_owned().into()),
        ..config
    }
}

/// Runs `test` on SQLite, then on a fresh Postgres database (skipped outside
/// CI when Postgres does not answer; a failure under CI).
pub async fn on_each_store<F, Fut>(test: F) -> TestResult
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = TestResult>,
{
    test(None).await.map_err(|e| format!("on SQLite: {e}"))?;
    if let Some(db) = unhidra_testkit::TestDatabase::postgres().await? {
        test(Some(std::sync::Arc::new(db)))
            .await
            .map_err(|e| format!("on Postgres: {e}"))?;
    }
    Ok(())
}

impl Embedded {
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(unhidra_testkit::config()).await
    }

    pub async fn start_with(config: Config) -> Result<Self, Error> {
        let clock = std::sync::Arc::new(unhidra_core::clock::SystemClock);
        Self::start_on_clock(config, clock).await
    }

    /// On a clock the test moves.
    pub async fn start_on_clock(
        config: Config,
        clock: unhidra_core::clock::SharedClock,
    ) -> Result<Self, Error> {
        let dir = tempfile::tempdir()?;
        let database_url = config
            .database_url
            .as_ref()
            .map(|url| secrecy::ExposeSecret::expose_secret(url).to_owned());
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..config
        };
        let run = move |listener, config, shutdown| {
            unhidra::run_on_clock(listener, config, clock, shutdown)
        };
        let app = Running::start(config, run).await?;
        Ok(Self {
            app,
            data_dir: dir.path().to_path_buf(),
            database_url,
            _dir: dir,
        })
    }

    pub fn api(&self) -> Api {
        Api {
            auth: self.app.http(),
            chat: self.app.http(),
            history: self.app.http(),
        }
    }
}

/// Where each HTTP API lives.
#[derive(Clone)]
pub struct Api {
    pub auth: String,
    pub chat: String,
    pub history: String,
}

/// A logged-in user.
#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub token: String,
}

pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

pub async fn post(
    url: &str,
    token: Option<&str>,
    body: Value,
) -> Result<(StatusCode, Value), Error> {
    let mut request = http().post(url).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

pub async fn get(url: &str, token: Option<&str>) -> Result<(StatusCode, Value), Error> {
    let mut request = http().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

pub fn unique_email(name: &str) -> String {
    format!("{name}-{}@example.com", uuid::Uuid::new_v4().simple())
}

impl Api {
    /// Registers a fresh user and logs in.
    pub async fn user(&self, name: &str) -> Result<User, Error> {
        let email = unique_email(name);
        let password = "correct horse battery";
        let (status, body) = post(
            &format!("{}/api/v1/auth/register", self.auth),
            None,
            json!({"email": email, "password": password, "display_name": name}),
        )
        .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, login) = post(
            &format!("{}/api/v1/auth/login", self.auth),
            None,
            json!({"email": email, "password": password}),
        )
        .await?;
        assert_eq!(status, StatusCode::OK, "{login}");
        assert_eq!(login["token_type"], "Bearer");
        assert!(
            login["expires_in"].as_u64().is_some_and(|s| s > 0),
            "{login}"
        );
        assert_eq!(login["user_id"], body["user_id"]);
        Ok(User {
            id: str_of(&body, "user_id")?,
            token: str_of(&login, "access_token")?,
        })
    }

    pub async fn create_room(&self, owner: &User, visibility: &str) -> Result<String, Error> {
        let (status, body) = post(
            &format!("{}/api/v1/rooms", self.chat),
            Some(&owner.token),
            json!({"name": "general", "visibility": visibility}),
        )
        .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["role"], "owner");
        str_of(&body, "room_id")
    }

    pub async fn join(&self, user: &User, room: &str) -> Result<(StatusCode, Value), Error> {
        post(
            &format!("{}/api/v1/rooms/{room}/join", self.chat),
            Some(&user.token),
            json!({}),
        )
        .await
    }

    pub async fn history(
        &self,
        user: &User,
        room: &str,
        query: &str,
    ) -> Result<(StatusCode, Value), Error> {
        get(
            &format!("{}/api/v1/rooms/{room}/messages{query}", self.history),
            Some(&user.token),
        )
        .await
    }
}

pub fn str_of(value: &Value, field: &str) -> Result<String, Error> {
    value[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no string `{field}` in {value}").into())
}

pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket handshake with the token in the subprotocol header, as a
/// browser sends it.
pub fn handshake(
    ws_url: &str,
    token: &str,
) -> Result<tungstenite::handshake::client::Request, Error> {
    let mut request = ws_url.into_client_request()?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("unhidra.v1, bearer.{token}"))?,
    );
    Ok(request)
}

/// Opens a WebSocket with the token in the subprotocol header.
pub async fn connect(ws_url: &str, token: &str) -> Result<Socket, Error> {
    let (socket, response) = connect_async(handshake(ws_url, token)?).await?;
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"unhidra.v1"[..])
    );
    Ok(socket)
}

/// The HTTP status and body a refused WebSocket handshake got.
pub async fn refused(
    request: tungstenite::handshake::client::Request,
) -> Result<(u16, Value), Error> {
    match connect_async(request).await {
        Ok(_) => Err("the handshake was accepted".into()),
        Err(tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Ok((response.status().as_u16(), body))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn send(socket: &mut Socket, frame: Value) -> Result<(), Error> {
    socket.send(Message::text(frame.to_string())).await?;
    Ok(())
}

/// The next JSON frame (control frames skipped).
pub async fn next_frame(socket: &mut Socket) -> Result<Value, Error> {
    next_frame_within(socket, WAIT).await
}

/// The next text frame, waiting at most `wait` for each message.
pub async fn next_frame_within(socket: &mut Socket, wait: Duration) -> Result<Value, Error> {
    loop {
        let message = tokio::time::timeout(wait, socket.next())
            .await?
            .ok_or("connection closed")??;
        match message {
            Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
            Message::Close(frame) => return Err(format!("closed: {frame:?}").into()),
            _ => {}
        }
    }
}

/// The next frame of `type` (others, such as the user's own messages, skipped).
pub async fn next_of(socket: &mut Socket, kind: &str) -> Result<Value, Error> {
    loop {
        let frame = next_frame(socket).await?;
        if frame["type"] == kind {
            return Ok(frame);
        }
    }
}

/// The first page of a room's history once it holds `count` messages.
pub async fn wait_for_history(
    api: &Api,
    user: &User,
    room: &str,
    count: usize,
) -> Result<Value, Error> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, page) = api.history(user, room, "?limit=200").await?;
        assert_eq!(status, StatusCode::OK, "{page}");
        if page["messages"]
            .as_array()
            .is_some_and(|m| m.len() == count)
        {
            return Ok(page);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("history never reached {count} messages: {page}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `{base}/readyz` until it answers 200.
pub async fn wait_ready(base: &str) -> TestResult {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match get(&format!("{base}/readyz"), None).await {
            Ok((status, _)) if status.is_success() => return Ok(()),
            _ if tokio::time::Instant::now() > deadline => {
                return Err(format!("{base} never became ready").into());
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Every message of a room, paging back from the newest.
pub async fn all_history(api: &Api, user: &User, room: &str) -> Result<Vec<Value>, Error> {
    let mut all = Vec::new();
    let mut before = String::new();
    loop {
        let (status, page) = api
            .history(user, room, &format!("?limit=200{before}"))
            .await?;
        if !status.is_success() {
            return Err(format!("history answered {status}: {page}").into());
        }
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        let Some(last) = messages.last() else {
            return Ok(all);
        };
        before = format!("&before={}", last["seq"]);
        all.extend(messages);
    }
}

/// Every message of a room once history holds at least `count`; fails
/// after `wait` naming how many it had.
pub async fn history_of_at_least(
    api: &Api,
    user: &User,
    room: &str,
    count: usize,
    wait: Duration,
) -> Result<Vec<Value>, Error> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Refusals meanwhile (an overloaded server's 503) are retried.
        let stored = all_history(api, user, room).await;
        match stored {
            Ok(stored) if stored.len() >= count => return Ok(stored),
            Ok(stored) if tokio::time::Instant::now() > deadline => {
                return Err(format!("history has {} of {count}", stored.len()).into());
            }
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The five services, each started with `run` as its own binary would;
/// optionally more chat-service and gateway instances beside the first.
pub struct Scaled {
    pub config: Config,
    pub gateway: Running,
    pub auth: Running,
    pub chat: Running,
    pub more_chats: Vec<Running>,
    pub more_gateways: Vec<Running>,
    /// None while a test has it stopped.
    pub history: Option<Running>,
    pub audit: Running,
    pub db: unhidra_testkit::TestDatabase,
}

impl Scaled {
    /// None (test skipped) outside CI when NATS or Postgres is missing.
    pub async fn start() -> Result<Option<Self>, Error> {
        Self::start_with(false, 1, 1).await
    }

    /// With `chats` chat-service and `gateways` gateway instances, on Postgres
    /// or (`sqlite`) on one SQLite file every service shares.
    pub async fn start_with(
        sqlite: bool,
        chats: usize,
        gateways: usize,
    ) -> Result<Option<Self>, Error> {
        Self::start_configured(unhidra_testkit::config(), sqlite, chats, gateways).await
    }

    /// [`Scaled::start_with`] on `base` (its bus and database settings are
    /// replaced).
    pub async fn start_configured(
        base: Config,
        sqlite: bool,
        chats: usize,
        gateways: usize,
    ) -> Result<Option<Self>, Error> {
        let Some(nats) = unhidra_testkit::nats_url().await else {
            return Ok(None);
        };
        let db = if sqlite {
            unhidra_testkit::TestDatabase::sqlite().await?
        } else {
            let Some(db) = unhidra_testkit::TestDatabase::postgres().await? else {
                return Ok(None);
            };
            db
        };
        let config = Config {
            nats_url: Some(nats.into()),
            database_url: Some(db.url().to_owned().into()),
            bus_prefix: unhidra_testkit::unique_prefix(),
            ..base
        };
        Self::start_on(config, db, |_, config| config, chats, gateways)
            .await
            .map(Some)
    }

    /// The stack on `db`, each service with the configuration `configure`
    /// makes of `config` for it (its own credentials, say).
    pub async fn start_on(
        config: Config,
        db: unhidra_testkit::TestDatabase,
        configure: impl Fn(Role, Config) -> Config,
        chats: usize,
        gateways: usize,
    ) -> Result<Self, Error> {
        let start = |role: Role, config: &Config| configure(role, config.clone());
        // auth-api and chat-service answer the others' requests, so they go first.
        let mut auth = Running::start(start(Role::AuthApi, &config), auth_api::run).await?;
        let mut chat = Running::start(start(Role::Chat, &config), chat_service::run).await?;
        let mut history =
            Running::start(start(Role::History, &config), history_service::run).await?;
        let mut audit = Running::start(start(Role::Audit, &config), audit_service::run).await?;
        // The gateways are the one public entry point: the API goes through
        // them to the services, as in the compose and Helm deployments.
        let config = Config {
            auth_api_url: Some(auth.http()),
            chat_url: Some(chat.http()),
            history_url: Some(history.http()),
            ..config
        };
        let gateway_config = start(Role::Gateway, &config);
        let mut gateway = Running::start(gateway_config.clone(), gateway_service::run).await?;
        let mut more_chats = Vec::new();
        for _ in 1..chats {
            more_chats.push(Running::start(start(Role::Chat, &config), chat_service::run).await?);
        }
        let mut more_gateways = Vec::new();
        for _ in 1..gateways {
            more_gateways.push(Running::start(gateway_config.clone(), gateway_service::run).await?);
        }
        for service in [&mut auth, &mut chat, &mut history, &mut audit, &mut gateway]
            .into_iter()
            .chain(&mut more_chats)
            .chain(&mut more_gateways)
        {
            service.ready().await?;
        }
        Ok(Self {
            config,
            gateway,
            auth,
            chat,
            more_chats,
            more_gateways,
            history: Some(history),
            audit,
            db,
        })
    }

    /// The API through the gateway, as clients see it.
    pub fn api(&self) -> Api {
        Api {
            auth: self.gateway.http(),
            chat: self.gateway.http(),
            history: self.gateway.http(),
        }
    }

    /// The WebSocket URL of every gateway instance.
    pub fn gateway_urls(&self) -> Vec<String> {
        std::iter::once(&self.gateway)
            .chain(&self.more_gateways)
            .map(Running::ws)
            .collect()
    }

    pub async fn stop(self) -> TestResult {
        let services = [
            Some(self.gateway),
            self.history,
            Some(self.audit),
            Some(self.chat),
            Some(self.auth),
        ];
        for service in self
            .more_gateways
            .into_iter()
            .chain(self.more_chats)
            .map(Some)
            .chain(services)
            .flatten()
        {
            service.stop().await?;
        }
        Ok(())
    }
}

/// The audit events of `kind` the embedded audit service stored (detail,
/// subject, actor and the request's origin), once there are at least `count`.
pub async fn wait_for_audit(
    stack: &Embedded,
    kind: &str,
    count: usize,
) -> Result<Vec<Value>, Error> {
    let url = match &stack.database_url {
        Some(url) => url.clone(),
        None => unhidra_store::sqlite_url(&stack.data_dir, audit_service::NAME),
    };
    let pool = unhidra_store::Database::connect(&url, 1).await?.pool;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        type Row = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT detail, subject, actor, client_ip, user_agent, request_id FROM audit_events
             WHERE kind = $1 ORDER BY occurred_at, recorded_at",
        )
        .bind(kind)
        .fetch_all(&pool)
        .await?;
        let found = rows.len();
        if found >= count {
            return rows
                .into_iter()
                .map(
                    |(detail, subject, actor, client_ip, user_agent, request_id)| {
                        Ok(json!({
                            "detail": serde_json::from_str::<Value>(&detail)?,
                            "subject": subject,
                            "actor": actor,
                            "client_ip": client_ip,
                            "user_agent": user_agent,
                            "request_id": request_id,
                        }))
                    },
                )
                .collect();
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{found} of {count} {kind} audit events").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The close frame a socket gets, and how long after `since` it came.
pub async fn closed(
    socket: &mut Socket,
    since: std::time::Instant,
) -> Result<(tungstenite::protocol::frame::coding::CloseCode, Duration), Error> {
    loop {
        match tokio::time::timeout(WAIT, socket.next()).await? {
            Some(Ok(Message::Close(Some(frame)))) => return Ok((frame.code, since.elapsed())),
            Some(Ok(_)) => {}
            other => return Err(format!("no close frame: {other:?}").into()),
        }
    }
}
