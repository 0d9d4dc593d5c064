//! Gives memory freed in glibc's allocator back to the system. The corral binary allocates with
//! mimalloc, set to purge freed pages at once (`src/main.rs`); glibc's malloc still serves C code
//! and builds with the counting allocator (`--features count-allocations`). It keeps what a burst
//! of connections freed in its per-thread arenas, so without this the resident memory would stay
//! at its peak for good. Every few seconds, when the arenas hold more than a few MiB of free
//! memory, `malloc_trim` returns the free pages (milliseconds of work, none in a steady state).

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::time::Duration;

/// How often the arenas are looked at.
pub(crate) const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Free memory in the arenas worth handing back.
const TRIM_ABOVE: usize = 8 << 20;

/// Free bytes the allocator holds and could return.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_in_arenas() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.fordblks
}

/// Hands the allocator's free pages back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only hands free pages back to the system; thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

// Other allocators (musl, other systems) manage this themselves, or offer no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_in_arenas() -> usize {
    0
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

pub(crate) struct Trimmer;

#[async_trait]
impl BackgroundService for Trimmer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            if !crate::clock::pause(TRIM_INTERVAL, &mut shutdown).await {
                return;
            }
            if free_in_arenas() > TRIM_ABOVE {
                trim();
            }
        }
    }
}
