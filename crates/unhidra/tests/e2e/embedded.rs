//! The embedded default, as a newcomer runs it: one process, SQLite, the
//! in-process bus.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::harness::*;

/// Two users, one room, one message: acked with seq 1, delivered to the other
/// member, and in the history.
pub async fn one_message_end_to_end(api: &Api, ws_url: &str) -> TestResult {
    let alice = api.user("alice").await?;
    let bob = api.user("bob").await?;
    let mut alice_ws = connect(ws_url, &alice.token).await?;
    let mut bob_ws = connect(ws_url, &bob.token).await?;

    // The room is created and joined after both connected: the connections
    // pick it up without reconnecting.
    let room = api.create_room(&alice, "public").await?;
    let (status, joined) = api.join(&bob, &room).await?;
    assert_eq!(status, StatusCode::OK, "{joined}");
    assert_eq!(joined["role"], "member");

    send(
        &mut alice_ws,
        json!({"type": "send", "id": "c-1", "room": room, "body": "hello bob"}),
    )
    .await?;
    // The sender gets the ack and its own message, in either order.
    let mut frames = [
        next_frame(&mut alice_ws).await?,
        next_frame(&mut alice_ws).await?,
    ];
    frames.sort_by_key(|f| f["type"] != "ack");
    let (ack, own) = (&frames[0], &frames[1]);
    assert_eq!(ack["id"], "c-1");
    assert_eq!(ack["room"], room.as_str());
    assert_eq!(ack["seq"], 1);
    let message_id = str_of(ack, "message_id")?;
    assert_eq!(own["type"], "message");
    assert_eq!(own["message_id"], message_id.as_str());
    assert_eq!(own["seq"], 1);

    let delivered = next_of(&mut bob_ws, "message").await?;
    assert_eq!(delivered["room"], room.as_str());
    assert_eq!(delivered["seq"], 1);
    assert_eq!(delivered["message_id"], message_id.as_str());
    assert_eq!(delivered["sender"], alice.id.as_str());
    assert_eq!(delivered["body"], "hello bob");
    assert!(
        delivered["sent_at"]
            .as_str()
            .is_some_and(|t| t.contains('T'))
    );

    // A second message takes the next sequence number.
    send(
        &mut bob_ws,
        json!({"type": "send", "id": "c-2", "room": room, "body": "hi alice"}),
    )
    .await?;
    let ack = next_of(&mut bob_ws, "ack").await?;
    assert_eq!(ack["seq"], 2);

    // History (written asynchronously by the consumer) returns both, newest first.
    let page = wait_for_history(api, &bob, &room, 2).await?;
    let messages = page["messages"].as_array().ok_or("no messages")?;
    assert_eq!(messages[0]["seq"], 2);
    assert_eq!(messages[0]["body"], "hi alice");
    assert_eq!(messages[1]["seq"], 1);
    assert_eq!(messages[1]["message_id"], message_id.as_str());
    assert_eq!(messages[1]["sender"], alice.id.as_str());
    let (_, older) = api.history(&bob, &room, "?before=2&limit=10").await?;
    assert_eq!(older["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(older["messages"][0]["seq"], 1);

    // Application-level ping.
    send(&mut bob_ws, json!({"type": "ping"})).await?;
    assert_eq!(next_of(&mut bob_ws, "pong").await?["type"], "pong");
    Ok(())
}

#[tokio::test]
async fn embedded_two_users_one_message() -> TestResult {
    let stack = Embedded::start().await?;
    one_message_end_to_end(&stack.api(), &stack.app.ws()).await?;

    let (status, health) = get(&format!("{}/healthz", stack.app.http()), None).await?;
    assert_eq!(
        (status, health["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, ready) = get(&format!("{}/readyz", stack.app.http()), None).await?;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["database:history-service"], "ok");
    let metrics = http()
        .get(format!("{}/metrics", stack.app.http()))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("unhidra_messages_accepted_total"),
        "{metrics}"
    );

    // Every service kept its own SQLite file.
    for service in [
        "auth-api",
        "chat-service",
        "history-service",
        "audit-service",
    ] {
        assert!(
            stack.data_dir.join(format!("{service}.db")).exists(),
            "{service}"
        );
    }
    stack.app.stop().await
}

#[tokio::test]
async fn embedded_restart_keeps_users_rooms_history_and_the_signing_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = unhidra_core::Config {
        data_dir: dir.path().to_path_buf(),
        ..unhidra_testkit::config()
    };
    let first = Running::start(config.clone(), unhidra::run).await?;
    let api = Api {
        auth: first.http(),
        chat: first.http(),
        history: first.http(),
    };
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "private").await?;
    let mut ws = connect(&first.ws(), &alice.token).await?;
    send(
        &mut ws,
        json!({"type": "send", "id": "a", "room": room, "body": "before restart"}),
    )
    .await?;
    assert_eq!(next_of(&mut ws, "ack").await?["seq"], 1);
    wait_for_history(&api, &alice, &room, 1).await?;
    drop(ws);
    first.stop().await?;

    let second = Running::start(config, unhidra::run).await?;
    let api = Api {
        auth: second.http(),
        chat: second.http(),
        history: second.http(),
    };
    // The token issued before the restart still verifies: the key persisted.
    let mut ws = connect(&second.ws(), &alice.token).await?;
    send(
        &mut ws,
        json!({"type": "send", "id": "b", "room": room, "body": "after restart"}),
    )
    .await?;
    assert_eq!(next_of(&mut ws, "ack").await?["seq"], 2);
    let page = wait_for_history(&api, &alice, &room, 2).await?;
    assert_eq!(page["messages"][0]["body"], "after restart");
    assert_eq!(page["messages"][1]["body"], "before restart");
    second.stop().await
}

/// Several connections sending into one room at once: every message gets its
/// own sequence number, with no gaps.
pub async fn concurrent_sends_get_gap_free_sequences(api: &Api, ws_url: &str) -> TestResult {
    const CONNECTIONS: usize = 4;
    const EACH: usize = 50;
    let owner = api.user("owner").await?;
    let room = api.create_room(&owner, "public").await?;
    let mut senders = Vec::new();
    for c in 0..CONNECTIONS {
        let user = api.user("sender").await?;
        let (status, _) = api.join(&user, &room).await?;
        assert_eq!(status, StatusCode::OK);
        let mut ws = connect(ws_url, &user.token).await?;
        let room = room.clone();
        senders.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..EACH {
                let id = format!("{c}-{i}");
                send(
                    &mut ws,
                    json!({"type": "send", "id": id, "room": room, "body": id}),
                )
                .await?;
                let ack = next_of(&mut ws, "ack").await?;
                assert_eq!(ack["id"], id.as_str());
                seqs.push(ack["seq"].as_u64().ok_or("no seq")?);
            }
            Ok::<_, Error>(seqs)
        }));
    }
    let mut all = Vec::new();
    for sender in senders {
        all.extend(sender.await??);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=(CONNECTIONS * EACH) as u64).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn embedded_concurrent_sends_get_gap_free_sequences() -> TestResult {
    let stack = Embedded::start().await?;
    concurrent_sends_get_gap_free_sequences(&stack.api(), &stack.app.ws()).await?;
    stack.app.stop().await
}

#[tokio::test]
async fn connections_close_with_documented_codes_on_token_expiry_and_shutdown() -> TestResult {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    async fn close_code(ws: &mut Socket) -> Result<Option<u16>, Error> {
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await? {
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| f.code.into())),
                Some(Ok(_)) => continue,
                other => return Err(format!("expected a close frame, got {other:?}").into()),
            }
        }
    }

    let stack = Embedded::start_with(unhidra_core::Config {
        access_token_ttl_secs: 1,
        ..unhidra_testkit::config()
    })
    .await?;
    let alice = stack.api().user("alice").await?;
    let mut ws = connect(&stack.app.ws(), &alice.token).await?;
    assert_eq!(close_code(&mut ws).await?, Some(4001));

    let stack_long = Embedded::start().await?;
    let bob = stack_long.api().user("bob").await?;
    let mut ws = connect(&stack_long.app.ws(), &bob.token).await?;
    send(&mut ws, json!({"type": "ping"})).await?;
    next_of(&mut ws, "pong").await?;
    let stopping = tokio::spawn(stack_long.app.stop());
    assert_eq!(close_code(&mut ws).await?, Some(1012));
    stopping.await??;
    stack.app.stop().await
}

/// The `unhidra` binary, run as a process on a data directory and port of
/// its own, as an operator runs it.
struct Binary {
    dir: tempfile::TempDir,
    port: u16,
}

impl Binary {
    fn new() -> Result<Self, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Ok(Self {
            dir: tempfile::tempdir()?,
            port,
        })
    }

    /// Starts the process on the data directory; returns once it is ready.
    async fn start(&self) -> Result<std::process::Child, Error> {
        use std::process::{Command, Stdio};

        let process = Command::new(env!("CARGO_BIN_EXE_unhidra"))
            .env("UNHIDRA_BIND", format!("127.0.0.1:{}", self.port))
            .env("UNHIDRA_DATA_DIR", self.dir.path())
            .env("UNHIDRA_SHUTDOWN_TIMEOUT_SECS", "5")
            .env("UNHIDRA_DRAIN_SECS", "1")
            // Traffic as fast as the tests send it.
            .env("UNHIDRA_LIMIT_MESSAGES_USER", "off")
            .env("UNHIDRA_LIMIT_WS_FRAMES", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_ready(&self.base()).await?;
        Ok(process)
    }

    /// A binary started on a fresh directory, a user and a public room of
    /// theirs.
    async fn started_with_a_room() -> Result<(Self, std::process::Child, User, String), Error> {
        let binary = Self::new()?;
        let process = binary.start().await?;
        let alice = binary.api().user("alice").await?;
        let room = binary.api().create_room(&alice, "public").await?;
        Ok((binary, process, alice, room))
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    fn api(&self) -> Api {
        Api {
            auth: self.base(),
            chat: self.base(),
            history: self.base(),
        }
    }

    /// Sends `signal` to `process` and waits for it to exit.
    async fn signal(
        process: std::process::Child,
        signal: &str,
    ) -> Result<std::process::ExitStatus, Error> {
        let sent = std::process::Command::new("kill")
            .args([signal, &process.id().to_string()])
            .status()?;
        assert!(sent.success(), "kill {signal} failed");
        let mut process = process;
        Ok(tokio::task::spawn_blocking(move || process.wait()).await??)
    }
}

/// A connection sending to `room` every `pause`, collecting the message ids
/// acknowledged, until the connection ends: the reader's task answers them
/// and the close code, if a close frame came.
async fn traffic(
    ws_url: &str,
    token: &str,
    room: &str,
    pause: std::time::Duration,
) -> Result<JoinHandle<(Vec<String>, Option<u16>)>, Error> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (mut sink, mut stream) = connect(ws_url, token).await?.split();
    let room = room.to_owned();
    let writer = tokio::spawn(async move {
        for i in 0.. {
            let frame = json!({"type": "send", "id": format!("m{i}"), "room": room, "body": "x"});
            if sink.send(Message::text(frame.to_string())).await.is_err() {
                break;
            }
            tokio::time::sleep(pause).await;
        }
    });
    Ok(tokio::spawn(async move {
        let mut acked = Vec::new();
        let code = loop {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                    if frame["type"] == "ack" {
                        acked.push(str_of(&frame, "message_id").unwrap_or_default());
                    }
                }
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                _ => break None,
            }
        };
        writer.abort();
        (acked, code)
    }))
}

/// Waits until every one of `acked` is in `room`'s history.
async fn wait_until_stored(api: &Api, user: &User, room: &str, acked: &[String]) -> TestResult {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stored: std::collections::HashSet<String> = all_history(api, user, room)
            .await?
            .iter()
            .filter_map(|m| m["message_id"].as_str().map(str::to_owned))
            .collect();
        let missing = acked.iter().filter(|id| !stored.contains(*id)).count();
        if missing == 0 {
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {} acknowledged messages lost",
            acked.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn sigterm_during_traffic_closes_with_1012_and_loses_no_acknowledged_message() -> TestResult {
    let (binary, process, alice, room) = Binary::started_with_a_room().await?;
    let (api, ws_url) = (binary.api(), binary.ws());
    let pause = std::time::Duration::from_millis(2);
    let reader = traffic(&ws_url, &alice.token, &room, pause).await?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let terminated_at = std::time::Instant::now();
    let status = Binary::signal(process, "-TERM").await?;
    let (acked, code) = tokio::time::timeout(WAIT, reader).await??;
    assert_eq!(code, Some(1012));
    assert!(
        !acked.is_empty(),
        "no message was acknowledged before SIGTERM"
    );
    assert!(status.success(), "{status}");
    assert!(
        terminated_at.elapsed() < std::time::Duration::from_secs(6),
        "exit took {:?}",
        terminated_at.elapsed()
    );

    // After a restart on the same data, every acknowledged message is in history.
    let process = binary.start().await?;
    wait_until_stored(&api, &alice, &room, &acked).await?;
    Binary::signal(process, "-TERM").await?;
    Ok(())
}

/// Killed outright while messages flow, the process keeps no promise in
/// memory only: every acknowledged message reaches history after the
/// restart, including those published to the in-process bus but not yet
/// stored by history-service when it died (the outbox keeps each until
/// history-service has it).
#[tokio::test]
async fn kill_9_during_traffic_loses_no_acknowledged_message() -> TestResult {
    let (binary, process, alice, room) = Binary::started_with_a_room().await?;
    let (api, ws_url) = (binary.api(), binary.ws());
    let mut readers = Vec::new();
    for _ in 0..4 {
        let pause = std::time::Duration::from_millis(1);
        readers.push(traffic(&ws_url, &alice.token, &room, pause).await?);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    Binary::signal(process, "-KILL").await?;
    let mut acked = Vec::new();
    for reader in readers {
        let (mine, code) = tokio::time::timeout(WAIT, reader).await??;
        assert_eq!(code, None, "a killed process sends no close frame");
        acked.extend(mine);
    }
    assert!(
        acked.len() > 100,
        "only {} acks before the kill",
        acked.len()
    );

    let process = binary.start().await?;
    wait_until_stored(&api, &alice, &room, &acked).await?;
    Binary::signal(process, "-TERM").await?;
    Ok(())
}

#[tokio::test]
async fn a_message_committed_but_not_published_before_a_crash_is_relayed_after_restart()
-> TestResult {
    let dir = tempfile::tempdir()?;
    let config = unhidra_core::Config {
        data_dir: dir.path().to_path_buf(),
        ..unhidra_testkit::config()
    };
    let first = Running::start(config.clone(), unhidra::run).await?;
    let base = first.http();
    let api = Api {
        auth: base.clone(),
        chat: base.clone(),
        history: base,
    };
    let alice = api.user("alice").await?;
    let room = api.create_room(&alice, "private").await?;
    first.stop().await?;

    // What chat-service leaves behind when it dies between its commit and the
    // publish: the sequence taken and the event in the outbox.
    let chat_db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("chat-service.db").display()
    ))
    .await?;
    let message_id = uuid::Uuid::now_v7().to_string();
    let event = json!({
        "v": 1, "room": room, "seq": 1, "message_id": message_id,
        "sender": alice.id, "body": "survived the crash", "sent_at": "2026-11-24T10:00:00Z"
    });
    sqlx::query("UPDATE rooms SET last_seq = 1 WHERE id = $1")
        .bind(&room)
        .execute(&chat_db)
        .await?;
    sqlx::query(
        "INSERT INTO outbox (message_id, room_id, seq, payload, created_at)
         VALUES ($1, $2, 1, $3, 0)",
    )
    .bind(&message_id)
    .bind(&room)
    .bind(event.to_string())
    .execute(&chat_db)
    .await?;
    chat_db.close().await;

    let second = Running::start(config, unhidra::run).await?;
    let base = second.http();
    let api = Api {
        auth: base.clone(),
        chat: base.clone(),
        history: base,
    };
    let page = wait_for_history(&api, &alice, &room, 1).await?;
    assert_eq!(page["messages"][0]["message_id"], message_id.as_str());
    assert_eq!(page["messages"][0]["body"], "survived the crash");
    // The next message continues the sequence.
    let mut ws = connect(&second.ws(), &alice.token).await?;
    send(
        &mut ws,
        json!({"type": "send", "id": "n", "room": room, "body": "next"}),
    )
    .await?;
    assert_eq!(next_of(&mut ws, "ack").await?["seq"], 2);
    second.stop().await
}
