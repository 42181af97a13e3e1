//! `connect`: authenticated connects per second. Workers open a connection,
//! wait for it to be served (a ping answered), and close it, again and again;
//! each connect-to-pong time is a latency sample.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use unhidra_core::protocol::{ClientFrame, ServerFrame};

use crate::{
    report::{Latency, Report, histogram},
    target::{Identity, Target},
};

pub async fn run(target: &Target, workers: usize, seconds: u64) -> anyhow::Result<Report> {
    let setup = target.prepare(1).await?;
    let identity = setup
        .subscribers
        .first()
        .ok_or_else(|| anyhow::anyhow!("no room"))?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let outcomes =
        futures::future::join_all((0..workers).map(|_| worker(target, identity, deadline))).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut latency = histogram()?;
    let mut failures = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(samples) => latency.add(samples)?,
            Err(e) => failures.push(e.to_string()),
        }
    }
    failures.truncate(3);
    Ok(Report {
        scenario: "connect".into(),
        target: target.name().into(),
        parameters: serde_json::json!({ "workers": workers, "seconds": seconds }),
        figures: vec![
            ("connections served".into(), latency.len() as f64),
            ("connects per second".into(), latency.len() as f64 / elapsed),
        ],
        latencies: vec![("connect to pong".into(), Latency::of(&latency))],
        failures,
    })
}

async fn worker(
    target: &Target,
    identity: &Identity,
    deadline: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = histogram()?;
    while Instant::now() < deadline {
        let started = Instant::now();
        let mut connection = target.connect(identity).await?;
        connection
            .send(&ClientFrame::Ping {
                id: Some("p".into()),
            })
            .await?;
        loop {
            match connection.next().await? {
                Some(ServerFrame::Pong { .. }) => break,
                Some(_) => {}
                None => anyhow::bail!("closed before answering a ping"),
            }
        }
        latency.record(started.elapsed().as_micros().max(1) as u64)?;
        connection.close().await?;
    }
    Ok(latency)
}
