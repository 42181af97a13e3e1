//! The one error type of the HTTP APIs and its mapping onto responses with
//! the stable body `{"error": "snake_case_code", "message": "..."}`. Refusals
//! from other services ([`RpcError`]) and from token verification
//! ([`TokenError`]) become API errors here, and nowhere else.

use axum::{
    Json,
    extract::rejection::JsonRejection,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use std::time::Duration;

use unhidra_authn::TokenError;
use unhidra_core::{
    error::ErrorBody,
    rpc::{RpcCode, RpcError},
};
use unhidra_ratelimit::Decision;

/// When a client refused for holding too many connections should try
/// again: long enough for a reconnect loop not to hammer the gateway.
const TOO_MANY_CONNECTIONS_RETRY_SECS: u64 = 5;

/// Everything an API handler can refuse a request with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials, or credentials that do not verify (401).
    #[error("{message}")]
    Unauthenticated { code: &'static str, message: String },
    /// Authenticated but not allowed (403).
    #[error("{0}")]
    Forbidden(String),
    /// Not allowed, for a reason with a code of its own, such as
    /// `registration_closed` (403).
    #[error("{message}")]
    Denied { code: &'static str, message: String },
    /// The resource does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The body is not JSON at all (400).
    #[error("{0}")]
    MalformedJson(String),
    /// The input is well-formed but invalid (422).
    #[error("{0}")]
    Invalid(String),
    /// Well-formed but refused by a policy with a code of its own, such as
    /// `password_too_common` (422).
    #[error("{message}")]
    Unacceptable { code: &'static str, message: String },
    /// The body is larger than the route accepts (413).
    #[error("{0}")]
    TooLarge(String),
    /// A rate limit refused the request (429, with `Retry-After` and the
    /// `X-RateLimit-*` headers).
    #[error("too many requests ({limit}); retry in {} s", crate::limits::whole_seconds(.decision.retry_after).max(1))]
    RateLimited {
        limit: &'static str,
        decision: Decision,
    },
    /// The client address is blocked after repeated failures (403, with
    /// `Retry-After`).
    #[error("this address is blocked after repeated failed logins; retry in {} s", crate::limits::whole_seconds(*.retry_after).max(1))]
    IpBlocked { retry_after: Duration },
    /// The account is locked after repeated failed logins (423, with
    /// `Retry-After`).
    #[error("the account is locked after repeated failed logins; retry in {} s", crate::limits::whole_seconds(*.retry_after).max(1))]
    Locked { retry_after: Duration },
    /// The user or address already holds as many connections as allowed
    /// (429, with `Retry-After`).
    #[error("{0}")]
    TooManyConnections(String),
    /// The server is at capacity for this kind of work right now (503, with
    /// `Retry-After`).
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: Duration,
    },
    /// The request took longer than the server allows (408).
    #[error("the request took too long")]
    Timeout,
    /// Another service refused the request; its code decides the status.
    #[error("{}", .0.message)]
    Refused(RpcError),
    /// Anything else; logged with its cause, shown to clients as `internal`.
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

/// How soon a client refused because the database was busy may retry.
const DATABASE_BUSY_RETRY: Duration = Duration::from_secs(1);

impl From<anyhow::Error> for ApiError {
    /// A busy database is overload (503 `overloaded`, `Retry-After`), not
    /// an internal error; anything else is unexpected.
    fn from(error: anyhow::Error) -> Self {
        if unhidra_store::is_busy(&error) {
            tracing::warn!(error = ?error, "database busy; request refused");
            return Self::Overloaded {
                message: "the server is busy; retry shortly".to_owned(),
                retry_after: DATABASE_BUSY_RETRY,
            };
        }
        Self::Unexpected(error)
    }
}

impl ApiError {
    /// 401 with the generic `unauthenticated` code.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::Unauthenticated {
            code: "unauthenticated",
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::Denied { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::Invalid(_) | Self::Unacceptable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::IpBlocked { .. } => StatusCode::FORBIDDEN,
            Self::Locked { .. } => StatusCode::LOCKED,
            Self::RateLimited { .. } | Self::TooManyConnections(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Refused(e) => StatusCode::from_u16(e.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated { code, .. }
            | Self::Conflict { code, .. }
            | Self::Unacceptable { code, .. }
            | Self::Denied { code, .. } => code,
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::MalformedJson(_) => "malformed_json",
            Self::Invalid(_) => "invalid_input",
            Self::TooLarge(_) => "too_large",
            Self::IpBlocked { .. } => "ip_blocked",
            Self::Locked { .. } => "account_locked",
            Self::RateLimited { .. } => "rate_limited",
            Self::TooManyConnections(_) => "too_many_connections",
            Self::Overloaded { .. } => "overloaded",
            Self::Timeout => "request_timeout",
            Self::Refused(e) => e.code.as_str(),
            Self::Unexpected(_) => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        let message = match self {
            Self::Unexpected(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        ErrorBody {
            error: self.code().to_owned(),
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Unexpected(cause) => tracing::error!(error = ?cause, "request failed"),
            Self::Refused(e) if matches!(e.code, RpcCode::Internal | RpcCode::Unavailable) => {
                tracing::warn!(code = e.code.as_str(), message = %e.message, "dependency failed")
            }
            other => tracing::debug!(code = other.code(), message = %other, "request refused"),
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        match &self {
            Self::RateLimited { decision, .. } => {
                crate::limits::write_headers(response.headers_mut(), decision);
            }
            Self::Overloaded { retry_after, .. }
            | Self::IpBlocked { retry_after }
            | Self::Locked { retry_after } => {
                let seconds = crate::limits::whole_seconds(*retry_after).max(1);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            Self::TooManyConnections(_) => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(TOO_MANY_CONNECTIONS_RETRY_SECS),
                );
            }
            _ => {}
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::Invalid(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => {
                Self::MalformedJson("expected Content-Type: application/json".to_owned())
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::TooLarge("the request body is larger than this route accepts".to_owned())
            }
            other => Self::MalformedJson(other.body_text()),
        }
    }
}

impl From<RpcError> for ApiError {
    fn from(e: RpcError) -> Self {
        Self::Refused(e)
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Unavailable(refusal) => Self::Refused(refusal),
            other => Self::Unauthenticated {
                code: other.code(),
                message: other.to_string(),
            },
        }
    }
}

/// `axum::Json` whose rejections use the Unhidra error body.
#[derive(Debug, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_database_is_overload_with_retry_after_and_other_failures_internal() {
        let busy = anyhow::Error::from(sqlx::Error::PoolTimedOut).context("loading a page");
        let response = ApiError::from(busy).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");

        let broken = ApiError::from(anyhow::Error::from(sqlx::Error::RowNotFound));
        assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(broken.body().message, "internal error");
    }

    #[test]
    fn refusals_keep_their_code_and_fixed_message() {
        let refused = ApiError::from(RpcError::new(RpcCode::Forbidden, "not a member"));
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            refused.body(),
            ErrorBody {
                error: "forbidden".into(),
                message: "not a member".into()
            }
        );
        let internal = ApiError::from(RpcError::new(RpcCode::Internal, "internal error"));
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let expired = ApiError::from(TokenError::Expired);
        assert_eq!(
            (expired.status(), expired.code()),
            (StatusCode::UNAUTHORIZED, "token_expired")
        );
        let hidden = ApiError::from(anyhow::anyhow!("pool timed out on db-7"));
        assert_eq!(hidden.body().message, "internal error");
    }
}
