//! Wall-clock time as Unix seconds, the one clock every layer uses (key expiry, key issuing, the
//! double's `created_at`). Durations and deadlines use `Instant`, never this.

/// Seconds since the Unix epoch (0 if the system clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
