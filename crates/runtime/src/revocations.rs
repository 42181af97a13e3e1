//! Keeps the process's revoked sessions current: every announcement on the
//! `auth.sessions.revoked` subject goes into the token verifier at once, and
//! at start the verifier loads what auth-api still holds (retrying until
//! auth-api answers), so a process that starts late refuses revoked
//! sessions too.

use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use unhidra_core::events::SessionsRevoked;

use crate::ServiceContext;

/// Between two attempts to load the revocations at start.
const SYNC_RETRY: Duration = Duration::from_secs(1);

pub fn spawn(ctx: &ServiceContext) -> JoinHandle<()> {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut announcements = match ctx.bus.subscribe(&ctx.subjects.sessions_revoked()).await {
            Ok(subscription) => subscription,
            Err(e) => {
                tracing::error!(error = %e, "revoked sessions will not be refused: no subscription");
                return;
            }
        };
        let mut synced = false;
        let mut retry = tokio::time::interval(SYNC_RETRY);
        loop {
            tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                announcement = announcements.next() => {
                    let Some(message) = announcement else { return };
                    match serde_json::from_slice::<SessionsRevoked>(&message.payload) {
                        Ok(revoked) => ctx.verifier.revoke(&revoked),
                        Err(e) => tracing::warn!(error = %e, "unreadable revocation ignored"),
                    }
                }
                _ = retry.tick(), if !synced => match ctx.verifier.sync_revocations().await {
                    Ok(count) => {
                        synced = true;
                        tracing::debug!(count, "revoked sessions loaded");
                    }
                    Err(e) => tracing::debug!(error = %e, "revoked sessions not loaded yet; retrying"),
                },
            }
        }
    })
}
