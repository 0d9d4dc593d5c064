/// With `--features count-allocations` (benches/allocations.rs), every allocation is counted.
#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: corral::dev::allocations::Counting = corral::dev::allocations::Counting;

/// Otherwise mimalloc: pingora's request path allocates small pieces all the time; glibc's
/// malloc and free were about 11% of the gateway's CPU, mimalloc is about 5% (README, Benchmarks).
#[cfg(not(feature = "count-allocations"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Freed memory goes back to the system. mimalloc (v3, as libmimalloc-sys builds it) gives back
/// freed pages after its purge delay (1 s), but only when it runs again on some thread: after a
/// burst of connections the runtime threads go quiet and kept the memory for good
/// (`cargo bench --bench connections`, and the soak test). So each runtime thread calls
/// `mi_collect(true)` every 100 ms (a vendored pingora hook): it collects the thread's own heap
/// and gives back everything waiting to be purged in the process. 10,000 closed connections are
/// back within 4 MiB of idle in a second. Purging at once (`purge_delay = 0`) gave memory back
/// too, but cost a page fault or more per request under load: pages emptied by short-lived
/// allocations were given back and faulted in again by the next request (README, Benchmarks).
#[cfg(not(feature = "count-allocations"))]
fn return_freed_memory() {
    fn collect_this_thread() {
        // SAFETY: no pointer is passed or kept; mimalloc collects the calling thread's heap and
        // purges its arenas, which is safe from any thread at any time.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
    pingora::server::set_thread_housekeeping(
        std::time::Duration::from_millis(100),
        collect_this_thread,
    );
}

fn main() -> std::process::ExitCode {
    #[cfg(feature = "count-allocations")]
    corral::dev::allocations::report_on_signal();
    #[cfg(not(feature = "count-allocations"))]
    return_freed_memory();
    corral::cli::main()
}
