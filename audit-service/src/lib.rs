//! audit-service records the security events the other services publish
//! (registrations, logins and their failures, room creation) from a durable
//! consumer of the audit stream: stored once per event id, acknowledged after
//! the commit. Query, export, hash chaining and retention come later.

mod repo;

use axum::Router;
use tokio::net::TcpListener;
use unhidra_core::{Config, events::AuditEvent};
use unhidra_runtime::{
    Service, ServiceContext,
    recorder::{self, Record},
};
use unhidra_store::{Database, Migration};

use crate::repo::AuditRepo;

pub const NAME: &str = unhidra_core::bus_access::Role::Audit.name();
pub const DEFAULT_PORT: u16 = 9500;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "audit_events",
        sql: include_str!("../migrations/0001_audit_events.sql"),
        only_on: None,
    },
    Migration {
        version: 2,
        name: "origins",
        sql: include_str!("../migrations/0002_origins.sql"),
        only_on: None,
    },
];

/// Migrates and starts the durable consumer of the audit stream.
pub async fn build(ctx: ServiceContext, db: Database) -> anyhow::Result<Service> {
    db.migrate(NAME, MIGRATIONS).await?;
    ctx.bus.ensure_stream(&ctx.subjects.audit_stream()).await?;
    let audit = AuditRepo::new(db.clone());
    let stored = ctx.metrics.counter(
        "unhidra_audit_events_stored_total",
        "Security events committed to the audit log (duplicates excluded).",
    )?;
    let recorder =
        recorder::spawn_recorder(&ctx, ctx.subjects.audit_consumer(), stored, audit).await?;
    Ok(Service {
        name: NAME,
        router: Router::new(),
        openapi: utoipa::openapi::OpenApi::default(),
        database: Some(db),
        tasks: vec![recorder],
        fallback: None,
    })
}

impl Record for AuditRepo {
    type Event = AuditEvent;

    async fn store(&self, events: &[AuditEvent]) -> anyhow::Result<u64> {
        self.insert(events).await
    }

    fn stored(&self, _event: &AuditEvent) {}
}

/// Runs audit-service alone on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    unhidra_runtime::run_service(listener, config, shutdown, NAME, build).await
}
