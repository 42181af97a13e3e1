//! `unhidra-loadgen`: drives an Unhidra deployment (or the built-in bare
//! relay, for reference) through a scenario and reports what it measured as a
//! Markdown table and as JSON. Exits non-zero when anything went missing.

mod connect;
mod idle;
mod local;
mod logins;
mod relay;
mod report;
mod target;
mod traffic;

use std::{io::BufRead, process::Stdio};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use unhidra_client::{Client, Endpoints};

use crate::{
    target::Target,
    traffic::{ClientIds, Traffic},
};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rooms of many members; senders at a fixed total rate.
    Fanout {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        #[arg(long, default_value_t = 100)]
        members: usize,
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Messages per second, all senders together.
        #[arg(long, default_value_t = 300)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[command(flatten)]
        sending: Sending,
    },
    /// Many senders, one receiver per room: accepted messages per second.
    Ingest {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        #[arg(long, default_value_t = 100)]
        senders: usize,
        /// Messages per second, all senders together.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[command(flatten)]
        sending: Sending,
    },
    /// Holds authenticated connections; memory per connection, connects per second.
    Idle {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Processes holding the connections (this one and helpers), for
        /// more than one process may hold open files.
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// Loopback source addresses (127.0.0.1 up), for more than one
        /// address's ephemeral ports.
        #[arg(long, default_value_t = 1)]
        sources: usize,
    },
    /// Authenticated connects per second: open, ping, close, repeatedly.
    Connect {
        #[command(flatten)]
        target: TargetArgs,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// A login flood: how it is answered, how `/healthz` answers meanwhile,
    /// and the server's memory before and after.
    Logins {
        #[command(flatten)]
        target: TargetArgs,
        /// Logins sent at once.
        #[arg(long, default_value_t = 300)]
        concurrency: usize,
        /// Logins sent in all, `--concurrency` at a time (default: one wave).
        #[arg(long)]
        total: Option<usize>,
        /// Size of each login's password (1 MiB: refused before hashing).
        #[arg(long, default_value_t = 1024 * 1024)]
        password_bytes: usize,
        /// Register an account first and log in to it (each login hashes
        /// and succeeds); else the logins name an address with no account.
        #[arg(long)]
        account: bool,
    },
    /// Holds connections for `idle --processes` (started by it).
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        ws_url: String,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        end: usize,
        #[arg(long)]
        step: usize,
        #[arg(long)]
        sources: usize,
    },
    /// Runs the bare relay (what `--target relay` starts by itself).
    Relay {
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: String,
        /// Fault injection for the loadgen's own tests: drop every Nth delivery.
        #[arg(long, hide = true)]
        drop_every: Option<u64>,
    },
}

/// How the senders send: who they are, how they name their sends, and
/// how long they send before the measured seconds.
#[derive(Args)]
struct Sending {
    /// How the sends' client ids (their idempotency keys) are made.
    #[arg(long, value_enum, default_value_t = ClientIds::Sequential)]
    ids: ClientIds,
    /// Each sender connection a user of its own (registered and joined to
    /// its room); else a room's senders share one user.
    #[arg(long)]
    user_per_sender: bool,
    /// Seconds at the full rate before the measured `--seconds`, answered
    /// and delivered but neither timed nor counted (0: measured from the
    /// first send, the step from idle included).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=3600))]
    warm_up: u64,
}

#[derive(Args)]
struct TargetArgs {
    /// `unhidra` or `relay` (the built-in bare relay, started for the run).
    #[arg(long, default_value = "unhidra")]
    target: String,
    /// Unhidra's HTTP base URL (its gateway and APIs).
    #[arg(long, default_value = "http://127.0.0.1:9000")]
    url: String,
    /// Scaled out: auth-api's base URL, if not at `--url`.
    #[arg(long)]
    auth_url: Option<String>,
    /// Scaled out: chat-service's base URL, if not at `--url`.
    #[arg(long)]
    chat_url: Option<String>,
    /// Scaled out: a service besides the gateway whose CPU counts as the
    /// server's, by a URL it listens at on this machine (repeat for each).
    #[arg(long, value_name = "URL")]
    cpu_of: Vec<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Passed to the relay (fault injection for the loadgen's own tests).
    #[arg(long, hide = true)]
    relay_drop_every: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (args, report) = match cli.command {
        Command::Relay { bind, drop_every } => {
            let listener = tokio::net::TcpListener::bind(&bind).await?;
            println!("listening {}", listener.local_addr()?);
            return relay::serve(listener, drop_every).await;
        }
        Command::Hold {
            ws_url,
            first,
            end,
            step,
            sources,
        } => return idle::helper(ws_url, (first, end, step), sources).await,
        Command::Fanout {
            target,
            rooms,
            members,
            senders,
            rate,
            seconds,
            body_bytes,
            sending,
        } => {
            let traffic = Traffic {
                rooms,
                subscribers_per_room: members,
                senders,
                rate,
                seconds,
                body_bytes,
                ids: sending.ids,
                user_per_sender: sending.user_per_sender,
                warm_up_seconds: sending.warm_up,
            };
            run_traffic(target, "fanout", traffic).await?
        }
        Command::Ingest {
            target,
            rooms,
            senders,
            rate,
            seconds,
            body_bytes,
            sending,
        } => {
            let traffic = Traffic {
                rooms,
                subscribers_per_room: 1,
                senders,
                rate,
                seconds,
                body_bytes,
                ids: sending.ids,
                user_per_sender: sending.user_per_sender,
                warm_up_seconds: sending.warm_up,
            };
            run_traffic(target, "ingest", traffic).await?
        }
        Command::Connect {
            target,
            workers,
            seconds,
        } => {
            let (running, _relay) = start(&target).await?;
            (target, connect::run(&running, workers, seconds).await?)
        }
        Command::Logins {
            target,
            concurrency,
            total,
            password_bytes,
            account,
        } => {
            let (running, _relay) = start(&target).await?;
            let logins = logins::Logins {
                total: total.unwrap_or(concurrency),
                concurrency,
                password_bytes,
                account,
            };
            let report = logins::run(&running, &logins).await?;
            (target, report)
        }
        Command::Idle {
            target,
            connections,
            processes,
            sources,
        } => {
            let (running, _relay) = start(&target).await?;
            let spread = idle::Spread { processes, sources };
            (target, idle::run(&running, connections, spread).await?)
        }
    };
    println!("{}", report.markdown());
    let json = serde_json::to_string(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.failures.is_empty() {
        anyhow::bail!("the run lost or refused messages: {:?}", report.failures);
    }
    Ok(())
}

async fn run_traffic(
    args: TargetArgs,
    scenario: &str,
    traffic: Traffic,
) -> anyhow::Result<(TargetArgs, report::Report)> {
    let (running, _relay) = start(&args).await?;
    let report = traffic::run(&running, scenario, traffic).await?;
    Ok((args, report))
}

/// Kills the relay child process when dropped.
struct RelayProcess(std::process::Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start(args: &TargetArgs) -> anyhow::Result<(Target, Option<RelayProcess>)> {
    match args.target.as_str() {
        "unhidra" => {
            let mut endpoints = Endpoints::all_at(&args.url);
            if let Some(auth) = &args.auth_url {
                endpoints.auth = auth.trim_end_matches('/').to_owned();
            }
            if let Some(chat) = &args.chat_url {
                endpoints.chat = chat.trim_end_matches('/').to_owned();
            }
            let mut pids: Vec<u32> = local::server_pid(&args.url).into_iter().collect();
            anyhow::ensure!(
                args.cpu_of.is_empty() || !pids.is_empty(),
                "--cpu-of needs the gateway (--url) on this machine too"
            );
            let mut services = Vec::new();
            for url in &args.cpu_of {
                pids.push(local::server_pid(url).with_context(|| {
                    format!("--cpu-of {url}: no process of this machine listens there")
                })?);
                services.push(Client::with_endpoints(Endpoints::all_at(url)));
            }
            Ok((
                Target::Unhidra {
                    client: Client::with_endpoints(endpoints),
                    services,
                    pids,
                },
                None,
            ))
        }
        "relay" => {
            anyhow::ensure!(
                args.cpu_of.is_empty(),
                "--cpu-of counts Unhidra's services; the relay is one process"
            );
            let mut relay = std::process::Command::new(std::env::current_exe()?);
            relay.arg("relay").stdout(Stdio::piped());
            if let Some(n) = args.relay_drop_every {
                relay.args(["--drop-every", &n.to_string()]);
            }
            let mut child = relay.spawn()?;
            let pid = child.id();
            let stdout = child.stdout.take().context("relay stdout")?;
            let relay = RelayProcess(child);
            let line = tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                std::io::BufReader::new(stdout)
                    .read_line(&mut line)
                    .map(|_| line)
            })
            .await??;
            let address = line
                .trim()
                .strip_prefix("listening ")
                .context("the relay did not say where it listens")?;
            Ok((
                Target::Relay {
                    ws_url: format!("ws://{address}/ws"),
                    pid,
                },
                Some(relay),
            ))
        }
        other => anyhow::bail!("unknown target `{other}` (unhidra or relay)"),
    }
}
