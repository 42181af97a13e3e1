//! The shared vocabulary of Unhidra: ids, the API error and its JSON body, typed
//! configuration, the client wire protocol, access-token claims, and the bus
//! subjects and event payloads every service agrees on.

pub mod config;
pub mod error;
pub mod events;
pub mod ids;
pub mod protocol;
pub mod subjects;
pub mod token;

pub use config::Config;
pub use error::ApiError;
