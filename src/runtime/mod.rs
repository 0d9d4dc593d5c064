//! The running process: assembles the pingora server, admits connections, reloads configuration
//! and certificates, serves the operator listener, drains on shutdown. Uses every layer below.

pub mod admin;
pub mod connections;
pub mod lifecycle;
pub mod memory;
pub mod reload;
pub mod server;
pub mod tls;
