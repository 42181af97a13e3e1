//! The OpenAPI 3.1 document of the HTTP endpoints a process serves, at
//! `GET /api/v1/openapi.json`, with an interactive page at `GET
//! /api/v1/docs`. Each service contributes the paths of its handlers
//! (`#[utoipa::path]`); this module adds what every service shares: the
//! health endpoints, the two credentials (bearer token, `X-API-Key`), the
//! error body, and the refusals any route can answer with (the edge's
//! limits and blocks, timeouts, overload), so the document lists every
//! status a client can meet.

use axum::{
    Router,
    response::{Html, IntoResponse},
    routing::get,
};
use unhidra_core::error::ErrorBody;
use utoipa::{
    Modify, OpenApi,
    openapi::{
        self, Content, Ref, RefOr, Response,
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

/// The credentials an operation may name in its `security`.
pub const BEARER: &str = "bearer";
pub const API_KEY: &str = "api_key";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Unhidra",
        description = "HTTP APIs of Unhidra, a self-hosted real-time messaging backend. \
            Errors share one body: {\"error\": \"snake_case_code\", \"message\": \"...\"}. \
            The WebSocket protocol is described in docs/protocol.md.",
        license(name = "Apache-2.0"),
    ),
    paths(crate::health::healthz, crate::health::readyz, crate::health::metrics),
    components(schemas(ErrorBody)),
    modifiers(&Credentials),
)]
struct Shared;

struct Credentials;

impl Modify for Credentials {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An access token from POST /api/v1/auth/login."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "An API key (uhk_...) from POST /api/v1/api-keys.",
            ))),
        );
    }
}

/// The document of `parts` (one per service of the process), with what
/// every service shares.
pub fn document(parts: impl IntoIterator<Item = openapi::OpenApi>) -> openapi::OpenApi {
    let mut doc = Shared::openapi();
    for part in parts {
        doc.merge(part);
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let api = path.starts_with("/api/") || path.starts_with("/.well-known/") || path == "/ws";
        for (method, operation) in [
            ("get", &mut item.get),
            ("post", &mut item.post),
            ("put", &mut item.put),
            ("patch", &mut item.patch),
            ("delete", &mut item.delete),
        ] {
            let Some(operation) = operation else {
                continue;
            };
            operation.operation_id = Some(operation_id(method, path));
            if api {
                add_refusals(path, operation);
            }
        }
    }
    doc
}

/// A unique id from the method and the path: `post_api_v1_auth_login`,
/// `delete_api_v1_devices_device_id`.
fn operation_id(method: &str, path: &str) -> String {
    let words: Vec<String> = path
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    format!("{method}_{}", words.join("_"))
}

/// The refusals `operation` can answer with besides its own: those of the
/// edge (every API route), of credentials (secured ones), of input (ones
/// that take a body or parameters).
fn add_refusals(path: &str, operation: &mut openapi::path::Operation) {
    let mut add = |status: &str, description: &str| {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| error(description));
    };
    add(
        "403",
        "Refused: `ip_blocked` (the client address is blocked; `Retry-After`), or a reason of the route (`forbidden`, `insufficient_scope`, ...).",
    );
    add(
        "408",
        "`request_timeout`: the request took longer than the server allows.",
    );
    add("413", "`too_large`: the body is over the route's limit.");
    add(
        "429",
        "`rate_limited`: over a rate limit (`Retry-After`, `X-RateLimit-*`).",
    );
    add("500", "`internal`: a server fault; the cause is logged.");
    add(
        "503",
        "`unavailable` or `overloaded`: a dependency did not answer or the server is at capacity; retry (`Retry-After`).",
    );
    if operation.security.is_some() {
        add(
            "401",
            "`unauthenticated`, `invalid_token`, `token_expired` or `session_revoked`: the credential is missing or refused.",
        );
    }
    if path.contains('{') {
        add(
            "404",
            "`not_found`: no such resource (also for a malformed id).",
        );
    }
    if operation.request_body.is_some() {
        add("400", "`malformed_json`: the body is not JSON.");
    }
    if operation.request_body.is_some() || operation.parameters.is_some() {
        add(
            "422",
            "`invalid_input`: well-formed but invalid (wrong types, unknown fields, out of range).",
        );
    }
}

/// A response with the error body.
pub fn error(description: &str) -> RefOr<Response> {
    RefOr::T(
        openapi::ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                Content::new(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody")))),
            )
            .build(),
    )
}

/// `GET /api/v1/openapi.json` and the page that renders it.
pub fn routes(doc: openapi::OpenApi) -> Router {
    let json = match doc.to_json() {
        Ok(json) => json,
        Err(e) => {
            tracing::error!(error = %e, "the OpenAPI document does not serialise");
            String::from("{}")
        }
    };
    Router::new()
        .route(
            "/api/v1/openapi.json",
            get(move || async move {
                ([("content-type", "application/json")], json.clone()).into_response()
            }),
        )
        .route("/api/v1/docs", get(|| async { Html(PAGE) }))
}

/// The interactive page: Scalar's API reference, loaded from a CDN by the
/// browser that opens it, reading this server's document.
const PAGE: &str = r#"<!doctype html>
<html>
  <head>
    <title>Unhidra API</title>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
  </head>
  <body>
    <script id="api-reference" data-url="/api/v1/openapi.json"></script>
    <script src="https://cdn.jsdelivr.net/npm/@scalar/api-reference"></script>
  </body>
</html>
"#;
