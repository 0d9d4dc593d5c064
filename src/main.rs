/// With `--features count-allocations` (benches/allocations.rs), every allocation is counted.
#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: corral::dev::allocations::Counting = corral::dev::allocations::Counting;

/// Otherwise mimalloc: pingora's request path allocates small pieces all the time; glibc's
/// malloc and free were about 11% of the gateway's CPU, mimalloc is about 5% (README, Benchmarks).
#[cfg(not(feature = "count-allocations"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `enum mi_option_e` (v2 and v3); libmimalloc-sys names
/// no constant for it.
#[cfg(not(feature = "count-allocations"))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the system at once. mimalloc purges pages lazily, when the thread
/// that freed them allocates again: after a burst of connections the runtime threads go quiet
/// and kept 150 MiB for good (`cargo bench --bench connections`). Purging at once costs no
/// measurable CPU at a steady load. It overrides `MIMALLOC_PURGE_DELAY` from the environment.
#[cfg(not(feature = "count-allocations"))]
fn return_freed_memory() {
    // SAFETY: a plain write of one of the allocator's options, made first thing in `main`,
    // before any other thread exists (mimalloc reads it whenever it purges).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

fn main() -> std::process::ExitCode {
    #[cfg(feature = "count-allocations")]
    corral::dev::allocations::report_on_signal();
    #[cfg(not(feature = "count-allocations"))]
    return_freed_memory();
    corral::cli::main()
}
