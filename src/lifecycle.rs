//! Process lifecycle: requests in flight, readiness, and graceful shutdown.
//!
//! On SIGTERM pingora stops accepting and then waits `grace_period` unconditionally; corral
//! exits as soon as the last in-flight request has finished instead, so an idle gateway stops at
//! once and a busy one lets its streams finish (up to the grace period, after which pingora cuts
//! them). SIGINT stops at once.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Default)]
pub struct Lifecycle {
    in_flight: AtomicUsize,
    draining: AtomicBool,
}

/// Held by every request from its first hook to its log line.
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Lifecycle {
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Shutdown has begun: `/readyz` turns 503 so load balancers stop sending traffic.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn start_draining(self: &Arc<Self>) {
        self.draining.store(true, Ordering::SeqCst);
        let me = self.clone();
        // Exit once nothing is in flight. A short settle time lets requests whose headers were
        // already on the wire when the listeners closed reach their first hook.
        std::thread::spawn(move || {
            let mut idle_checks = 0;
            loop {
                std::thread::sleep(Duration::from_millis(50));
                idle_checks = if me.in_flight() == 0 {
                    idle_checks + 1
                } else {
                    0
                };
                if idle_checks >= 4 {
                    tracing::info!("all requests finished; exiting");
                    crate::telemetry::flush();
                    std::process::exit(0);
                }
            }
        });
    }
}

/// Signals: SIGTERM drains, SIGINT stops at once.
pub struct Signals(pub Arc<Lifecycle>);

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {
                tracing::info!(in_flight = self.0.in_flight(), "SIGTERM: no new connections; finishing requests in flight");
                self.0.start_draining();
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_guards() {
        let l = Arc::new(Lifecycle::default());
        let a = l.enter();
        let b = l.enter();
        assert_eq!(l.in_flight(), 2);
        drop(a);
        assert_eq!(l.in_flight(), 1);
        drop(b);
        assert_eq!(l.in_flight(), 0);
        assert!(!l.is_draining());
    }
}
