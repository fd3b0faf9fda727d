//! Integration tests: the gateway and the bundled mock on port 0, in process
//! (and the real binary where signals matter), asserting the mock's counters.

// Test code: a failed unwrap is a failed test, which is what it should be.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The test crate is its own root: its helpers are `pub` for the test modules only.
#![allow(unreachable_pub)]

mod support;

mod attacks;
mod binary;
mod breaker;
mod cache;
mod cli;
mod cluster;
mod edge;
mod errors;
mod event_loops;
mod h2pool;
mod http2;
mod keys;
mod mock;
mod observability;
mod operator;
mod ops;
mod reload;
mod retries;
mod routing;
mod shortcuts;
mod store_binary;
mod store_pg;
mod streaming;
mod targets;
mod tenancy;
mod timeouts;
mod token;
