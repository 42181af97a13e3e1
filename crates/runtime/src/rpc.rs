//! Answering the typed request/reply contracts of [`unhidra_core::rpc`]:
//! requests decoded as `R::Request`, replies encoded as `RpcReply<R::Reply>`,
//! a bounded number handled at once. Calls go through
//! [`crate::ServiceContext::rpc`].

use std::{future::Future, sync::Arc};

use futures::StreamExt;
use tokio::{sync::Semaphore, task::JoinHandle};
use unhidra_bus::Headers;
use unhidra_core::rpc::{Rpc, RpcCode, RpcError, RpcReply};
use unhidra_telemetry::request_id;

use crate::ServiceContext;

/// Requests one responder handles concurrently.
const MAX_IN_FLIGHT: usize = 256;

/// Answers `R` (shared with the replicas in `group`) until shutdown. The
/// subscription exists when this returns.
pub async fn respond<R, F, Fut>(
    ctx: &ServiceContext,
    group: &str,
    handler: F,
) -> anyhow::Result<JoinHandle<()>>
where
    R: Rpc,
    F: Fn(R::Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R::Reply, RpcError>> + Send + 'static,
{
    let subject = R::subject(&ctx.subjects);
    let mut requests = ctx.bus.subscribe_queue(&subject, group).await?;
    let bus = Arc::clone(&ctx.bus);
    let shutdown = ctx.shutdown.clone();
    let in_flight = ctx.in_flight.clone();
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    Ok(tokio::spawn(async move {
        loop {
            let mut request = tokio::select! {
                () = shutdown.cancelled() => break,
                next = requests.next() => match next {
                    Some(request) => request,
                    None => break,
                },
            };
            let Some(reply_to) = request.reply.take() else {
                tracing::warn!(%subject, "request without reply subject ignored");
                continue;
            };
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let bus = Arc::clone(&bus);
            let handler = Arc::clone(&handler);
            let subject = subject.clone();
            in_flight.spawn(async move {
                let _permit = permit;
                let headers = std::mem::take(&mut request.headers);
                request_id::scope_from(&subject.clone(), &headers, async move {
                    let reply: RpcReply<R::Reply> =
                        match serde_json::from_slice::<R::Request>(&request.payload) {
                            Ok(req) => handler(req).await.into(),
                            Err(e) => {
                                tracing::warn!(%subject, error = %e, "malformed request");
                                RpcReply::Err(RpcError::new(
                                    RpcCode::InvalidInput,
                                    "malformed request",
                                ))
                            }
                        };
                    match serde_json::to_vec(&reply) {
                        Ok(body) => {
                            if let Err(e) =
                                bus.publish(&reply_to, Headers::new(), body.into()).await
                            {
                                tracing::warn!(%subject, error = %e, "reply not sent");
                            }
                        }
                        Err(e) => tracing::error!(%subject, error = %e, "reply not serialisable"),
                    }
                })
                .await;
            });
        }
    }))
}
