//! `logins`: a login flood, or a long run of logins. Logins with a password
//! of the given size (1 MiB by default: refused before hashing, before the
//! body is even read), a number of them at once, while `/healthz` is probed;
//! reports how the logins were answered, how `/healthz` answered meanwhile,
//! and the server's resident memory before and after. Against an account
//! of its own (`--account`) the logins succeed, as a user's do.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;

use crate::{
    report::{Latency, Report, histogram},
    target::Target,
};

/// Between two `/healthz` probes.
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// What to send and how: `total` logins, `concurrency` at a time, with
/// passwords of `password_bytes`; to an account registered first when
/// `account`, else to an address no account has.
pub struct Logins {
    pub total: usize,
    pub concurrency: usize,
    pub password_bytes: usize,
    pub account: bool,
}

pub async fn run(target: &Target, logins: &Logins) -> anyhow::Result<Report> {
    let Target::Unhidra { client, .. } = target else {
        anyhow::bail!("logins runs against unhidra only: the relay has no accounts");
    };
    anyhow::ensure!(
        logins.total > 0 && logins.concurrency > 0,
        "--total and --concurrency must be at least 1"
    );
    let endpoints = client.endpoints().clone();
    let http = reqwest::Client::new();
    let (email, password) = if logins.account {
        let email = format!("logins-{}@loadgen.example", uuid::Uuid::new_v4().simple());
        let password = random_password(logins.password_bytes);
        client
            .register(&email, &password, "logins")
            .await
            .context("registering the run's account (--account)")?;
        (email, password)
    } else {
        (
            "flood@loadgen.example".to_owned(),
            "p".repeat(logins.password_bytes),
        )
    };
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
        "email": email,
        "password": password,
    }))?;
    let url = format!("{}/api/v1/auth/login", endpoints.auth);
    let started = Instant::now();
    let answers: Vec<(String, Duration)> = futures::stream::iter((0..logins.total).map(|_| {
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
    .buffer_unordered(logins.concurrency)
    .collect()
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
    // A login to the run's own account succeeds unless the server sheds
    // it; any other is refused.
    let expected: &[&str] = if logins.account {
        &["200", "429", "503"]
    } else {
        &["401", "413", "422", "429", "503", "closed unread"]
    };
    for answer in by_answer.keys() {
        if !expected.contains(&answer.as_str()) {
            failures.push(format!("a login was answered {answer}"));
        }
    }
    let mut figures = vec![
        ("logins sent".to_owned(), logins.total as f64),
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
        (
            "server resident MiB above before".to_owned(),
            (after as f64 - before as f64) / 1048576.0,
        ),
    ]);
    Ok(Report {
        scenario: "logins".into(),
        target: target.name().into(),
        parameters: serde_json::json!({
            "total": logins.total,
            "concurrency": logins.concurrency,
            "password_bytes": logins.password_bytes,
            "account": logins.account,
        }),
        figures,
        latencies: vec![
            ("login answer".into(), Latency::of(&answered)),
            ("/healthz during the flood".into(), Latency::of(&health)),
        ],
        failures,
    })
}

/// A password of `bytes` random hexadecimal digits: neither common nor one
/// character repeated. Its length is the server's to judge: registration
/// refuses one its policy does not allow, with the policy's code.
fn random_password(bytes: usize) -> String {
    let mut password = String::with_capacity(bytes + 32);
    while password.len() < bytes {
        password.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    password.truncate(bytes);
    password
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
