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

/// Bytes held at once (e.g. request bodies read whole) against a total cap and a cap per key
/// (a team), so one key cannot take everything; 0 means no cap.
pub(crate) struct Budget {
    cap: u64,
    per_key: u64,
    held: Mutex<Holdings>,
    gauge: Option<IntGauge>,
}

#[derive(Default)]
struct Holdings {
    total: u64,
    by_key: HashMap<String, u64>,
}

/// A part of a [`Budget`], taken for one key; given back when dropped.
pub(crate) struct Share {
    budget: Arc<Budget>,
    key: String,
    bytes: u64,
}

impl Budget {
    /// A budget of `cap` bytes, at most `per_key` of them for one key; `gauge`, if given, always
    /// shows the bytes in use.
    pub fn new(cap: u64, per_key: u64, gauge: Option<IntGauge>) -> Arc<Budget> {
        Arc::new(Budget {
            cap,
            per_key,
            held: Mutex::default(),
            gauge,
        })
    }

    /// An empty share for `key`, to grow.
    pub fn share(self: &Arc<Self>, key: &str) -> Share {
        Share {
            budget: self.clone(),
            key: key.to_string(),
            bytes: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Holdings> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves `key`'s holding from `from` to `to` bytes; refused (nothing changes) if `check` and
    /// a cap would be passed.
    fn change(&self, key: &str, from: u64, to: u64, check: bool) -> bool {
        let mut held = self.lock();
        let mine = held.by_key.get(key).copied().unwrap_or(0);
        let total = (held.total - from).checked_add(to);
        let mine = (mine - from).checked_add(to);
        let over = |cap: u64, n: Option<u64>| n.is_none_or(|n| cap > 0 && n > cap);
        if check && to > from && (over(self.cap, total) || over(self.per_key, mine)) {
            return false;
        }
        let (total, mine) = (total.unwrap_or(u64::MAX), mine.unwrap_or(u64::MAX));
        held.total = total;
        if mine == 0 {
            held.by_key.remove(key);
        } else if let Some(entry) = held.by_key.get_mut(key) {
            *entry = mine;
        } else {
            // The key's first bytes: its name is copied once, not at every change.
            held.by_key.insert(key.to_string(), mine);
        }
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(total).unwrap_or(i64::MAX));
        }
        true
    }
}

impl Share {
    /// Takes `more` bytes, or nothing at all (`false`) when the budget, or this key's part of
    /// it, has not that much left.
    pub fn grow(&mut self, more: u64) -> bool {
        let Some(to) = self.bytes.checked_add(more) else {
            return false;
        };
        let taken = self.budget.change(&self.key, self.bytes, to, true);
        if taken {
            self.bytes = to;
        }
        taken
    }

    /// Holds exactly `bytes`, whatever the caps: for what is already in memory (a buffer that
    /// grew a little past what was asked, a body rewritten a few bytes longer).
    pub fn set(&mut self, bytes: u64) {
        self.budget.change(&self.key, self.bytes, bytes, false);
        self.bytes = bytes;
    }

    pub fn bytes(&self) -> u64 {
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
        let b = Budget::new(100, 0, None);
        let mut a = b.share("t");
        assert!(a.grow(60));
        let mut c = b.share("u");
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
        assert!(b.lock().by_key.is_empty(), "freed keys go away");
    }

    #[test]
    fn one_key_cannot_take_the_whole_budget() {
        let b = Budget::new(100, 50, None);
        let mut first = b.share("greedy");
        assert!(first.grow(50));
        let mut second = b.share("greedy");
        assert!(!second.grow(1), "the key holds its half");
        let mut other = b.share("polite");
        assert!(other.grow(50), "another key still gets its half");
        drop(first);
        assert!(second.grow(30));
    }

    #[test]
    fn a_budget_shows_its_use_on_the_gauge_and_zero_is_no_cap() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let b = Budget::new(0, 0, Some(gauge.clone()));
        let mut a = b.share("t");
        assert!(a.grow(u64::MAX / 2));
        assert!(a.grow(1000));
        assert!(!a.grow(u64::MAX), "overflow is refused, not wrapped");
        assert_eq!(gauge.get(), i64::MAX, "saturated");
        drop(a);
        assert_eq!(gauge.get(), 0);
    }
}
