//! `idle`: holds N authenticated connections and reports what each costs the
//! server in resident memory, and how fast they were opened. Past what one
//! process may hold (20,000 open files here) the connections are spread over
//! helper processes (`--processes`), and past one address's ephemeral ports
//! over several loopback source addresses (`--sources`).

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};
use unhidra_client::Connection;

use crate::{
    report::Report,
    target::{Endpoint, Target},
};

/// Connections opened at once, per process.
const CONCURRENCY: usize = 64;
/// How long the connections are held before memory is read.
const SETTLE: Duration = Duration::from_secs(2);
/// Where a helper process is given the token to connect with.
const TOKEN_VAR: &str = "UNHIDRA_LOADGEN_TOKEN";

/// How connections are spread.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// Processes holding connections, this one included.
    pub processes: usize,
    /// Loopback source addresses (127.0.0.1, 127.0.0.2, ...), in turn.
    pub sources: usize,
}

/// What one process opened.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Held {
    held: usize,
    failed: usize,
    /// The first few failures' errors.
    failures: Vec<String>,
}

pub async fn run(target: &Target, connections: usize, spread: Spread) -> anyhow::Result<Report> {
    anyhow::ensure!(
        spread.processes >= 1 && (1..=254).contains(&spread.sources),
        "--processes must be at least 1 and --sources between 1 and 254"
    );
    let setup = target.prepare(1).await?;
    let identity = setup
        .subscribers
        .first()
        .ok_or_else(|| anyhow::anyhow!("no room"))?;
    let endpoint = target.endpoint(identity);
    // Warm up: the first connection pays for caches (signing keys...).
    let warm = target.connect(identity).await?;
    let before = target.resident_bytes().await?;
    let opened = Arc::new(AtomicU64::new(0));
    let progress = tokio::spawn(progress(Arc::clone(&opened), connections as u64));
    let started = Instant::now();
    // Process `p` opens connections p, p + processes, ...: each its share.
    let mut helpers = Vec::new();
    for p in 1..spread.processes {
        let share = (p, connections, spread.processes);
        helpers.push(Helper::start(&endpoint, share, spread.sources, &opened)?);
    }
    let mine = (0..connections).step_by(spread.processes);
    let (mine, mut conns) = hold(&endpoint, mine, spread.sources, &opened).await;
    let mut held = vec![mine];
    for helper in &mut helpers {
        held.push(helper.held().await?);
    }
    let connect_time = started.elapsed();
    progress.abort();
    eprintln!();
    let count: usize = held.iter().map(|h| h.held).sum();
    let failed: usize = held.iter().map(|h| h.failed).sum();
    let mut failures: Vec<String> = held.into_iter().flat_map(|h| h.failures).collect();
    tokio::time::sleep(SETTLE).await;
    let after = target.resident_bytes().await?;
    let per_connection = after.saturating_sub(before) as f64 / count.max(1) as f64;
    if failed > 3 {
        failures.truncate(3);
        failures.push(format!("{failed} connections failed in all"));
    }
    let report = Report {
        scenario: "idle".into(),
        target: target.name().into(),
        parameters: serde_json::json!({
            "connections": connections,
            "processes": spread.processes,
            "sources": spread.sources,
        }),
        figures: vec![
            ("connections held".into(), count as f64),
            (
                "connects per second".into(),
                count as f64 / connect_time.as_secs_f64(),
            ),
            (
                "server resident MiB before".into(),
                before as f64 / 1048576.0,
            ),
            ("server resident MiB after".into(), after as f64 / 1048576.0),
            ("server KiB per connection".into(), per_connection / 1024.0),
        ],
        latencies: Vec::new(),
        failures,
    };
    conns.clear();
    for helper in helpers {
        helper.stop().await;
    }
    drop(warm);
    Ok(report)
}

/// Opens the connections numbered `share`, connection `i` from source
/// address `i % sources`; counts each in `opened`.
async fn hold(
    endpoint: &Endpoint,
    share: impl Iterator<Item = usize>,
    sources: usize,
    opened: &AtomicU64,
) -> (Held, Vec<Connection>) {
    let results: Vec<_> = stream::iter(share)
        .map(|i| async move {
            let connection = endpoint.connect(source(i, sources)).await;
            if connection.is_ok() {
                opened.fetch_add(1, Ordering::Relaxed);
            }
            connection
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut held = Held::default();
    let mut conns = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(connection) => conns.push(connection),
            Err(e) => {
                held.failed += 1;
                if held.failures.len() < 3 {
                    held.failures.push(e.to_string());
                }
            }
        }
    }
    held.held = conns.len();
    (held, conns)
}

/// The `i`-th connection's source address, when more than one is used.
fn source(i: usize, sources: usize) -> Option<IpAddr> {
    (sources > 1).then(|| {
        let n = u8::try_from(1 + i % sources).unwrap_or(1);
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
    })
}

/// The helper side (`unhidra-loadgen hold`, started by `idle`): opens the
/// connections numbered `first, first + step, ...` below `end` against
/// `ws_url` (the token in `UNHIDRA_LOADGEN_TOKEN`), prints one line per
/// second with how many are open, then what it holds as JSON, and holds
/// them until its standard input closes.
pub async fn helper(
    ws_url: String,
    (first, end, step): (usize, usize, usize),
    sources: usize,
) -> anyhow::Result<()> {
    let endpoint = Endpoint {
        ws_url,
        token: std::env::var(TOKEN_VAR).ok(),
    };
    let opened = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&opened);
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            println!("opened {}", counter.load(Ordering::Relaxed));
        }
    });
    let (held, conns) = hold(
        &endpoint,
        (first..end).step_by(step.max(1)),
        sources,
        &opened,
    )
    .await;
    ticker.abort();
    println!("held {}", serde_json::to_string(&held)?);
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    while stdin.read_line(&mut line).await? > 0 {
        line.clear();
    }
    drop(conns);
    Ok(())
}

/// A helper process and what it reported.
struct Helper {
    child: Child,
    lines: tokio::sync::oneshot::Receiver<anyhow::Result<Held>>,
}

impl Helper {
    /// Starts a helper holding connections `first, first + step, ...`
    /// below `end`.
    fn start(
        endpoint: &Endpoint,
        (first, end, step): (usize, usize, usize),
        sources: usize,
        opened: &Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["hold", "--ws-url", &endpoint.ws_url])
            .args(["--first", &first.to_string()])
            .args(["--end", &end.to_string(), "--step", &step.to_string()])
            .args(["--sources", &sources.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(token) = &endpoint.token {
            command.env(TOKEN_VAR, token);
        }
        let mut child = command.spawn().context("starting a helper process")?;
        let stdout = child.stdout.take().context("helper stdout")?;
        let (done, lines) = tokio::sync::oneshot::channel();
        let opened = Arc::clone(opened);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            let mut counted = 0;
            let outcome = async {
                while let Some(line) = reader.next_line().await? {
                    if let Some(n) = line.strip_prefix("opened ") {
                        let n: u64 = n.parse()?;
                        opened.fetch_add(n.saturating_sub(counted), Ordering::Relaxed);
                        counted = counted.max(n);
                    } else if let Some(json) = line.strip_prefix("held ") {
                        let held: Held = serde_json::from_str(json)?;
                        let n = held.held as u64;
                        opened.fetch_add(n.saturating_sub(counted), Ordering::Relaxed);
                        return Ok(held);
                    }
                }
                anyhow::bail!("a helper process ended before reporting")
            };
            let _ = done.send(outcome.await);
        });
        Ok(Self { child, lines })
    }

    async fn held(&mut self) -> anyhow::Result<Held> {
        (&mut self.lines)
            .await
            .context("a helper process's reader ended")?
    }

    /// Closes its standard input (it lets its connections go) and waits.
    async fn stop(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.shutdown().await;
        }
        let _ = self.child.wait().await;
    }
}

/// Connections opened so far, on stderr once a second.
async fn progress(opened: Arc<AtomicU64>, total: u64) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let done = opened.load(Ordering::Relaxed);
        let filled = (done * 30).checked_div(total).unwrap_or(30).min(30) as usize;
        eprint!(
            "\r[{}{}] opened {done}/{total}   ",
            "#".repeat(filled),
            ".".repeat(30 - filled),
        );
    }
}
