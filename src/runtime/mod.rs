//! The running process: assembles the pingora server, admits connections, reloads configuration
//! and certificates, serves the operator listener, drains on shutdown. Uses every layer below it
//! (`proxy` and what it uses).

pub(crate) mod admin;
pub(crate) mod connections;
pub(crate) mod oidc;
pub(crate) mod reload;
pub(crate) mod server;
pub(crate) mod shutdown;
pub(crate) mod tls;
pub(crate) mod watch;
