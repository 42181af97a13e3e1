//! The shared vocabulary of Unhidra: ids, room roles, the HTTP error body,
//! typed configuration, the client wire protocol, access-token claims, the bus
//! subjects, streams and event payloads, and the typed request/reply contracts
//! every service agrees on. A leaf crate: serde-level dependencies only.

pub mod api_keys;
pub mod bus_access;
pub mod clock;
pub mod config;
pub mod error;
pub mod events;
pub mod ids;
mod names;
pub mod protocol;
pub mod rate;
pub mod rooms;
pub mod routes;
pub mod rpc;
pub mod streams;
pub mod subjects;
pub mod timestamps;
pub mod token;
pub mod users;

pub use config::Config;
