//! corral: a hardened gateway in front of Ollama.
//!
//! Folders are layers; each may use only the layers below it (see `docs/architecture.md`):
//!
//! - [`cli`]: the `corral` command and its subcommands (`serve`, `check`, `keys`, `demo`, `double`)
//! - [`runtime`]: the running process: pingora server, connection caps, TLS, reload, `/metrics`
//!   listener, shutdown
//! - [`proxy`]: the request path, one pingora `ProxyHttp` with thin hooks: admission, headers,
//!   response bodies, error responses, the report
//! - [`access`]: keys, revocation, team policy, per-team limits, caps on what is held at once;
//!   [`upstream`]: the Ollama nodes (the pool, routing, probes, discovery, pinned models, pulls);
//!   [`usage`]: token usage
//!   and stream completeness read from responses
//! - [`state`]: the store replicas share (Redis/Valkey): limit scripts, leases, revocations
//! - [`api`]: the route table and the one error type, in each caller's dialect
//! - [`config`]: typed, validated configuration, one file per section; [`telemetry`]: access
//!   log, operational log, metrics; [`ollama`]: protocol facts shared with the double; [`clock`]
//! - [`dev`]: the development certificate authority and the Ollama double (tests, benchmarks,
//!   `corral demo`); never on the request path

pub mod access;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dev;
pub mod ollama;
pub mod proxy;
pub mod runtime;
pub mod state;
pub mod telemetry;
pub mod upstream;
pub mod usage;

/// The release version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (`unknown` outside a checkout).
pub const COMMIT: &str = env!("CORRAL_COMMIT");
/// What `corral --version` prints.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CORRAL_COMMIT"),
    ")"
);
