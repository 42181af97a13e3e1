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

#[cfg(test)]
mod tests {
    use unhidra_core::{
        Config,
        events::SCHEMA_VERSION,
        ids::{RoomId, UserId},
        rooms::Role,
        rpc::{Membership, MembershipRequest, RpcReply},
    };

    use super::*;

    #[tokio::test]
    async fn typed_calls_are_answered_refused_and_never_leak_transport_detail() -> anyhow::Result<()>
    {
        let ctx =
            ServiceContext::connect("test", Config::default(), std::future::pending()).await?;
        let (room, owner, stranger) = (RoomId::new(), UserId::new(), UserId::new());
        let ask = |user| MembershipRequest {
            v: SCHEMA_VERSION,
            room,
            user,
        };

        // Nobody answers yet: a fixed refusal that names no subject.
        let refused = ctx.rpc.call::<Membership>(&ask(owner)).await;
        let Err(refused) = refused else {
            anyhow::bail!("answered without a responder: {refused:?}");
        };
        assert_eq!(refused.code, RpcCode::Unavailable);
        assert!(!refused.message.contains(&ctx.subjects.chat_membership()));

        respond::<Membership, _, _>(&ctx, "test", move |request| async move {
            if request.user == owner {
                Ok(Role::Owner)
            } else {
                Err(RpcError::new(RpcCode::Forbidden, "not a member"))
            }
        })
        .await?;
        assert_eq!(
            ctx.rpc.call::<Membership>(&ask(owner)).await,
            Ok(Role::Owner)
        );
        assert_eq!(
            ctx.rpc.call::<Membership>(&ask(stranger)).await,
            Err(RpcError::new(RpcCode::Forbidden, "not a member"))
        );

        // A request of the wrong shape is refused as invalid input.
        let reply = ctx
            .bus
            .request(
                &ctx.subjects.chat_membership(),
                Headers::new(),
                bytes::Bytes::from_static(br#"{"room": 5}"#),
                ctx.config.bus_timeout(),
            )
            .await?;
        let reply: RpcReply<Role> = serde_json::from_slice(&reply.payload)?;
        assert_eq!(
            reply,
            RpcReply::Err(RpcError::new(RpcCode::InvalidInput, "malformed request"))
        );
        ctx.shutdown.cancel();
        Ok(())
    }
}
