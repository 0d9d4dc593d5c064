//! Admission of client connections: a server-wide cap (`server.max_connections`), a cap per
//! client address (`server.max_connections_per_ip`), and the TLS handshake deadline
//! (`server.header_timeout`). Over a cap, a new connection is closed at once, before corral reads
//! a byte of it, and counted in `corral_connections_refused_total{reason}`.
//!
//! pingora (patched, see `vendor/pingora-core/PATCHED.md`) asks the [`Gate`] about every accepted
//! connection and holds the permit it returns until the connection closes.

use crate::telemetry::metrics::Metrics;
use pingora::services::listening::{ConnectionGate, ConnectionPermit};
use prometheus::{IntCounterVec, IntGauge};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a connection was refused (`corral_connections_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refusal {
    const ALL: [Refusal; 2] = [Refusal::MaxConnections, Refusal::MaxConnectionsPerIp];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// The caps; 0 means no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub total: u32,
    pub per_ip: u32,
}

/// The address a per-client cap counts against: an IPv4 address, or the /64 an IPv6 address is
/// in (one host usually holds a whole /64, so counting single IPv6 addresses would cap nothing).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6([s[0], s[1], s[2], s[3], 0, 0, 0, 0].into())
            }
        },
        v4 => v4,
    }
}

#[derive(Default)]
struct Open {
    total: u32,
    by_client: HashMap<IpAddr, u32>,
}

/// Open connections, counted against the caps. Pure bookkeeping: testable without sockets.
pub struct Counter {
    caps: Caps,
    open: Mutex<Open>,
}

/// One admitted connection; releases its place when dropped.
pub struct Held {
    counter: Arc<Counter>,
    client: Option<IpAddr>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.counter.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(client) = self.client {
            if let Some(n) = open.by_client.get_mut(&client) {
                *n -= 1;
                if *n == 0 {
                    open.by_client.remove(&client);
                }
            }
        }
    }
}

impl Counter {
    pub fn new(caps: Caps) -> Arc<Counter> {
        Arc::new(Counter {
            caps,
            open: Mutex::default(),
        })
    }

    /// Takes a place for a connection from `peer`, or says which cap refuses it.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Held, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.caps.total > 0 && open.total >= self.caps.total {
            return Err(Refusal::MaxConnections);
        }
        // A connection without an IP peer (a Unix socket) counts only toward the total.
        let client = peer.map(client_key);
        if let (Some(c), true) = (client, self.caps.per_ip > 0) {
            if open.by_client.get(&c).copied().unwrap_or(0) >= self.caps.per_ip {
                return Err(Refusal::MaxConnectionsPerIp);
            }
        }
        open.total += 1;
        if let Some(c) = client {
            *open.by_client.entry(c).or_insert(0) += 1;
        }
        Ok(Held {
            counter: self.clone(),
            client,
        })
    }

    pub fn open(&self) -> u32 {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// The gate pingora asks: the [`Counter`] plus metrics and the handshake deadline.
pub struct Gate {
    counter: Arc<Counter>,
    handshake_timeout: Duration,
    open: IntGauge,
    refused: IntCounterVec,
    handshake_failures: IntCounterVec,
}

impl Gate {
    pub fn new(caps: Caps, handshake_timeout: Duration, metrics: &Metrics) -> Gate {
        let gate = Gate {
            counter: Counter::new(caps),
            handshake_timeout,
            open: metrics.connections_open.clone(),
            refused: metrics.connections_refused.clone(),
            handshake_failures: metrics.handshake_failures.clone(),
        };
        // Every reason is exported from the start (as 0), so a rate over it is never missing.
        for refusal in Refusal::ALL {
            gate.refused.with_label_values(&[refusal.label()]);
        }
        for timed_out in [false, true] {
            gate.handshake_failures
                .with_label_values(&[handshake_failure(timed_out)]);
        }
        gate
    }
}

/// The `reason` of `corral_tls_handshake_failures_total`.
fn handshake_failure(timed_out: bool) -> &'static str {
    if timed_out {
        "timeout"
    } else {
        "error"
    }
}

/// Keeps `corral_connections_open` true while a connection lives.
struct Permit {
    _held: Held,
    open: IntGauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl ConnectionGate for Gate {
    fn admit(&self, peer: Option<SocketAddr>) -> Option<ConnectionPermit> {
        match self.counter.admit(peer.map(|p| p.ip())) {
            Ok(held) => {
                self.open.inc();
                Some(Box::new(Permit {
                    _held: held,
                    open: self.open.clone(),
                }))
            }
            Err(refusal) => {
                self.refused.with_label_values(&[refusal.label()]).inc();
                None
            }
        }
    }

    fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn handshake_failed(&self, _peer: Option<SocketAddr>, timed_out: bool) {
        self.handshake_failures
            .with_label_values(&[handshake_failure(timed_out)])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_total_cap_holds_and_frees_on_close() {
        let c = Counter::new(Caps {
            total: 2,
            per_ip: 0,
        });
        let a = c.admit(ip("10.0.0.1")).unwrap();
        let _b = c.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(c.admit(ip("10.0.0.3")).err(), Some(Refusal::MaxConnections));
        drop(a);
        assert!(c.admit(ip("10.0.0.3")).is_ok());
    }

    #[test]
    fn the_per_client_cap_counts_each_client_alone() {
        let c = Counter::new(Caps {
            total: 100,
            per_ip: 2,
        });
        let held: Vec<_> = (0..2).map(|_| c.admit(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(
            c.admit(ip("10.0.0.1")).err(),
            Some(Refusal::MaxConnectionsPerIp)
        );
        let other = c.admit(ip("10.0.0.2"));
        assert!(other.is_ok(), "another client is not capped");
        let unix = c.admit(None);
        assert!(unix.is_ok(), "no address: only the total applies");
        assert_eq!(c.open(), 4);
        drop(held);
        let again = c.admit(ip("10.0.0.1"));
        assert!(again.is_ok());
        assert_eq!(c.open(), 3, "only what is still held counts");
        drop((other, again));
        assert!(
            c.open.lock().unwrap().by_client.is_empty(),
            "freed entries go away"
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_v4_as_v4() {
        let c = Counter::new(Caps {
            total: 0,
            per_ip: 1,
        });
        let _a = c.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            c.admit(ip("2001:db8:1:2::ffff")).err(),
            Some(Refusal::MaxConnectionsPerIp),
            "same /64"
        );
        assert!(c.admit(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        let _v4 = c.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(
            c.admit(ip("::ffff:192.0.2.1")).err(),
            Some(Refusal::MaxConnectionsPerIp)
        );
    }

    #[test]
    fn zero_means_no_cap() {
        let c = Counter::new(Caps {
            total: 0,
            per_ip: 0,
        });
        let held: Vec<_> = (0..10_000)
            .map(|_| c.admit(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(c.open(), 10_000);
        drop(held);
        assert_eq!(c.open(), 0);
    }
}
