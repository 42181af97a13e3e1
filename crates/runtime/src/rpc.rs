//! Request/reply between services over the bus: JSON requests, replies shaped
//! as [`RpcReply`], a bounded number of requests handled at once.

use std::{future::Future, sync::Arc};

use futures::StreamExt;
use serde::{Serialize, de::DeserializeOwned};
use tokio::{sync::Semaphore, task::JoinHandle};
use unhidra_bus::{BusError, Headers};
use unhidra_core::events::{RpcError, RpcReply};
use unhidra_telemetry::request_id;

use crate::ServiceContext;

/// Requests one responder handles concurrently.
const MAX_IN_FLIGHT: usize = 256;

/// Answers requests on `subject` (shared with the replicas in `group`) until
/// shutdown. The subscription exists when this returns.
pub async fn respond<Req, Resp, F, Fut>(
    ctx: &ServiceContext,
    subject: String,
    group: &str,
    handler: F,
) -> anyhow::Result<JoinHandle<()>>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = RpcReply<Resp>> + Send + 'static,
{
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
                    let reply = match serde_json::from_slice::<Req>(&request.payload) {
                        Ok(req) => handler(req).await,
                        Err(e) => {
                            tracing::warn!(%subject, error = %e, "malformed request");
                            RpcReply::err("invalid_input", "malformed request")
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

/// Sends a request and decodes the reply; bus failures become `unavailable`.
pub async fn call<Req, Resp>(
    ctx: &ServiceContext,
    subject: &str,
    request: &Req,
) -> Result<Resp, RpcError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let unavailable = |message: String| RpcError {
        code: "unavailable".to_owned(),
        message,
    };
    let payload = serde_json::to_vec(request).map_err(|e| RpcError {
        code: "internal".to_owned(),
        message: e.to_string(),
    })?;
    let reply = ctx
        .bus
        .request(
            subject,
            Headers::new(),
            payload.into(),
            ctx.config.bus_timeout(),
        )
        .await
        .map_err(|e: BusError| unavailable(e.to_string()))?;
    match serde_json::from_slice::<RpcReply<Resp>>(&reply.payload) {
        Ok(RpcReply::Ok(resp)) => Ok(resp),
        Ok(RpcReply::Err(e)) => Err(e),
        Err(e) => Err(unavailable(format!("malformed reply on {subject}: {e}"))),
    }
}
