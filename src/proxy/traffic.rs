//! Requests in flight and whether the gateway is draining: counted by the request path, read by
//! `/readyz` and by the shutdown that waits for the last request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Default)]
pub(crate) struct Traffic {
    in_flight: AtomicUsize,
    draining: AtomicBool,
}

/// Held by every request from its first hook to its log line.
pub(crate) struct InFlight(Arc<Traffic>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Traffic {
    pub(crate) fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Shutdown or hand-over has begun: `/readyz` turns 503 so load balancers move away.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_guards() {
        let t = Arc::new(Traffic::default());
        let a = t.enter();
        let b = t.enter();
        assert_eq!(t.in_flight(), 2);
        drop(a);
        assert_eq!(t.in_flight(), 1);
        drop(b);
        assert_eq!(t.in_flight(), 0);
        assert!(!t.is_draining());
        t.start_draining();
        assert!(t.is_draining());
    }
}
