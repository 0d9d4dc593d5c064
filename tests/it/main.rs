//! The integration tests: one crate (so the gateway is linked once), one module per area. Each
//! test runs the real `corral` binary against the Ollama double or a scripted upstream, on
//! loopback ports.
// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod connections;
mod demo;
mod edges;
mod failures;
mod hardening;
mod keys;
mod lifecycle;
mod limits;
mod pool;
mod preload;
mod queue;
mod resilience;
mod routes;
mod soak;
mod state;
mod streaming;
mod tls;
mod upgrade;
mod usage;
