//! End-to-end tests: real HTTP and WebSocket clients against the embedded
//! all-in-one process and against the services scaled out over real NATS
//! JetStream and Postgres.

mod admin;
mod api_keys;
mod bad_input;
mod embedded;
mod entry;
mod feeds;
mod harness;
mod keys;
mod least_privilege;
mod limits;
mod liveness;
mod openapi;
mod pipelining;
mod presence;
mod refresh;
mod resume;
mod scaled;
mod sessions;
mod tls;
mod typing;
