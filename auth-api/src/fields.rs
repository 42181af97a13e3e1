//! The two field rules every auth-api route shares: user-given names are 1
//! to N printable characters (trimmed), and stored Unix milliseconds are
//! shown as RFC 3339 times.

use chrono::{DateTime, Utc};
use unhidra_runtime::ApiError;

/// `text` trimmed, if it is 1 to `max` printable characters; otherwise a
/// 422 that names `what`.
pub fn printable(what: &str, text: &str, max: usize) -> Result<String, ApiError> {
    let text = text.trim();
    let length = text.chars().count();
    if length == 0 || length > max || text.chars().any(char::is_control) {
        return Err(ApiError::Invalid(format!(
            "{what} must be 1 to {max} printable characters"
        )));
    }
    Ok(text.to_owned())
}

/// A stored time (Unix milliseconds).
pub fn time(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap_or_default()
}
