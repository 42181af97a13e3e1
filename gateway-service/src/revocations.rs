//! Revoked sessions lose their sockets: every announcement on
//! `auth.sessions.revoked` closes this gateway's connections of those
//! sessions with 4003 (the token verifier already refuses their handshakes).

use std::sync::Arc;

use futures::StreamExt;
use tokio::task::JoinHandle;
use unhidra_core::events::SessionsRevoked;

use crate::Gateway;

pub async fn spawn(gateway: Arc<Gateway>) -> anyhow::Result<JoinHandle<()>> {
    let mut announcements = gateway
        .ctx
        .bus
        .subscribe(&gateway.ctx.subjects.sessions_revoked())
        .await?;
    let shutdown = gateway.ctx.shutdown.clone();
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                message = announcements.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let revoked: SessionsRevoked = match serde_json::from_slice(&message.payload) {
                Ok(revoked) => revoked,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable revocation ignored");
                    continue;
                }
            };
            let closed = gateway
                .registry
                .close_sessions(revoked.user, &revoked.sessions);
            if closed > 0 {
                gateway.metrics.revoked.inc_by(closed as u64);
                tracing::info!(user_id = %revoked.user, closed, "connections of revoked sessions closed");
            }
        }
    }))
}
