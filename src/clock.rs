//! Time: wall-clock Unix seconds, the one clock every layer uses (key expiry, key issuing, the
//! double's `created_at`; durations and deadlines use `Instant`, never this), and the pause of
//! corral's background loops.

use pingora::server::ShutdownWatch;
use std::time::Duration;

/// Seconds since the Unix epoch (0 if the system clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Waits `wait`, or less if the process starts shutting down: then `false`, and the background
/// loop that asked stops.
pub(crate) async fn pause(wait: Duration, shutdown: &mut ShutdownWatch) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = shutdown.changed() => false,
    }
}
