//! What a scenario runs against: Unhidra (users registered and logged in,
//! rooms created and joined over HTTP, connections authenticated) or the
//! built-in relay (rooms named in the connection URL, no accounts).

use std::net::IpAddr;

use anyhow::Context;
use unhidra_client::{Client, Connection};
use unhidra_core::{ids::RoomId, rooms::Visibility};

use crate::local::cpu_seconds_of;

/// Who a connection is: its token (Unhidra) and its rooms.
#[derive(Debug, Clone)]
pub struct Identity {
    token: Option<String>,
    rooms: Vec<RoomId>,
}

/// The rooms of a scenario, and per room a sender and a subscriber identity,
/// each a member of that room only (every member connection receives the
/// room's messages, so senders are kept out of other rooms); with
/// [`Target::add_senders`], more senders after the rooms' own.
pub struct Setup {
    pub rooms: Vec<RoomId>,
    pub senders: Vec<Identity>,
    pub subscribers: Vec<Identity>,
}

pub enum Target {
    Unhidra {
        client: Client,
        /// The other services named with `--cpu-of`, whose metrics count
        /// as the server's too.
        services: Vec<Client>,
        /// The server's processes when they run on this machine: the
        /// gateway's, and scaled out those of the other services as named.
        pids: Vec<u32>,
    },
    Relay {
        ws_url: String,
        pid: u32,
    },
}

const PASSWORD: &str = "loadgen password 1";

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Unhidra { .. } => "unhidra",
            Self::Relay { .. } => "relay",
        }
    }

    pub async fn prepare(&self, rooms: usize) -> anyhow::Result<Setup> {
        let mut setup = Setup {
            rooms: Vec::with_capacity(rooms),
            senders: Vec::with_capacity(rooms),
            subscribers: Vec::with_capacity(rooms),
        };
        for i in 0..rooms {
            let (room, sender, subscriber) = match self {
                Self::Relay { .. } => (RoomId::new(), None, None),
                Self::Unhidra { client, .. } => {
                    let sender = account(client, &format!("sender{i}")).await?;
                    let room = client
                        .create_room(&sender, &format!("loadgen {i}"), Visibility::Public)
                        .await?
                        .room_id;
                    let subscriber = account(client, &format!("subscriber{i}")).await?;
                    client.join(&subscriber, room).await?;
                    (room, Some(sender), Some(subscriber))
                }
            };
            setup.rooms.push(room);
            setup.senders.push(Identity {
                token: sender,
                rooms: vec![room],
            });
            setup.subscribers.push(Identity {
                token: subscriber,
                rooms: vec![room],
            });
        }
        Ok(setup)
    }

    /// Adds a sender identity of its own for each of `senders` beyond the
    /// rooms' first senders: a user who joins room `i % rooms`, so that
    /// sender connection `i` can send as `setup.senders[i]`.
    pub async fn add_senders(&self, setup: &mut Setup, senders: usize) -> anyhow::Result<()> {
        for i in setup.senders.len()..senders {
            let room = setup.rooms[i % setup.rooms.len()];
            let token = match self {
                Self::Relay { .. } => None,
                Self::Unhidra { client, .. } => {
                    let sender = account(client, &format!("sender{i}")).await?;
                    client.join(&sender, room).await?;
                    Some(sender)
                }
            };
            setup.senders.push(Identity {
                token,
                rooms: vec![room],
            });
        }
        Ok(())
    }

    pub async fn connect(&self, identity: &Identity) -> anyhow::Result<Connection> {
        self.endpoint(identity).connect(None).await
    }

    /// Where and how `identity` connects.
    pub fn endpoint(&self, identity: &Identity) -> Endpoint {
        match self {
            Self::Unhidra { client, .. } => Endpoint {
                ws_url: client.ws_url(),
                token: identity.token.clone(),
            },
            Self::Relay { ws_url, .. } => {
                let rooms: Vec<String> = identity.rooms.iter().map(RoomId::to_string).collect();
                Endpoint {
                    ws_url: format!("{ws_url}?rooms={}", rooms.join(",")),
                    token: None,
                }
            }
        }
    }

    /// The server's resident memory in bytes: from the relay's `/proc`
    /// entry, or from Unhidra's `process_resident_memory_bytes`.
    pub async fn resident_bytes(&self) -> anyhow::Result<u64> {
        match self {
            Self::Relay { pid, .. } => {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
                let kib: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .context("no VmRSS")?;
                Ok(kib * 1024)
            }
            Self::Unhidra { client, .. } => {
                Ok(metric(&client.metrics().await?, "process_resident_memory_bytes")? as u64)
            }
        }
    }

    /// The CPU time (user and system) the server has used, in seconds: the
    /// sum over its processes' `/proc` entries when they run here (10 ms
    /// steps), else from Unhidra's `process_cpu_seconds_total` (whole
    /// seconds).
    pub async fn cpu_seconds(&self) -> anyhow::Result<f64> {
        match self {
            Self::Relay { pid, .. } => cpu_seconds_of(&pid.to_string()),
            Self::Unhidra { client, pids, .. } if pids.is_empty() => {
                metric(&client.metrics().await?, "process_cpu_seconds_total")
            }
            Self::Unhidra { pids, .. } => pids
                .iter()
                .map(|pid| cpu_seconds_of(&pid.to_string()))
                .sum(),
        }
    }
}

/// Running totals (sum, count) of the send path's histograms, over the
/// server's processes: where an ack's time goes (docs/operations.md).
#[derive(Debug, Clone, Copy, Default)]
pub struct SendPath {
    round_trips: (f64, f64),
    waits: (f64, f64),
    groups: (f64, f64),
    messages: (f64, f64),
}

impl Target {
    /// The send path's totals now; none for the relay, or when a
    /// process's metrics cannot be read (the run goes on without them).
    pub async fn send_path(&self) -> Option<SendPath> {
        let Self::Unhidra {
            client, services, ..
        } = self
        else {
            return None;
        };
        let mut totals = SendPath::default();
        for process in std::iter::once(client).chain(services) {
            let text = match process.metrics().await {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("the send path is not reported: {e}");
                    return None;
                }
            };
            let add = |total: &mut (f64, f64), name: &str, labels: &str| {
                total.0 += series(&text, &format!("{name}_sum{labels}"));
                total.1 += series(&text, &format!("{name}_count{labels}"));
            };
            let chat_send = r#"{request="chat.send"}"#;
            add(
                &mut totals.round_trips,
                "unhidra_bus_request_duration_seconds",
                chat_send,
            );
            add(&mut totals.waits, "unhidra_group_commit_wait_seconds", "");
            add(
                &mut totals.groups,
                "unhidra_group_commit_duration_seconds",
                "",
            );
            add(&mut totals.messages, "unhidra_group_commit_messages", "");
        }
        Some(totals)
    }
}

impl SendPath {
    /// What moved since `before`, `seconds` ago: the means, and the
    /// fraction of the time the group commit was in transactions.
    pub fn figures_since(&self, before: &Self, seconds: f64) -> Vec<(String, f64)> {
        let mean = |now: (f64, f64), then: (f64, f64), scale: f64| {
            let count = now.1 - then.1;
            (count > 0.0).then(|| (now.0 - then.0) / count * scale)
        };
        [
            (
                "chat.send round trip, mean (ms)",
                mean(self.round_trips, before.round_trips, 1e3),
            ),
            (
                "wait for the group commit, mean (ms)",
                mean(self.waits, before.waits, 1e3),
            ),
            (
                "group commit transaction, mean (ms)",
                mean(self.groups, before.groups, 1e3),
            ),
            (
                "messages per group commit",
                mean(self.messages, before.messages, 1.0),
            ),
            (
                "group commit busy (fraction of the time)",
                (self.groups.1 > before.groups.1 && seconds > 0.0)
                    .then(|| (self.groups.0 - before.groups.0) / seconds),
            ),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name.to_owned(), value?)))
        .collect()
    }
}

/// The value of the unlabelled metric `name` in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> anyhow::Result<f64> {
    value_of(text, name).with_context(|| format!("no {name} in /metrics"))
}

/// The value of `series` (a name and its labels) in a Prometheus text
/// exposition; 0 when the process does not export it.
fn series(text: &str, series: &str) -> f64 {
    value_of(text, series).unwrap_or(0.0)
}

fn value_of(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A WebSocket URL and the token to present there (none for the relay).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub ws_url: String,
    pub token: Option<String>,
}

impl Endpoint {
    /// Opens a connection, from the local address `source` when given.
    pub async fn connect(&self, source: Option<IpAddr>) -> anyhow::Result<Connection> {
        Ok(Connection::open_from(&self.ws_url, self.token.as_deref(), source).await?)
    }
}

/// Registers and logs in a fresh account; its access token.
async fn account(client: &Client, name: &str) -> anyhow::Result<String> {
    let email = format!("{name}-{}@loadgen.example", uuid::Uuid::new_v4().simple());
    client.register(&email, PASSWORD, name).await?;
    Ok(client.login(&email, PASSWORD).await?.access_token)
}
