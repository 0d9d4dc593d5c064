//! `[server]`: the listeners, TLS files, request and connection limits, and their checks.

use super::units::{ByteSize, HumanDuration};
use super::Problem;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// TLS listener (HTTP/1.1 and HTTP/2 via ALPN). Empty: no TLS listener.
    pub listen: ListenAddr,
    /// PEM certificate chain. Empty (with `tls_key` empty): a throwaway self-signed certificate,
    /// allowed on a loopback `listen` only.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Optional cleartext listener, e.g. behind a TLS-terminating load balancer.
    pub plain_listen: ListenAddr,
    /// `/metrics`, `/livez`, `/readyz`. Empty: disabled.
    pub metrics_listen: ListenAddr,
    /// Largest request body accepted (413 above).
    pub max_body: ByteSize,
    /// How long in-flight requests may finish after SIGTERM.
    pub grace_period: HumanDuration,
    /// Largest request header block (431 above).
    pub max_header_size: ByteSize,
    /// How long a client may take to send a request header, counted from when the connection is
    /// ready for one (so it also closes idle kept-alive connections). Slow clients are cut off.
    pub header_timeout: HumanDuration,
    /// How long a client may take to send a request body corral reads (408 after).
    pub body_timeout: HumanDuration,
    /// Client connections open at once, idle ones included; 0 = no cap. Over it, a new
    /// connection is closed at once.
    pub max_connections: u32,
    /// Client connections open at once from one address (IPv6: one /64); 0 = no cap.
    pub max_connections_per_ip: u32,
    /// Requests in flight at once (HTTP/2 streams included); 0 = no cap. Over it, a request is
    /// answered 503 with `Retry-After` before anything else is done for it.
    pub max_requests: u32,
    /// Requests in flight at once from one address (IPv6: one /64); 0 = no cap. Unset: the same
    /// as `max_connections_per_ip` (so a deployment that lifted that cap lifts this one too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_ip: Option<u32>,
    /// Request bodies held in memory at once, all requests together (corral reads JSON bodies
    /// whole and keeps each until Ollama answers); 0 = no cap. One team may hold half of it (at
    /// least `max_body`). A body that does not fit is answered 503 with `Retry-After`.
    pub max_body_memory: ByteSize,
    /// PID file written in daemon mode (`corral serve --daemon`).
    pub pid_file: PathBuf,
    /// Unix socket through which a new corral takes over the listening sockets of a running one
    /// (`corral serve --upgrade`, then SIGQUIT to the old process).
    pub upgrade_sock: PathBuf,
    /// Browser pages from these origins may call corral (CORS). Unset: no CORS at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsConfig>,
}

/// `[server.cors]`: the web origins whose pages may call corral from a browser.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://chat.example.com`, `chrome-extension://ID`); `*` is refused.
    pub origins: Vec<String>,
    /// How long a browser may remember a preflight's answer.
    #[serde(default = "CorsConfig::default_max_age")]
    pub max_age: HumanDuration,
}

impl CorsConfig {
    fn default_max_age() -> HumanDuration {
        HumanDuration::secs(600)
    }

    fn check(&self, problems: &mut Vec<Problem>) {
        if self.origins.is_empty() {
            problems.push(Problem::new(
                "server.cors.origins",
                "list the origins whose pages may call corral, e.g. [\"https://chat.example.com\"] (or remove [server.cors])",
            ));
        }
        for origin in &self.origins {
            if let Some(why) = origin_problem(origin) {
                problems.push(Problem::new(
                    "server.cors.origins",
                    format!("`{origin}`: {why}"),
                ));
            }
        }
    }
}

/// Why `origin` cannot be an allowed origin: browsers send `scheme://host[:port]`, lowercase,
/// nothing after it, and an allowed origin must match that exactly.
fn origin_problem(origin: &str) -> Option<String> {
    if origin == "*" || origin == "null" {
        return Some(format!(
            "`{origin}` would let any page (or any sandboxed one) spend your teams' keys; list exact origins"
        ));
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Some("an origin is scheme://host[:port], e.g. https://chat.example.com".into());
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '*', ' ', '@']) {
        return Some(
            "an origin is scheme://host[:port]: no path, no trailing slash, no wildcard".into(),
        );
    }
    if origin.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(format!(
            "browsers send origins in lowercase; write `{}`",
            origin.to_ascii_lowercase()
        ));
    }
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Some("the scheme is not valid".into());
    }
    None
}

impl ServerConfig {
    /// The cap on requests in flight from one address (`max_requests_per_ip`, else
    /// `max_connections_per_ip`).
    pub fn requests_per_ip(&self) -> u32 {
        self.max_requests_per_ip
            .unwrap_or(self.max_connections_per_ip)
    }

    /// The body memory budget in bytes (0: none), never less than one body of `max_body`.
    pub fn body_memory(&self) -> u64 {
        match self.max_body_memory.0 {
            0 => 0,
            n => n.max(self.max_body.0),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ListenAddr::loopback(8443),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            plain_listen: ListenAddr::default(),
            metrics_listen: ListenAddr::loopback(9464),
            max_body: ByteSize::mib(32),
            grace_period: HumanDuration::secs(30),
            max_header_size: ByteSize(64 * 1024),
            header_timeout: HumanDuration::secs(30),
            body_timeout: HumanDuration::secs(300),
            max_connections: 4096,
            max_connections_per_ip: 256,
            max_requests: 4096,
            max_requests_per_ip: None,
            max_body_memory: ByteSize::mib(256),
            pid_file: PathBuf::from("/run/corral/corral.pid"),
            upgrade_sock: PathBuf::from("/run/corral/upgrade.sock"),
            cors: None,
        }
    }
}

impl ServerConfig {
    /// Applies `fix` (which makes a relative path relative to the config file) to every path.
    pub(super) fn resolve_paths(&mut self, fix: impl Fn(&mut PathBuf)) {
        fix(&mut self.tls_cert);
        fix(&mut self.tls_key);
        fix(&mut self.pid_file);
        fix(&mut self.upgrade_sock);
    }

    /// Every problem with `[server]`.
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        let s = self;
        if let Some(cors) = &s.cors {
            cors.check(problems);
        }
        if s.listen.0.is_none() && s.plain_listen.0.is_none() {
            problems.push(Problem::new(
                "server.listen",
                "no listener: set server.listen (TLS) or server.plain_listen (cleartext)",
            ));
        }
        let (cert, key) = (
            s.tls_cert.as_os_str().is_empty(),
            s.tls_key.as_os_str().is_empty(),
        );
        if cert != key {
            let missing = if cert {
                "server.tls_cert"
            } else {
                "server.tls_key"
            };
            problems.push(Problem::new(
                missing,
                "set both server.tls_cert and server.tls_key, or neither",
            ));
        }
        if let Some(addr) = s.listen.0 {
            if cert && key && !addr.ip().is_loopback() {
                problems.push(Problem::new(
                    "server.tls_cert",
                    format!(
                        "server.listen = \"{addr}\" is not loopback, so it needs a real certificate: set server.tls_cert and server.tls_key"
                    ),
                ));
            }
        }
        let listeners = [
            ("server.listen", s.listen.0),
            ("server.plain_listen", s.plain_listen.0),
            ("server.metrics_listen", s.metrics_listen.0),
        ];
        for (i, (name, addr)) in listeners.iter().enumerate() {
            let Some(addr) = addr else { continue };
            if addr.port() == 0 {
                problems.push(Problem::new(*name, "port 0 is not allowed; pick a port"));
            }
            for (other, other_addr) in &listeners[..i] {
                if other_addr.is_some_and(|o| {
                    o.port() == addr.port()
                        && (o.ip() == addr.ip()
                            || o.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                }) {
                    problems.push(Problem::new(*name, format!("same port as {other}")));
                }
            }
        }
        if s.max_body.0 == 0 {
            problems.push(Problem::new("server.max_body", "must be more than 0"));
        }
        if s.max_header_size.0 < 1024 {
            problems.push(Problem::new(
                "server.max_header_size",
                "must be at least 1KiB",
            ));
        }
        for (key, d) in [
            ("server.header_timeout", s.header_timeout),
            ("server.body_timeout", s.body_timeout),
        ] {
            if d.0.is_zero() {
                problems.push(Problem::new(key, "must be more than 0"));
            }
        }
        for (key, per_ip, total, total_key) in [
            (
                "server.max_connections_per_ip",
                s.max_connections_per_ip,
                s.max_connections,
                "server.max_connections",
            ),
            (
                "server.max_requests_per_ip",
                // Only as written: unset, it follows max_connections_per_ip.
                s.max_requests_per_ip.unwrap_or(0),
                s.max_requests,
                "server.max_requests",
            ),
        ] {
            if total > 0 && per_ip > total {
                problems.push(Problem::new(
                    key,
                    format!(
                        "is more than {total_key} ({total}); lower it, or set 0 for no cap per address"
                    ),
                ));
            }
        }
        for (key, p) in [
            ("server.pid_file", &s.pid_file),
            ("server.upgrade_sock", &s.upgrade_sock),
        ] {
            if !p.is_absolute() {
                problems.push(Problem::new(key, "must be an absolute path"));
            }
        }
    }
}

/// A listening address; the empty string means "no listener".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl ListenAddr {
    pub(crate) const fn loopback(port: u16) -> Self {
        ListenAddr(Some(SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port,
        )))
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(a) => s.collect_str(&a),
            None => s.serialize_str(""),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(ListenAddr(None));
        }
        text.parse::<SocketAddr>().map(|a| ListenAddr(Some(a))).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{text}` is not an address; write IP:PORT, e.g. \"0.0.0.0:8443\" or \"[::1]:8443\", or \"\" for none"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{keys, load_str};
    use super::ServerConfig;

    #[test]
    fn caps_must_fit_together() {
        let e = load_str(
            "[server]\nmax_connections = 10\nmax_connections_per_ip = 11\n\
             max_requests = 10\nmax_requests_per_ip = 11\n\
             max_body = \"2MiB\"\nmax_body_memory = \"1MiB\"\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(&e),
            [
                "server.max_connections_per_ip",
                "server.max_requests_per_ip"
            ]
        );
        // 0 is no cap, and fits anything.
        load_str("[server]\nmax_requests = 0\nmax_requests_per_ip = 11\nmax_body_memory = 0\n")
            .unwrap();
        // Unset, the per-address request cap follows the per-address connection cap.
        let lifted = load_str("[server]\nmax_connections_per_ip = 0\n").unwrap();
        assert_eq!(lifted.server.requests_per_ip(), 0);
        assert_eq!(ServerConfig::default().requests_per_ip(), 256);
        // A budget smaller than one body of the largest size is raised to fit one.
        let small =
            load_str("[server]\nmax_body = \"2MiB\"\nmax_body_memory = \"1MiB\"\n").unwrap();
        assert_eq!(small.server.body_memory(), 2 << 20);
        assert_eq!(ServerConfig::default().body_memory(), 256 << 20);
    }
}
