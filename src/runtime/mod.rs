//! The running process: assembles the pingora server, admits connections, reloads configuration
//! and certificates, serves the operator listener, drains on shutdown. Uses every layer below it
//! (`proxy` and what it uses).

pub mod admin;
pub mod connections;
pub mod memory;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod watch;
