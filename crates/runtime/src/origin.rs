//! Where the HTTP request being handled came from (client address and user
//! agent), kept for the request's duration by the edge middleware, so that
//! every audit event a handler records names them, and the request id,
//! without each handler passing them along.

use axum::http::{HeaderMap, header::USER_AGENT};
use unhidra_core::events::AuditEvent;
use unhidra_telemetry::request_id;

use crate::ClientIp;

/// The longest user agent kept; longer ones are cut.
const MAX_USER_AGENT_CHARS: usize = 256;

tokio::task_local! {
    static CURRENT: RequestOrigin;
}

#[derive(Debug, Clone)]
pub struct RequestOrigin {
    client_ip: ClientIp,
    user_agent: Option<String>,
}

impl RequestOrigin {
    pub fn new(client_ip: ClientIp, headers: &HeaderMap) -> Self {
        let user_agent = headers
            .get(USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .map(|ua| {
                ua.chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_USER_AGENT_CHARS)
                    .collect::<String>()
            })
            .filter(|ua| !ua.is_empty());
        Self {
            client_ip,
            user_agent,
        }
    }

    /// Runs `work` as coming from this origin.
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }
}

/// Fills in what `event` does not say yet: the client address and user
/// agent of the request being handled, and its request id.
pub fn stamp(event: &mut AuditEvent) {
    if event.request_id.is_none() {
        event.request_id = request_id::current();
    }
    // Outside a request (a background task), there is nothing to add.
    let _ = CURRENT.try_with(|origin| {
        event
            .client_ip
            .get_or_insert_with(|| origin.client_ip.to_string());
        if event.user_agent.is_none() {
            event.user_agent.clone_from(&origin.user_agent);
        }
    });
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use unhidra_core::events::AuditKind;

    use super::*;

    #[tokio::test]
    async fn events_inside_a_request_name_its_origin_and_others_nothing()
    -> Result<(), axum::http::header::InvalidHeaderValue> {
        let mut headers = HeaderMap::new();
        headers.insert(USER_AGENT, HeaderValue::from_bytes(b"bot/1.0\t (linux)")?);
        let ip = ClientIp::resolve([203, 0, 113, 9].into(), &HeaderMap::new(), &[]);
        let event = RequestOrigin::new(ip, &headers)
            .scope(request_id::scope("test", "req-7".into(), async {
                let mut event = AuditEvent::new(AuditKind::LoginFailed, None, None);
                stamp(&mut event);
                event
            }))
            .await;
        assert_eq!(event.client_ip.as_deref(), Some("203.0.113.9"));
        assert_eq!(event.user_agent.as_deref(), Some("bot/1.0 (linux)"));
        assert_eq!(event.request_id.as_deref(), Some("req-7"));

        let mut outside = AuditEvent::new(AuditKind::LoginFailed, None, None);
        stamp(&mut outside);
        assert_eq!(
            (outside.client_ip, outside.user_agent, outside.request_id),
            (None, None, None)
        );
        Ok(())
    }
}
