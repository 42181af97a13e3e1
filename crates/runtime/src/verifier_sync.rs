//! Keeps the process's token verifier current. Revoked sessions: every
//! announcement on the `auth.sessions.revoked` subject goes into the verifier
//! at once, and at start the verifier loads what auth-api still holds
//! (retrying until auth-api answers), so a process that starts late refuses
//! revoked sessions too. Signing keys: the keys auth-api announces on
//! `auth.keys.changed` (after a rotation) are taken at once, and the JWKS is
//! fetched again every [`KEYS_REFRESH`] besides, so keys retired by a
//! rotation stop verifying even if an announcement was missed.

use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use unhidra_core::{events::SessionsRevoked, token::Jwks};

use crate::ServiceContext;

/// Between two attempts to load the revocations at start.
const SYNC_RETRY: Duration = Duration::from_secs(1);

/// Between two fetches of the JWKS.
pub const KEYS_REFRESH: Duration = Duration::from_secs(60);

pub fn spawn(ctx: &ServiceContext) -> JoinHandle<()> {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let (revoked, keys_changed) = (
            ctx.subjects.sessions_revoked(),
            ctx.subjects.signing_keys_changed(),
        );
        let subscribed = tokio::try_join!(
            ctx.bus.subscribe(&revoked),
            ctx.bus.subscribe(&keys_changed),
        );
        let (mut announcements, mut key_changes) = match subscribed {
            Ok(subscriptions) => subscriptions,
            Err(e) => {
                tracing::error!(error = %e, "token verifier not kept current: no subscription");
                return;
            }
        };
        let mut synced = false;
        let mut retry = tokio::time::interval(SYNC_RETRY);
        let mut keys = tokio::time::interval(KEYS_REFRESH);
        keys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                change = key_changes.next() => {
                    let Some(message) = change else { return };
                    match serde_json::from_slice::<Jwks>(&message.payload) {
                        Ok(jwks) => ctx.verifier.install_keys(&jwks),
                        Err(e) => tracing::warn!(error = %e, "unreadable signing keys ignored"),
                    }
                }
                _ = retry.tick(), if !synced => match ctx.verifier.sync_revocations().await {
                    Ok(count) => {
                        synced = true;
                        tracing::debug!(count, "revoked sessions loaded");
                    }
                    Err(e) => tracing::debug!(error = %e, "revoked sessions not loaded yet; retrying"),
                },
                _ = keys.tick() => if let Err(e) = ctx.verifier.refresh_keys().await {
                    tracing::warn!(error = %e, "signing keys not refreshed; verifying with the ones fetched before");
                },
            }
        }
    })
}
