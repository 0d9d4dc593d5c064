//! Process lifecycle: requests in flight, draining, graceful shutdown and upgrade.
//!
//! - SIGTERM: stop accepting, let requests in flight finish for up to `server.grace_period`.
//! - SIGQUIT: hand the listening sockets to a new corral started with `--upgrade`, then drain like
//!   SIGTERM (zero-downtime binary upgrade).
//! - SIGINT: stop at once.
//!
//! pingora waits the whole grace period after a graceful stop even when nothing is in flight;
//! corral exits as soon as the last request has finished instead.

use crate::telemetry::access_log::AccessLog;
use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;

/// Folders to delete when the process exits (`corral demo`'s temporary files).
static REMOVE_ON_EXIT: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// Deletes `dir` when the process exits, whichever way it stops.
pub fn remove_on_exit(dir: std::path::PathBuf) {
    REMOVE_ON_EXIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir);
}

/// Deletes what [`remove_on_exit`] named; called on every way out.
pub fn clean_up() {
    let dirs = std::mem::take(&mut *REMOVE_ON_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

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

    /// Shutdown or hand-over has begun: `/readyz` turns 503 so load balancers move away.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Exits the process once nothing has been in flight for a moment (requests whose header
    /// was already on the wire when the listeners closed get to reach their first hook).
    async fn exit_when_idle(&self, access_log: &AccessLog) -> ! {
        let mut idle_checks = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            idle_checks = if self.in_flight() == 0 {
                idle_checks + 1
            } else {
                0
            };
            if idle_checks >= 4 {
                tracing::info!("all requests finished; exiting");
                access_log.flush();
                crate::telemetry::flush();
                clean_up();
                std::process::exit(0);
            }
        }
    }
}

/// Maps signals to pingora's shutdown kinds.
pub struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

/// Follows pingora's execution phases: marks the gateway draining when a stop or hand-over
/// begins, and ends the process once the listeners are closed and the last request is done.
pub struct Drainer {
    pub lifecycle: Arc<Lifecycle>,
    pub access_log: Arc<AccessLog>,
    pub phases: Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Some(mut phases) = self.phases.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let lifecycle = &self.lifecycle;
        loop {
            match phases.recv().await {
                Ok(ExecutionPhase::GracefulTerminate) => {
                    lifecycle.draining.store(true, Ordering::SeqCst);
                    tracing::info!(
                        in_flight = lifecycle.in_flight(),
                        "SIGTERM: no new connections; finishing requests in flight"
                    );
                }
                Ok(ExecutionPhase::GracefulUpgradeTransferringFds) => {
                    lifecycle.draining.store(true, Ordering::SeqCst);
                    tracing::info!(
                        in_flight = lifecycle.in_flight(),
                        "SIGQUIT: handing the listening sockets to the new corral"
                    );
                }
                Ok(ExecutionPhase::ShutdownGracePeriod) => {
                    lifecycle.exit_when_idle(&self.access_log).await
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
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
