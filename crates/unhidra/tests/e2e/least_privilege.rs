//! Least privilege scaled out: each service runs with its own NATS user,
//! allowed exactly the subjects it uses (the authorization `unhidra
//! nats-config` generates), and its own Postgres role and schema. The stack
//! works end to end on those rights alone, and the rest is refused: by NATS
//! to a process holding the gateway's credentials, by Postgres to a service
//! reading another's tables.

use std::{collections::HashMap, time::Duration};

use async_nats::{ConnectOptions, Event};
use futures::StreamExt;
use tokio::sync::mpsc;
use unhidra_bus::{nats_authorization, password_variable};
use unhidra_core::{Config, bus_access::Role, ids::RoomId, subjects::Subjects};
use unhidra_testkit::{NatsServer, TestDatabase};

use crate::{embedded::one_message_end_to_end, harness::*};

/// The name this test's own NATS clients give the server.
const CLIENT: &str = "least-privilege-test";

/// Where a NATS refusal arrives: the server's errors to one connection.
struct Refusals(mpsc::UnboundedReceiver<String>);

impl Refusals {
    /// The next refusal, which must name `subject`.
    async fn of(&mut self, subject: &str) -> TestResult {
        let error = tokio::time::timeout(WAIT, self.0.recv())
            .await
            .map_err(|_| format!("NATS did not refuse {subject}"))?
            .ok_or("connection gone")?;
        assert!(
            error.contains("Permissions Violation") && error.contains(&format!("\"{subject}\"")),
            "expected a refusal of {subject}, got: {error}"
        );
        Ok(())
    }
}

/// A client holding `user`'s credentials, and the refusals it gets.
async fn connect_as(
    nats: &NatsServer,
    user: &str,
    password: &str,
    inbox: String,
) -> Result<(async_nats::Client, Refusals), Error> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
        .name(CLIENT)
        .custom_inbox_prefix(inbox)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(error) = event {
                    let _ = tx.send(error.to_string());
                }
            }
        })
        .connect(nats.url())
        .await?;
    Ok((client, Refusals(rx)))
}

/// The role name in a Postgres URL.
fn role_of(url: &str) -> Result<&str, Error> {
    let (_, rest) = url.split_once("://").ok_or("no scheme")?;
    Ok(rest.split_once('@').ok_or("no role")?.0)
}

#[tokio::test]
async fn each_service_works_on_its_own_rights_and_nothing_else() -> TestResult {
    let prefix = unhidra_testkit::unique_prefix();
    let subjects = Subjects::new(&prefix);
    let passwords: HashMap<Role, String> = Role::ALL
        .into_iter()
        // NATS reads a variable as a configuration value: a password starting
        // with a digit would be taken for a number.
        .map(|role| (role, format!("p{}", uuid::Uuid::new_v4().simple())))
        .collect();
    let env: Vec<(String, String)> = Role::ALL
        .into_iter()
        .map(|role| (password_variable(role), passwords[&role].clone()))
        .collect();
    let Some(nats) = NatsServer::start(&nats_authorization(&subjects), &env).await? else {
        return Ok(());
    };
    let Some(db) = TestDatabase::postgres().await? else {
        return Ok(());
    };
    // The gateway gets no database at all.
    let mut databases = HashMap::new();
    for role in [Role::AuthApi, Role::Chat, Role::History, Role::Audit] {
        databases.insert(role, db.role(role.name()).await?);
    }
    let base = Config {
        bus_prefix: prefix.clone(),
        ..unhidra_testkit::config()
    };
    let configure = |role: Role, config: Config| Config {
        nats_url: Some(nats.url_as(role.name(), &passwords[&role]).into()),
        database_url: databases.get(&role).map(|url| url.clone().into()),
        ..config
    };
    let stack = Scaled::start_on(base, db, configure, 1, 1).await?;

    // Everything works on these rights: register, log in, a room, a message
    // over the WebSocket to another member, history; and the audit trail,
    // consumed from JetStream by audit-service into its own schema.
    one_message_end_to_end(&stack.api(), &stack.gateway.ws()).await?;
    let audit = sqlx::PgPool::connect(&databases[&Role::Audit]).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rooms_created: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind = 'room_created'")
                .fetch_one(&audit)
                .await?;
        if rooms_created == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room_created audit event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A service cannot read another's tables.
    let chat = sqlx::PgPool::connect(&databases[&Role::Chat]).await?;
    let auth_schema = role_of(&databases[&Role::AuthApi])?;
    let stolen = sqlx::query(&format!("SELECT * FROM \"{auth_schema}\".users"))
        .fetch_all(&chat)
        .await
        .err()
        .ok_or("chat-service read auth-api's users")?;
    assert!(
        stolen.to_string().contains("permission denied for schema"),
        "{stolen}"
    );

    // Nobody connects to NATS without credentials.
    let anonymous = async_nats::connect(nats.url()).await;
    assert!(anonymous.is_err(), "NATS let an anonymous client in");

    // The gateway's credentials cannot act as chat-service (answer sends),
    // as auth-api (answer the JWKS request every verifier trusts), forge a
    // stored room message, read the audit trail or another service's replies.
    let (rogue, mut refusals) = connect_as(
        &nats,
        Role::Gateway.name(),
        &passwords[&Role::Gateway],
        subjects.inbox(Role::Gateway.name()),
    )
    .await?;
    let mut answers_sends = rogue.subscribe(subjects.chat_send()).await?;
    refusals.of(&subjects.chat_send()).await?;
    let mut answers_jwks = rogue.subscribe(subjects.auth_jwks()).await?;
    refusals.of(&subjects.auth_jwks()).await?;
    let forged = subjects.room_messages(RoomId::new());
    rogue.publish(forged.clone(), "forged".into()).await?;
    rogue.flush().await?;
    refusals.of(&forged).await?;
    let _ = rogue.subscribe(subjects.all_audit()).await?;
    refusals.of(&subjects.all_audit()).await?;
    let audit_stream = subjects.audit_stream().name;
    let read_audit = async_nats::jetstream::new(rogue.clone())
        .get_stream(&audit_stream)
        .await;
    assert!(read_audit.is_err(), "the gateway read the audit stream");
    refusals
        .of(&format!("$JS.API.STREAM.INFO.{audit_stream}"))
        .await?;
    let chat_inbox = format!("{}.>", subjects.inbox(Role::Chat.name()));
    let _ = rogue.subscribe(chat_inbox.clone()).await?;
    refusals.of(&chat_inbox).await?;

    // The refused subscriptions never saw the real traffic: a JWKS request
    // (as history-service) is answered by auth-api alone.
    let (history, _) = connect_as(
        &nats,
        Role::History.name(),
        &passwords[&Role::History],
        subjects.inbox(Role::History.name()),
    )
    .await?;
    let jwks = history
        .request(subjects.auth_jwks(), r#"{"v":1}"#.into())
        .await?;
    assert!(
        String::from_utf8_lossy(&jwks.payload).contains("keys"),
        "{jwks:?}"
    );
    one_message_end_to_end(&stack.api(), &stack.gateway.ws()).await?;
    for (what, subscription) in [("jwks", &mut answers_jwks), ("sends", &mut answers_sends)] {
        let heard = tokio::time::timeout(Duration::from_millis(200), subscription.next()).await;
        assert!(
            !matches!(heard, Ok(Some(_))),
            "the gateway's credentials heard {what}"
        );
    }

    // The services themselves were refused nothing: every violation NATS
    // logged was this test's.
    let log = nats.log()?;
    let refused: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("Violation"))
        .collect();
    assert!(!refused.is_empty(), "NATS logged no refusal");
    for line in refused {
        assert!(line.contains(CLIENT), "a service was refused: {line}");
    }
    stack.stop().await?;
    Ok(())
}
