//! The load generator on small runs: it reports what it measured, and fails
//! loudly when messages go missing.

use std::process::Command;

use serde_json::Value;

fn loadgen(args: &[&str]) -> std::io::Result<(bool, Value, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_unhidra-loadgen"))
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let report = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    Ok((output.status.success(), report, stdout))
}

/// [`loadgen`] from async code (it waits for the process on a blocking
/// thread, so a server in this test's runtime keeps running).
async fn loadgen_async(args: &[&str]) -> Result<(bool, Value, String), Box<dyn std::error::Error>> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let args = move || loadgen(&args.iter().map(String::as_str).collect::<Vec<_>>());
    Ok(tokio::task::spawn_blocking(args).await??)
}

fn figure(report: &Value, name: &str) -> Option<f64> {
    report["figures"]
        .as_array()?
        .iter()
        .find(|f| f[0] == name)
        .and_then(|f| f[1].as_f64())
}

#[test]
fn a_clean_relay_run_reports_every_figure() -> Result<(), Box<dyn std::error::Error>> {
    let (ok, report, stdout) = loadgen(&[
        "fanout",
        "--target",
        "relay",
        "--rooms",
        "2",
        "--members",
        "3",
        "--senders",
        "2",
        "--rate",
        "200",
        "--seconds",
        "1",
    ])?;
    assert!(ok, "{stdout}");
    assert!(stdout.contains("| delivered fraction | 1.00 |"), "{stdout}");
    assert_eq!(figure(&report, "messages acked"), Some(200.0));
    assert_eq!(figure(&report, "deliveries"), Some(600.0));
    assert_eq!(report["latencies"][1][1]["count"], 600);
    for cpu in [
        "server CPU per acked message (µs)",
        "server CPU per delivery (µs)",
        "loadgen CPU per acked message (µs)",
    ] {
        assert!(figure(&report, cpu).is_some_and(|v| v >= 0.0), "{stdout}");
    }
    // The relay has no group commit to report on.
    assert_eq!(figure(&report, "messages per group commit"), None);
    Ok(())
}

#[test]
fn missing_deliveries_fail_the_run() -> Result<(), Box<dyn std::error::Error>> {
    let (ok, report, stdout) = loadgen(&[
        "fanout",
        "--target",
        "relay",
        "--rooms",
        "1",
        "--members",
        "2",
        "--senders",
        "1",
        "--rate",
        "100",
        "--seconds",
        "1",
        "--relay-drop-every",
        "10",
    ])?;
    assert!(!ok, "a lossy run passed: {stdout}");
    // The figures count the measured second; the warm-up second before it
    // (the default) is sent, delivered and checked the same way.
    assert_eq!(figure(&report, "deliveries"), Some(180.0));
    assert!(stdout.contains("20 of 200 deliveries missing"), "{stdout}");
    assert!(
        stdout.contains("20 of 200 warm-up deliveries missing"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_run_against_the_embedded_default() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let config = unhidra_core::Config {
        data_dir: dir.path().to_path_buf(),
        ..unhidra_testkit::config()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop.clone();
    let server = tokio::spawn(unhidra::run(listener, config, async move {
        signal.cancelled().await
    }));
    let (ok, report, stdout) = loadgen_async(&[
        "ingest",
        "--url",
        &url,
        "--rooms",
        "2",
        "--senders",
        "4",
        "--rate",
        "400",
        "--seconds",
        "1",
    ])
    .await?;
    assert!(ok, "{stdout}");
    assert_eq!(report["target"], "unhidra");
    assert_eq!(figure(&report, "messages acked"), Some(400.0));
    assert_eq!(figure(&report, "delivered fraction"), Some(1.0));
    // The server is this process: 400 accepted messages cost it well over
    // the 10 ms that process times count in.
    let cpu = figure(&report, "server CPU per acked message (µs)").unwrap_or_default();
    assert!(cpu > 0.0, "{stdout}");
    // Where the acks' time went, read off the server's metrics: 400 sends
    // went to chat-service, in groups of at most 400 messages.
    let per_group = figure(&report, "messages per group commit").unwrap_or_default();
    assert!((1.0..=400.0).contains(&per_group), "{stdout}");
    for spent in [
        "chat.send round trip, mean (ms)",
        "wait for the group commit, mean (ms)",
        "group commit transaction, mean (ms)",
    ] {
        assert!(
            figure(&report, spent).is_some_and(|ms| ms > 0.0),
            "{spent}: {stdout}"
        );
    }
    let busy = figure(&report, "group commit busy (fraction of the time)").unwrap_or_default();
    assert!(busy > 0.0 && busy <= 1.0, "{stdout}");

    // Random client ids (a fresh UUID per send), as a browser's
    // `crypto.randomUUID()` makes them, from three senders each a user of
    // its own (two registered and joined for the run: a sender that is not
    // a member would be refused, and the run fail): all accepted, and both
    // choices named in the report.
    let (ok, report, stdout) = loadgen_async(&[
        "ingest",
        "--url",
        &url,
        "--rooms",
        "1",
        "--senders",
        "3",
        "--user-per-sender",
        "--rate",
        "100",
        "--seconds",
        "1",
        "--ids",
        "random",
    ])
    .await?;
    assert!(ok, "{stdout}");
    assert_eq!(report["parameters"]["ids"], "random", "{stdout}");
    assert_eq!(report["parameters"]["user_per_sender"], true, "{stdout}");
    assert_eq!(figure(&report, "messages acked"), Some(100.0), "{stdout}");

    // A flood of logins with 1 MiB passwords: every one refused unread.
    let (ok, report, stdout) =
        loadgen_async(&["logins", "--url", &url, "--concurrency", "20"]).await?;
    assert!(ok, "{stdout}");
    let refused = figure(&report, "answered 413").unwrap_or_default()
        + figure(&report, "answered closed unread").unwrap_or_default();
    assert_eq!(refused, 20.0, "{stdout}");
    assert!(
        report["latencies"][1][1]["count"].as_u64() >= Some(1),
        "{stdout}"
    );

    // Logins to an account of the run's own, two at a time: each succeeds,
    // and the memory they left is reported.
    let (ok, report, stdout) = loadgen_async(&[
        "logins",
        "--url",
        &url,
        "--account",
        "--total",
        "6",
        "--concurrency",
        "2",
        "--password-bytes",
        "20",
    ])
    .await?;
    assert!(ok, "{stdout}");
    assert_eq!(figure(&report, "logins sent"), Some(6.0), "{stdout}");
    assert_eq!(figure(&report, "answered 200"), Some(6.0), "{stdout}");
    let grown = figure(&report, "server resident MiB above before");
    let before = figure(&report, "server resident MiB before").unwrap_or_default();
    let after = figure(&report, "server resident MiB after").unwrap_or_default();
    assert!(
        grown.is_some_and(|mib| (mib - (after - before)).abs() < 1e-6),
        "{stdout}"
    );
    stop.cancel();
    server.await??;
    Ok(())
}

#[test]
fn connects_are_counted_and_timed() -> Result<(), Box<dyn std::error::Error>> {
    let (ok, report, stdout) = loadgen(&[
        "connect",
        "--target",
        "relay",
        "--workers",
        "2",
        "--seconds",
        "1",
    ])?;
    assert!(ok, "{stdout}");
    let served = figure(&report, "connections served").unwrap_or_default();
    assert!(served >= 1.0, "{stdout}");
    assert_eq!(report["latencies"][0][1]["count"].as_f64(), Some(served));
    Ok(())
}

#[test]
fn idle_connections_spread_over_processes_and_addresses() -> Result<(), Box<dyn std::error::Error>>
{
    let (ok, report, stdout) = loadgen(&[
        "idle",
        "--target",
        "relay",
        "--connections",
        "30",
        "--processes",
        "3",
        "--sources",
        "2",
    ])?;
    assert!(ok, "{stdout}");
    assert_eq!(figure(&report, "connections held"), Some(30.0), "{stdout}");
    assert_eq!(report["parameters"]["processes"], 3);
    assert!(
        figure(&report, "server KiB per connection").is_some(),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn a_service_to_measure_that_is_not_here_fails_the_run() -> Result<(), Box<dyn std::error::Error>> {
    // A listener of this test stands in for the gateway; nothing listens
    // where the second service is said to be.
    let gateway = std::net::TcpListener::bind("127.0.0.1:0")?;
    let unused = std::net::TcpListener::bind("127.0.0.1:0")?;
    let nowhere = format!("http://{}", unused.local_addr()?);
    drop(unused);
    let output = Command::new(env!("CARGO_BIN_EXE_unhidra-loadgen"))
        .args([
            "ingest",
            "--url",
            &format!("http://{}", gateway.local_addr()?),
        ])
        .args(["--cpu-of", &nowhere])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--cpu-of {nowhere}: no process of this machine listens there"
        )),
        "{stderr}"
    );
    Ok(())
}
