//! `idle`: holds N authenticated connections and reports what each costs the
//! server in resident memory, and how fast they were opened.

use std::time::{Duration, Instant};

use futures::{StreamExt, stream};

use crate::{report::Report, target::Target};

/// Connections opened at once.
const CONCURRENCY: usize = 64;
/// How long the connections are held before memory is read.
const SETTLE: Duration = Duration::from_secs(2);

pub async fn run(target: &Target, connections: usize) -> anyhow::Result<Report> {
    let setup = target.prepare(1).await?;
    let identity = setup
        .subscribers
        .first()
        .ok_or_else(|| anyhow::anyhow!("no room"))?;
    // Warm up: the first connection pays for caches (signing keys...).
    let warm = target.connect(identity).await?;
    let before = target.resident_bytes().await?;
    let started = Instant::now();
    let opened: Vec<anyhow::Result<unhidra_client::Connection>> = stream::iter(0..connections)
        .map(|_| target.connect(identity))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let connect_time = started.elapsed();
    let mut held = Vec::with_capacity(connections);
    let mut failures = Vec::new();
    for connection in opened {
        match connection {
            Ok(c) => held.push(c),
            Err(e) => failures.push(e.to_string()),
        }
    }
    tokio::time::sleep(SETTLE).await;
    let after = target.resident_bytes().await?;
    let per_connection = after.saturating_sub(before) as f64 / held.len().max(1) as f64;
    if failures.len() > 3 {
        let count = failures.len();
        failures.truncate(3);
        failures.push(format!("{count} connections failed in all"));
    }
    let report = Report {
        scenario: "idle".into(),
        target: target.name().into(),
        parameters: serde_json::json!({ "connections": connections }),
        figures: vec![
            ("connections held".into(), held.len() as f64),
            (
                "connects per second".into(),
                held.len() as f64 / connect_time.as_secs_f64(),
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
    drop(held);
    drop(warm);
    Ok(report)
}
