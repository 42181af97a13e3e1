//! `logins`: a login flood. Many logins at once, each with a password of the
//! given size (1 MiB by default: refused before hashing, before the body is
//! even read), while `/healthz` is probed; reports how the logins were
//! answered, how `/healthz` answered meanwhile, and the server's resident
//! memory before and after.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use crate::{
    report::{Latency, Report, histogram},
    target::Target,
};

/// Between two `/healthz` probes.
const PROBE_EVERY: Duration = Duration::from_millis(10);

pub async fn run(
    target: &Target,
    concurrency: usize,
    password_bytes: usize,
) -> anyhow::Result<Report> {
    let Target::Unhidra { client, .. } = target else {
        anyhow::bail!("logins runs against unhidra only: the relay has no accounts");
    };
    let endpoints = client.endpoints().clone();
    let http = reqwest::Client::new();
    let before = target.resident_bytes().await?;

    let flooding = Arc::new(AtomicBool::new(true));
    // A client of its own: the flood's connections are closed by the server
    // mid-request, and a probe must not pick one of them from a shared pool.
    let probe = tokio::spawn(probe_health(
        reqwest::Client::new(),
        format!("{}/healthz", endpoints.auth),
        Arc::clone(&flooding),
    ));
    let body = serde_json::to_vec(&serde_json::json!({
        "email": "flood@loadgen.example",
        "password": "p".repeat(password_bytes),
    }))?;
    let url = format!("{}/api/v1/auth/login", endpoints.auth);
    let started = Instant::now();
    let answers = futures::future::join_all((0..concurrency).map(|_| {
        let request = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        async move {
            let sent = Instant::now();
            let answer = match request.send().await {
                Ok(response) => response.status().as_u16().to_string(),
                // Refused before the body was read: the server closed while
                // the client was still writing it.
                Err(_) => "closed unread".to_owned(),
            };
            (answer, sent.elapsed())
        }
    }))
    .await;
    let took = started.elapsed();
    flooding.store(false, Ordering::Relaxed);
    let (health, health_failures) = probe.await??;
    let after = target.resident_bytes().await?;

    let mut by_answer: BTreeMap<String, u64> = BTreeMap::new();
    let mut answered = histogram()?;
    for (answer, elapsed) in &answers {
        *by_answer.entry(answer.clone()).or_default() += 1;
        answered.record(
            u64::try_from(elapsed.as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        )?;
    }
    let mut failures = Vec::new();
    for (why, times) in &health_failures {
        failures.push(format!(
            "/healthz failed {times} times during the flood: {why}"
        ));
    }
    for answer in by_answer.keys() {
        let expected = ["401", "413", "422", "429", "503", "closed unread"];
        if !expected.contains(&answer.as_str()) {
            failures.push(format!("a login was answered {answer}"));
        }
    }
    let mut figures = vec![
        ("logins sent".to_owned(), concurrency as f64),
        ("seconds until all answered".to_owned(), took.as_secs_f64()),
    ];
    figures.extend(
        by_answer
            .iter()
            .map(|(answer, count)| (format!("answered {answer}"), *count as f64)),
    );
    figures.extend([
        (
            "server resident MiB before".to_owned(),
            before as f64 / 1048576.0,
        ),
        (
            "server resident MiB after".to_owned(),
            after as f64 / 1048576.0,
        ),
    ]);
    Ok(Report {
        scenario: "logins".into(),
        target: target.name().into(),
        parameters: serde_json::json!({ "concurrency": concurrency, "password_bytes": password_bytes }),
        figures,
        latencies: vec![
            ("login answer".into(), Latency::of(&answered)),
            ("/healthz during the flood".into(), Latency::of(&health)),
        ],
        failures,
    })
}

/// Probes `/healthz` until the flood ends: latencies, and how many probes
/// failed, by answer or error.
async fn probe_health(
    http: reqwest::Client,
    url: String,
    flooding: Arc<AtomicBool>,
) -> anyhow::Result<(Histogram<u64>, BTreeMap<String, u64>)> {
    let mut latency = histogram()?;
    let mut failed = BTreeMap::new();
    while flooding.load(Ordering::Relaxed) {
        let started = Instant::now();
        match http.get(&url).send().await {
            Ok(response) if response.status().is_success() => {
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                latency.record(micros.max(1))?;
            }
            Ok(response) => *failed.entry(response.status().to_string()).or_default() += 1,
            Err(error) => *failed.entry(error.to_string()).or_default() += 1,
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
    Ok((latency, failed))
}
