//! corral: a hardened gateway in front of Ollama.
//!
//! The request path is one pingora `ProxyHttp` implementation ([`proxy::Gateway`]) whose hooks
//! delegate to small modules, each owning one concern and testable without sockets:
//!
//! - [`config`]: typed, validated configuration (TOML + `CORRAL__*` environment overrides)
//! - [`routes`]: the route table, deny by default, path tricks refused
//! - [`auth`]: API key → identity; [`policy`]: identity + route + model → allow or deny;
//!   [`access`]: keys and teams as loaded, swapped whole by [`reload`]; [`keys`]: key management
//! - [`body`]: JSON request bodies read the way Ollama reads them
//! - [`error`]: the one error type, rendered in the caller's dialect
//! - [`proxy`]: the pingora hooks
//! - [`telemetry`]: access log and operational log
//! - [`upstream`]: the Ollama peer and its timeouts; [`upstream_client`] for corral's own calls
//! - [`tls`]: certificates, reloaded when their files change
//! - [`lifecycle`]: requests in flight, readiness, graceful shutdown
//! - [`admin`]: `/livez`, `/readyz`, `/metrics`
//! - [`server`]: assembles the pingora server; [`cli`], [`check`], [`demo`]: the commands
//! - [`double`]: the Ollama double used by tests, benchmarks and `corral demo`
//! - [`ollama`]: protocol facts shared by corral and the double

pub mod access;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dev;
pub mod ollama;
pub mod proxy;
pub mod runtime;
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
