//! The one error body of the HTTP APIs:
//! `{"error": "snake_case_code", "message": "..."}`. The error type that
//! produces it, and its mapping to HTTP, live with the HTTP glue in
//! `unhidra-runtime`.

use serde::{Deserialize, Serialize};

/// The body of every error response.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Stable, machine-readable code.
    pub error: String,
    /// Human-readable explanation; never contains internals.
    pub message: String,
}
