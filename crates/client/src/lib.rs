//! A typed Rust client of Unhidra: the HTTP calls (register, log in, rooms,
//! history) and the WebSocket connection (frames of the `unhidra.v1`
//! protocol) that an application makes. Depends on `unhidra-core` alone among
//! Unhidra's crates.

mod connection;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::json;
use unhidra_core::{
    error::ErrorBody,
    ids::{MessageId, RoomId, UserId},
    rooms::{Role, Visibility},
};

pub use crate::connection::{Connection, Receiver, Sender};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the request with its error body.
    #[error("{status}: {} ({})", body.error, body.message)]
    Refused { status: u16, body: ErrorBody },
    /// The server could not be reached, or the connection broke.
    #[error("transport: {0}")]
    Transport(String),
    /// The server answered something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A registered account.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Registered {
    pub user_id: UserId,
    pub email: String,
    pub display_name: String,
}

/// What a login returns.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: String,
    pub expires_in: u64,
    pub user_id: UserId,
}

/// A room as its member sees it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct RoomView {
    pub room_id: RoomId,
    pub name: String,
    pub visibility: Visibility,
    pub role: Role,
}

/// One stored message.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub message_id: MessageId,
    pub sender: UserId,
    pub body: String,
}

#[derive(Deserialize)]
struct Page {
    messages: Vec<StoredMessage>,
}

/// Where each part of a deployment answers: all at one base URL for the
/// all-in-one process (or one entry point), or each service at its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// auth-api: register, log in.
    pub auth: String,
    /// chat-service: rooms.
    pub chat: String,
    /// history-service: messages.
    pub history: String,
    /// gateway-service: `/ws` (and `/metrics` of the process holding the
    /// connections).
    pub gateway: String,
}

impl Endpoints {
    /// Everything at `base` (`http://host:port`).
    pub fn all_at(base: &str) -> Self {
        let base = base.trim_end_matches('/').to_owned();
        Self {
            auth: base.clone(),
            chat: base.clone(),
            history: base.clone(),
            gateway: base,
        }
    }
}

/// The HTTP APIs and the gateway of one Unhidra deployment.
#[derive(Debug, Clone)]
pub struct Client {
    endpoints: Endpoints,
    http: reqwest::Client,
}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

impl Client {
    /// Everything at `base` (`http://host:port`, or https).
    pub fn new(base: &str) -> Self {
        Self::with_endpoints(Endpoints::all_at(base))
    }

    pub fn with_endpoints(endpoints: Endpoints) -> Self {
        Self {
            endpoints,
            http: reqwest::Client::new(),
        }
    }

    /// Where this client reaches each API.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The WebSocket URL of this deployment's gateway.
    pub fn ws_url(&self) -> String {
        let base = &self.endpoints.gateway;
        let rest = base
            .strip_prefix("https://")
            .map(|r| format!("wss://{r}"))
            .or_else(|| base.strip_prefix("http://").map(|r| format!("ws://{r}")))
            .unwrap_or_else(|| base.clone());
        format!("{rest}/ws")
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> Result<T> {
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
        } else {
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                error: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            });
            Err(ClientError::Refused {
                status: status.as_u16(),
                body,
            })
        }
    }

    fn post(&self, base: &str, path: &str, body: &impl Serialize) -> reqwest::RequestBuilder {
        self.http.post(format!("{base}{path}")).json(body)
    }

    pub async fn register(
        &self,
        email: &str,
        password: &str,
        display_name: &str,
    ) -> Result<Registered> {
        let body = json!({"email": email, "password": password, "display_name": display_name});
        let auth = &self.endpoints.auth;
        self.call(self.post(auth, "/api/v1/auth/register", &body), None)
            .await
    }

    pub async fn login(&self, email: &str, password: &str) -> Result<Tokens> {
        let body = json!({"email": email, "password": password});
        let auth = &self.endpoints.auth;
        self.call(self.post(auth, "/api/v1/auth/login", &body), None)
            .await
    }

    pub async fn create_room(
        &self,
        token: &str,
        name: &str,
        visibility: Visibility,
    ) -> Result<RoomView> {
        let body = json!({"name": name, "visibility": visibility});
        let chat = &self.endpoints.chat;
        self.call(self.post(chat, "/api/v1/rooms", &body), Some(token))
            .await
    }

    pub async fn join(&self, token: &str, room: RoomId) -> Result<RoomView> {
        let path = format!("/api/v1/rooms/{room}/join");
        let chat = &self.endpoints.chat;
        self.call(self.post(chat, &path, &json!({})), Some(token))
            .await
    }

    /// Up to `limit` messages with a sequence below `before`, newest first.
    pub async fn history(
        &self,
        token: &str,
        room: RoomId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>> {
        let mut url = format!(
            "{}/api/v1/rooms/{room}/messages?limit={limit}",
            self.endpoints.history
        );
        if let Some(before) = before {
            url.push_str(&format!("&before={before}"));
        }
        let page: Page = self.call(self.http.get(url), Some(token)).await?;
        Ok(page.messages)
    }

    /// The Prometheus exposition at the gateway's `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        let response = self
            .http
            .get(format!("{}/metrics", self.endpoints.gateway))
            .send()
            .await
            .map_err(transport)?;
        response.text().await.map_err(transport)
    }

    /// Opens a WebSocket as the owner of `token`.
    pub async fn connect(&self, token: &str) -> Result<Connection> {
        Connection::open(&self.ws_url(), Some(token)).await
    }
}
