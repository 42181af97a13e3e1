//! The audit log: security events, stored once each.

use unhidra_core::events::AuditEvent;
use unhidra_store::{Database, now_millis};

#[derive(Clone, Debug)]
pub struct AuditRepo {
    db: Database,
}

impl AuditRepo {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Appends events, skipping those whose id is already stored; returns
    /// how many were new. Each statement (of up to 512 events) commits on
    /// its own: what one that failed left out is stored when the events
    /// come again, and the rest is skipped then.
    pub async fn insert(&self, events: &[AuditEvent]) -> anyhow::Result<u64> {
        let now = now_millis();
        let mut write = self.db.write_connection().await?;
        let inserted = self
            .db
            .insert_rows(
                write.conn(),
                "audit_events (id, kind, actor, subject, detail, occurred_at, recorded_at,
                     client_ip, user_agent, request_id)",
                10,
                "ON CONFLICT DO NOTHING",
                events,
                |query, event| {
                    Ok(query
                        .bind(event.id.to_string())
                        .bind(event.kind.as_str())
                        .bind(event.actor.map(|a| a.to_string()))
                        .bind(event.subject.as_deref())
                        .bind(event.detail.to_string())
                        .bind(event.at.timestamp_millis())
                        .bind(now)
                        .bind(event.client_ip.as_deref())
                        .bind(event.user_agent.as_deref())
                        .bind(event.request_id.as_deref()))
                },
            )
            .await?;
        Ok(inserted)
    }
}

#[cfg(test)]
mod conformance {
    //! One suite on SQLite and on Postgres.

    use unhidra_core::{
        events::{AuditEvent, AuditKind},
        ids::UserId,
    };
    use unhidra_testkit::on_each_database;

    use super::*;
    use crate::{MIGRATIONS, NAME};

    /// id, kind, actor, subject, detail, occurred_at.
    type Row = (
        String,
        String,
        Option<String>,
        Option<String>,
        String,
        i64,
        Option<String>,
        Option<String>,
        Option<String>,
    );

    #[tokio::test]
    async fn events_are_appended_once_with_every_field() -> anyhow::Result<()> {
        on_each_database(|db| async move {
            let database = Database::connect(db.url(), 2).await?;
            database.migrate(NAME, MIGRATIONS).await?;
            let audit = AuditRepo::new(database.clone());
            let actor = UserId::new();
            let mut failed = AuditEvent::new(
                AuditKind::LoginFailed,
                Some(actor),
                Some("x'); DROP TABLE audit_events; --@example.com".into()),
            );
            failed.detail = serde_json::json!({"reason": "bad credentials"});
            failed.client_ip = Some("203.0.113.7".into());
            failed.user_agent = Some("curl/8.0".into());
            failed.request_id = Some("req-1".into());
            let created = AuditEvent::new(AuditKind::RoomCreated, None, None);
            assert_eq!(audit.insert(std::slice::from_ref(&failed)).await?, 1);
            assert_eq!(
                audit.insert(&[failed.clone(), created.clone()]).await?,
                1,
                "a redelivery is absorbed"
            );

            let rows: Vec<Row> = sqlx::query_as(
                "SELECT id, kind, actor, subject, detail, occurred_at, client_ip, user_agent,
                     request_id FROM audit_events ORDER BY kind",
            )
            .fetch_all(&database.pool)
            .await?;
            assert_eq!(
                rows,
                vec![
                    (
                        failed.id.to_string(),
                        "login_failed".into(),
                        Some(actor.to_string()),
                        failed.subject.clone(),
                        r#"{"reason":"bad credentials"}"#.into(),
                        failed.at.timestamp_millis(),
                        Some("203.0.113.7".into()),
                        Some("curl/8.0".into()),
                        Some("req-1".into()),
                    ),
                    (
                        created.id.to_string(),
                        "room_created".into(),
                        None,
                        None,
                        "null".into(),
                        created.at.timestamp_millis(),
                        None,
                        None,
                        None,
                    ),
                ]
            );
            Ok(())
        })
        .await
    }
}
