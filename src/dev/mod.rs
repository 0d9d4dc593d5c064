//! For development, tests, benchmarks and `corral demo`: a throwaway certificate authority, the
//! Ollama double, and a bare pingora proxy to compare corral with. Not on the request path; uses
//! only `ollama` and `clock` (and pingora, for the bare proxy).

#[cfg(feature = "count-allocations")]
pub mod allocations;
pub mod bare_proxy;
pub mod devcert;
pub mod double;
