//! auth-api
