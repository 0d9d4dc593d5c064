//! Caps on what the gateway holds at once, as pure bookkeeping (testable without sockets):
//!
//! - [`Counter`]: places (connections, requests in flight) against a total cap and a cap per
//!   client address;
//! - [`Budget`]: bytes of request bodies held in memory, against `server.max_body_memory`.
//!
//! Every place and every byte is given back when the value holding it is dropped, so nothing can
//! leak on an early return.

use prometheus::IntGauge;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Which cap refused a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// The cap on everything held at once.
    Total,
    /// The cap on one client address.
    PerClient,
}

impl Over {
    pub(crate) const ALL: [Over; 2] = [Over::Total, Over::PerClient];
}

/// The caps; 0 means no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    pub(crate) total: u32,
    pub(crate) per_ip: u32,
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
struct Places {
    total: u32,
    by_client: HashMap<IpAddr, u32>,
}

/// Places held (open connections, requests in flight), counted against the caps. Pure bookkeeping: testable without sockets.
pub(crate) struct Counter {
    caps: Caps,
    open: Mutex<Places>,
}

/// One admitted connection or request; releases its place when dropped.
pub(crate) struct Held {
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
    pub(crate) fn new(caps: Caps) -> Arc<Counter> {
        Arc::new(Counter {
            caps,
            open: Mutex::default(),
        })
    }

    /// Takes a place for `peer`, or says which cap refuses it.
    pub(crate) fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Held, Over> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.caps.total > 0 && open.total >= self.caps.total {
            return Err(Over::Total);
        }
        // A peer without an IP address (a Unix socket) counts only toward the total.
        let client = peer.map(client_key);
        if let (Some(c), true) = (client, self.caps.per_ip > 0) {
            if open.by_client.get(&c).copied().unwrap_or(0) >= self.caps.per_ip {
                return Err(Over::PerClient);
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

    #[cfg(test)]
    pub(crate) fn open(&self) -> u32 {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// Bytes held at once against a cap (0: no cap), e.g. request bodies read whole.
pub(crate) struct Budget {
    cap: u64,
    used: AtomicU64,
    gauge: Option<IntGauge>,
}

/// A part of a [`Budget`]; given back when dropped.
pub(crate) struct Share {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Budget {
    /// A budget of `cap` bytes; `gauge`, if given, always shows the bytes in use.
    pub(crate) fn new(cap: u64, gauge: Option<IntGauge>) -> Arc<Budget> {
        Arc::new(Budget {
            cap,
            used: AtomicU64::new(0),
            gauge,
        })
    }

    /// An empty share, to grow.
    pub(crate) fn share(self: &Arc<Self>) -> Share {
        Share {
            budget: self.clone(),
            bytes: 0,
        }
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn changed(&self) {
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(self.used()).unwrap_or(i64::MAX));
        }
    }
}

impl Share {
    /// Takes `more` bytes, or nothing at all (`false`) when the budget has not that much left.
    pub(crate) fn grow(&mut self, more: u64) -> bool {
        let budget = &self.budget;
        let taken = budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                let after = used.checked_add(more)?;
                (budget.cap == 0 || after <= budget.cap).then_some(after)
            })
            .is_ok();
        if taken {
            self.bytes += more;
            budget.changed();
        }
        taken
    }

    /// Holds exactly `bytes`, whatever the cap: for what is already in memory (a body rewritten
    /// a few bytes longer than the one read).
    pub(crate) fn set(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            self.budget
                .used
                .fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            self.budget
                .used
                .fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
        self.budget.changed();
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.set(0);
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
        assert_eq!(c.admit(ip("10.0.0.3")).err(), Some(Over::Total));
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
        assert_eq!(c.admit(ip("10.0.0.1")).err(), Some(Over::PerClient));
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
            Some(Over::PerClient),
            "same /64"
        );
        assert!(c.admit(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        let _v4 = c.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(c.admit(ip("::ffff:192.0.2.1")).err(), Some(Over::PerClient));
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

    #[test]
    fn a_budget_grants_whole_requests_only_and_takes_back_on_drop() {
        let b = Budget::new(100, None);
        let mut a = b.share();
        assert!(a.grow(60));
        let mut c = b.share();
        assert!(!c.grow(50), "60 + 50 is over 100");
        assert_eq!(b.used(), 60, "a refused request takes nothing");
        assert!(c.grow(40));
        assert!(!a.grow(1));
        drop(a);
        assert_eq!(b.used(), 40);
        c.set(45);
        assert_eq!(
            b.used(),
            45,
            "set holds what is in memory, over the cap or not"
        );
        c.set(10);
        assert_eq!(b.used(), 10);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_budget_shows_its_use_on_the_gauge_and_zero_is_no_cap() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let b = Budget::new(0, Some(gauge.clone()));
        let mut a = b.share();
        assert!(a.grow(u64::MAX / 2));
        assert!(a.grow(1000));
        assert!(!a.grow(u64::MAX), "overflow is refused, not wrapped");
        assert_eq!(gauge.get(), i64::MAX, "saturated");
        drop(a);
        assert_eq!(gauge.get(), 0);
    }
}
