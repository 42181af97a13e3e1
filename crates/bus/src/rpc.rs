//! Calling the typed request/reply contracts of [`unhidra_core::rpc`]: one
//! client, used by every service and by token verification alike. Transport
//! detail (subject names, NATS errors) is logged here; callers get a fixed,
//! client-safe `unavailable` refusal.

use std::{sync::Arc, time::Duration};

use unhidra_core::{
    rpc::{Rpc, RpcCode, RpcError, RpcReply},
    subjects::Subjects,
};

use crate::{Bus, Headers};

/// Sends requests on a bus under one prefix, waiting a bounded time for each
/// reply.
#[derive(Clone)]
pub struct RpcClient {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    timeout: Duration,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("subjects", &self.subjects)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn unavailable() -> RpcError {
    RpcError::new(
        RpcCode::Unavailable,
        "a service did not answer; retry later",
    )
}

impl RpcClient {
    pub fn new(bus: Arc<dyn Bus>, subjects: Subjects, timeout: Duration) -> Self {
        Self {
            bus,
            subjects,
            timeout,
        }
    }

    /// Sends `request` to `R`'s subject and decodes the reply.
    pub async fn call<R: Rpc>(&self, request: &R::Request) -> Result<R::Reply, RpcError> {
        let subject = R::subject(&self.subjects);
        let payload = serde_json::to_vec(request).map_err(|e| {
            tracing::error!(%subject, error = %e, "request not serialisable");
            RpcError::new(RpcCode::Internal, "internal error")
        })?;
        let reply = self
            .bus
            .request(&subject, Headers::new(), payload.into(), self.timeout)
            .await
            .map_err(|e| {
                tracing::warn!(%subject, error = %e, "request failed");
                unavailable()
            })?;
        match serde_json::from_slice::<RpcReply<R::Reply>>(&reply.payload) {
            Ok(reply) => reply.into(),
            Err(e) => {
                tracing::warn!(%subject, error = %e, "malformed reply");
                Err(unavailable())
            }
        }
    }
}
