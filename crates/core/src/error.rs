//! The one error type of the HTTP APIs and its stable JSON body
//! `{"error": "snake_case_code", "message": "..."}`.

use axum::{
    Json,
    extract::rejection::JsonRejection,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Stable, machine-readable code.
    pub error: String,
    /// Human-readable explanation; never contains internals.
    pub message: String,
}

/// Everything an API handler can refuse a request with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials, or credentials that do not verify (401).
    #[error("{message}")]
    Unauthenticated { code: &'static str, message: String },
    /// Authenticated but not allowed (403).
    #[error("{0}")]
    Forbidden(String),
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
    /// A dependency (database, bus, another service) did not answer (503).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else; logged with its cause, shown to clients as `internal`.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
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
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated { code, .. } | Self::Conflict { code, .. } => code,
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::MalformedJson(_) => "malformed_json",
            Self::Invalid(_) => "invalid_input",
            Self::Unavailable(_) => "unavailable",
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
            Self::Unavailable(reason) => tracing::warn!(%reason, "dependency unavailable"),
            other => tracing::debug!(code = other.code(), message = %other, "request refused"),
        }
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::Invalid(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => {
                Self::MalformedJson("expected Content-Type: application/json".to_owned())
            }
            other => Self::MalformedJson(other.body_text()),
        }
    }
}

/// `axum::Json` whose rejections use the Unhidra error body.
#[derive(Debug, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl From<crate::events::RpcError> for ApiError {
    fn from(e: crate::events::RpcError) -> Self {
        match e.code.as_str() {
            "forbidden" => Self::Forbidden(e.message),
            "not_found" => Self::NotFound(e.message),
            "invalid_input" => Self::Invalid(e.message),
            "unavailable" => Self::Unavailable(e.message),
            _ => Self::Unexpected(anyhow::anyhow!("{}: {}", e.code, e.message)),
        }
    }
}
