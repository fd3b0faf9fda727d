//! sluice: an OpenAI-compatible LLM API gateway.
//!
//! The request path, in the order a request meets it: [`server`] accepts,
//! [`service`] routes by path, [`access`] checks the client, [`proxy`] reads,
//! routes and forwards, and [`proxy::body`] streams the answer back.

pub mod access;
pub mod admin;
pub mod body;
pub mod clock;
pub mod config;
pub mod error;
pub mod ids;
pub mod mock;
pub mod notify;
pub mod probe;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod state;
pub mod telemetry;

/// The crate version, reported by `/health` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
