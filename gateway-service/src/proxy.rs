//! The one public entry point of a scaled-out deployment: a request for a
//! path the gateway does not serve itself goes to the service that owns it
//! ([`unhidra_core::routes`]), at the URL the configuration gives
//! (`UNHIDRA_AUTH_API_URL`, `UNHIDRA_CHAT_URL`, `UNHIDRA_HISTORY_URL`). The
//! request keeps its method, path, query, headers and body (cut off at the
//! API's body limit), gains the client's address in
//! `X-Forwarded-For` (the services trust the gateway as a proxy), the
//! request id and the trace context; the answer comes back as the service
//! gave it. A service that cannot be reached, or that does not answer within
//! the request timeout, is `unavailable` (503); a path nobody owns is
//! `not_found` (404). Forwarding runs outside the gateway's API guard: the
//! owning service applies the limits, blocks and timeouts to the client this
//! names, once.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, header},
    response::{IntoResponse, Response},
};
use futures::TryStreamExt;
use http_body_util::{LengthLimitError, Limited};
use ipnet::IpNet;
use unhidra_core::{
    Config,
    routes::{self, Upstream},
    rpc::{RpcCode, RpcError},
};
use unhidra_runtime::{ApiError, ClientIp};
use unhidra_telemetry::request_id;

/// Headers that belong to one hop and are not passed on.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where each service is, and one HTTP client pooling connections to them.
#[derive(Clone)]
pub struct Upstreams {
    client: reqwest::Client,
    /// Bytes of a request body passed on at most, whether or not it declared
    /// its length (`UNHIDRA_HTTP_BODY_LIMIT_BYTES`).
    body_limit: usize,
    /// Who may name the client in `X-Forwarded-For` (`UNHIDRA_TRUSTED_PROXIES`).
    trusted_proxies: Vec<IpNet>,
    auth_api: Option<String>,
    chat: Option<String>,
    history: Option<String>,
}

impl Upstreams {
    /// `None` when the configuration names no service: the gateway then
    /// answers only its own paths.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Self>> {
        let base = |url: &Option<String>| url.as_ref().map(|u| u.trim_end_matches('/').to_owned());
        let upstreams = Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(config.http_request_timeout_secs))
                .connect_timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            body_limit: config.http_body_limit_bytes,
            trusted_proxies: config.trusted_proxies.clone(),
            auth_api: base(&config.auth_api_url),
            chat: base(&config.chat_url),
            history: base(&config.history_url),
        };
        let any =
            upstreams.auth_api.is_some() || upstreams.chat.is_some() || upstreams.history.is_some();
        Ok(any.then_some(upstreams))
    }

    fn base(&self, upstream: Upstream) -> Option<&str> {
        match upstream {
            Upstream::AuthApi => self.auth_api.as_deref(),
            Upstream::Chat => self.chat.as_deref(),
            Upstream::History => self.history.as_deref(),
        }
    }
}

/// Passes `request` to the service that owns its path. It is not counted
/// against the client's limits here: the owning service counts it, with the
/// client this decides.
pub async fn forward(
    State(upstreams): State<Upstreams>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Response, ApiError> {
    let ClientIp(client) =
        ClientIp::resolve(peer.ip(), request.headers(), &upstreams.trusted_proxies);
    let path = request.uri().path();
    let Some((upstream, base)) =
        routes::owner(path).and_then(|owner| Some((owner, upstreams.base(owner)?)))
    else {
        return Err(ApiError::NotFound(format!("no route for {path}")));
    };
    let target = match request.uri().path_and_query() {
        Some(path_and_query) => format!("{base}{path_and_query}"),
        None => format!("{base}{path}"),
    };
    let (parts, body) = request.into_parts();
    let mut headers = passed_on(&parts.headers);
    headers.remove(header::HOST);
    stamp(&mut headers, client);
    let answer = upstreams
        .client
        .request(parts.method, &target)
        .headers(headers)
        .body(reqwest::Body::wrap_stream(
            Body::new(Limited::new(body, upstreams.body_limit)).into_data_stream(),
        ))
        .send()
        .await
        .map_err(|e| refusal(upstream, &e, upstreams.body_limit))?;
    let mut response = Response::builder().status(answer.status());
    if let Some(headers) = response.headers_mut() {
        *headers = passed_on(answer.headers());
    }
    let body = Body::from_stream(answer.bytes_stream().map_err(axum::Error::new));
    Ok(response
        .body(body)
        .map_err(|e| ApiError::Unexpected(e.into()))?
        .into_response())
}

fn passed_on(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    for name in &HOP_BY_HOP {
        kept.remove(name);
    }
    kept
}

/// The client's address, replacing any `X-Forwarded-For` it sent (the
/// gateway already decided who the client is), and the request id and trace
/// context of this request.
fn stamp(headers: &mut HeaderMap, client: IpAddr) {
    headers.remove(header::FORWARDED);
    if let Ok(value) = HeaderValue::from_str(&client.to_string()) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), value);
    }
    let mut context = BTreeMap::new();
    request_id::stamp(&mut context);
    for (name, value) in context {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(name, value);
        }
    }
}

/// Why a request could not be passed on: its body ran over the limit (413),
/// or the service did not answer (503).
fn refusal(upstream: Upstream, error: &reqwest::Error, limit: usize) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error.is::<LengthLimitError>() {
            return ApiError::TooLarge(format!("the request body is larger than {limit} bytes"));
        }
        cause = error.source();
    }
    tracing::warn!(upstream = upstream.as_str(), error = %error, "service did not answer");
    ApiError::Refused(RpcError::new(
        RpcCode::Unavailable,
        format!("{} is unavailable; retry shortly", upstream.as_str()),
    ))
}
