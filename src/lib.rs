//! sluice: an OpenAI-compatible LLM API gateway.
//!
//! Modules depend one way, down this list: [`config`], [`clock`], [`ids`] and
//! [`tasks`] at the bottom; [`error`]; [`telemetry`] (the per-request record,
//! metrics, the request log); [`upstream`] (long-lived: keys, breakers, pooled
//! clients); [`routes`] and [`access`]; [`cache`] (the response cache);
//! [`state`] (the reloadable snapshot);
//! [`proxy`] (the per-request stages); [`admin`] and [`service`] (the pipeline);
//! [`server`] (listeners); [`shutdown`], [`notify`] and the [`mock`] upstream;
//! [`cli`] (the store's commands) last.

pub mod access;
pub mod admin;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod ids;
pub mod mock;
pub mod notify;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod state;
pub mod tasks;
pub mod telemetry;
pub mod upstream;

/// The crate version, reported by `/health` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
