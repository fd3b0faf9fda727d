//! Integration tests: the gateway and the bundled mock on port 0, in process
//! (and the real binary where signals matter), asserting the mock's counters.

// Test code: a failed unwrap is a failed test, which is what it should be.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod binary;
mod cli;
mod errors;
mod failover;
mod http2;
mod mock;
mod observability;
mod ops;
mod reload;
mod routing;
mod streaming;
mod token;
