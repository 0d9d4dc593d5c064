//! Admission of client connections: a server-wide cap (`server.max_connections`), a cap per
//! client address (`server.max_connections_per_ip`), and the TLS handshake deadline
//! (`server.header_timeout`). Over a cap, a new connection is closed at once, before corral reads
//! a byte of it, and counted in `corral_connections_refused_total{reason}`.
//!
//! pingora (patched, see `vendor/pingora-core/PATCHED.md`) asks the [`Gate`] about every accepted
//! connection and holds the permit it returns until the connection closes. The counting itself
//! is [`crate::access::caps::Counter`], shared with the caps on requests in flight.

use crate::access::caps::{Caps, Counter, Held, Over};
use crate::telemetry::metrics::Metrics;
use pingora::services::listening::{ConnectionGate, ConnectionPermit};
use prometheus::{IntCounterVec, IntGauge};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The `reason` of `corral_connections_refused_total`.
fn refusal(over: Over) -> &'static str {
    match over {
        Over::Total => "max_connections",
        Over::PerClient => "max_connections_per_ip",
    }
}

/// The gate pingora asks: the [`Counter`] plus metrics and the handshake deadline.
pub(crate) struct Gate {
    counter: Arc<Counter>,
    handshake_timeout: Duration,
    open: IntGauge,
    refused: IntCounterVec,
    handshake_failures: IntCounterVec,
}

impl Gate {
    pub(crate) fn new(caps: Caps, handshake_timeout: Duration, metrics: &Metrics) -> Gate {
        let gate = Gate {
            counter: Counter::new(caps),
            handshake_timeout,
            open: metrics.connections_open.clone(),
            refused: metrics.connections_refused.clone(),
            handshake_failures: metrics.handshake_failures.clone(),
        };
        // Every reason is exported from the start (as 0), so a rate over it is never missing.
        for over in Over::ALL {
            gate.refused.with_label_values(&[refusal(over)]);
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
            Err(over) => {
                self.refused.with_label_values(&[refusal(over)]).inc();
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
    use pingora::services::placement::Placement;

    /// The vendored pingora places each accepted connection on the runtime thread serving the
    /// fewest (its own tests are not built here, so this is where that is checked).
    #[test]
    fn connections_go_to_the_thread_serving_the_fewest() {
        let runtimes: Vec<tokio::runtime::Runtime> = (0..3)
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
            })
            .collect();
        let placement =
            Placement::new(runtimes.iter().map(|r| r.handle().clone()).collect()).unwrap();
        let mut held: Vec<_> = (0..6).map(|_| placement.place().1).collect();
        assert_eq!(placement.open(), vec![2, 2, 2], "an even spread");
        // A connection ends: the next one goes to the thread it left.
        held.remove(0);
        assert_eq!(placement.open().iter().sum::<usize>(), 5);
        held.push(placement.place().1);
        assert_eq!(placement.open(), vec![2, 2, 2]);
        held.clear();
        assert_eq!(
            placement.open(),
            vec![0, 0, 0],
            "ended connections are not counted"
        );
        held.extend((0..3).map(|_| placement.place().1));
        assert_eq!(placement.open(), vec![1, 1, 1]);
        assert!(Placement::new(vec![runtimes[0].handle().clone()]).is_none());
    }
}
