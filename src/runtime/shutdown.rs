//! How the process stops: signals, draining, graceful shutdown and upgrade.
//!
//! - SIGTERM: stop accepting, let requests in flight finish for up to `server.grace_period`.
//! - SIGQUIT: hand the listening sockets to a new corral started with `--upgrade`, then drain like
//!   SIGTERM (zero-downtime binary upgrade).
//! - SIGINT: stop at once.
//!
//! pingora waits the whole grace period after a graceful stop even when nothing is in flight;
//! corral exits as soon as the last request has finished instead.

use crate::proxy::Traffic;
use crate::telemetry::access_log::AccessLog;
use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::broadcast;

/// Folders to delete when the process exits (`corral demo`'s temporary files).
static REMOVE_ON_EXIT: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// Deletes `dir` when the process exits, whichever way it stops.
pub(crate) fn remove_on_exit(dir: std::path::PathBuf) {
    REMOVE_ON_EXIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir);
}

/// Deletes what [`remove_on_exit`] named; called on every way out.
pub(crate) fn clean_up() {
    let dirs = std::mem::take(&mut *REMOVE_ON_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Exits the process once nothing has been in flight for a moment (requests whose header
/// was already on the wire when the listeners closed get to reach their first hook).
async fn exit_when_idle(traffic: &Traffic, access_log: &AccessLog) -> ! {
    let mut idle_checks = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        idle_checks = if traffic.in_flight() == 0 {
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

/// A signal to wait for; `None` (logged) if it cannot be watched.
fn watch(kind: SignalKind, name: &str) -> Option<Signal> {
    signal(kind)
        .map_err(|e| tracing::error!(error = %e, "cannot watch {name}; it will not stop corral"))
        .ok()
}

/// The next delivery of a watched signal; never, for one that could not be watched.
async fn next(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// The last SIGTERM or SIGINT noted by [`note_stop_signals`]'s handler (0: none).
static NOTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn note(signal: libc::c_int) {
    // An atomic store is async-signal-safe.
    NOTED.store(signal, Ordering::SeqCst);
}

/// From now on SIGTERM and SIGINT are noted instead of killing the process. Called before the
/// listeners open: pingora watches signals (`Signals`) only once its services run, and a signal
/// that came between the two (the port already accepting) killed the process with the default
/// action, so `corral demo` left its temporary files behind. A signal noted early stops corral
/// the usual way as soon as `Signals` starts; tokio's handlers, installed then, call this one
/// too (signal-hook chains them).
pub(crate) fn note_stop_signals() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only stores to an atomic; the sigaction struct is
        // zeroed (no flags, empty mask) and then filled in.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = note as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(signal, "cannot note stop signals during start-up");
            }
        }
    }
}

/// Maps signals to pingora's shutdown kinds.
pub(crate) struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = watch(SignalKind::terminate(), "SIGTERM");
        let mut quit = watch(SignalKind::quit(), "SIGQUIT");
        let mut int = watch(SignalKind::interrupt(), "SIGINT");
        // Watched from here on; one that came during start-up is acted on now.
        let kind = match NOTED.swap(0, Ordering::SeqCst) {
            libc::SIGTERM => ShutdownSignal::GracefulTerminate,
            libc::SIGINT => ShutdownSignal::FastShutdown,
            _ => tokio::select! {
                _ = next(&mut term) => ShutdownSignal::GracefulTerminate,
                _ = next(&mut quit) => ShutdownSignal::GracefulUpgrade,
                _ = next(&mut int) => ShutdownSignal::FastShutdown,
            },
        };
        NOTED.store(0, Ordering::SeqCst);
        if matches!(kind, ShutdownSignal::FastShutdown) {
            tracing::info!("SIGINT: stopping now");
        }
        kind
    }
}

/// Follows pingora's execution phases: marks the gateway draining when a stop or hand-over
/// begins, and ends the process once the listeners are closed and the last request is done.
pub(crate) struct Drainer {
    pub(crate) traffic: Arc<Traffic>,
    pub(crate) access_log: Arc<AccessLog>,
    pub(crate) phases: Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Some(mut phases) = self.phases.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let traffic = &self.traffic;
        loop {
            match phases.recv().await {
                Ok(ExecutionPhase::GracefulTerminate) => {
                    traffic.start_draining();
                    tracing::info!(
                        in_flight = traffic.in_flight(),
                        "SIGTERM: no new connections; finishing requests in flight"
                    );
                }
                Ok(ExecutionPhase::GracefulUpgradeTransferringFds) => {
                    traffic.start_draining();
                    tracing::info!(
                        in_flight = traffic.in_flight(),
                        "SIGQUIT: handing the listening sockets to the new corral"
                    );
                }
                Ok(ExecutionPhase::ShutdownGracePeriod) => {
                    exit_when_idle(traffic, &self.access_log).await
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
