//! The OpenAPI document as an API client's tooling reads it: OpenAPI 3.1 at
//! `/api/v1/openapi.json`, every endpoint of every service in it with unique
//! operation ids, an interactive page, and (a quick check here; schemathesis
//! fuzzes it in `.ci/api-fuzz`) each operation answering an anonymous,
//! empty request with a status the document lists.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::harness::*;

#[tokio::test]
async fn the_openapi_document_lists_every_endpoint_and_the_statuses_they_answer() -> TestResult {
    let stack = Embedded::start().await?;
    let base = stack.app.http();
    let (status, doc) = get(&format!("{base}/api/v1/openapi.json"), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().ok_or("paths")?;
    for expected in [
        "/api/v1/auth/register",
        "/api/v1/auth/login",
        "/api/v1/auth/sessions/{session_id}",
        "/api/v1/api-keys/{key_id}/rotate",
        "/api/v1/admin/users/{user_id}",
        "/api/v1/rooms/{room_id}/join",
        "/api/v1/rooms/{room_id}/messages",
        "/.well-known/jwks.json",
        "/ws",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains_key(expected), "{expected} is not documented");
    }

    let mut ids = std::collections::HashSet::new();
    let mut checked = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().ok_or("path item")? {
            let id = operation["operationId"].as_str().ok_or("operationId")?;
            assert!(ids.insert(id.to_owned()), "operationId {id} twice");
            let responses = operation["responses"].as_object().ok_or("responses")?;
            let url = format!("{base}{}", path.replace(['{', '}'], "").replace("_id", ""));
            let method = Method::from_bytes(method.to_uppercase().as_bytes())?;
            let response = http().request(method.clone(), &url).send().await?;
            let status = response.status().as_u16().to_string();
            assert!(
                responses.contains_key(&status),
                "{method} {path} answered {status}, documented {:?}",
                responses.keys().collect::<Vec<_>>()
            );
            if response.status().is_client_error() {
                let body: Value = response.json().await?;
                assert!(body["error"].is_string(), "{method} {path}: {body}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 45, "{checked} operations");

    let page = http().get(format!("{base}/api/v1/docs")).send().await?;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await?.contains("/api/v1/openapi.json"));
    stack.app.stop().await
}
