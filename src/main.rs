/// With `--features count-allocations` (benches/allocations.rs), every allocation is counted.
#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: corral::dev::allocations::Counting = corral::dev::allocations::Counting;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "count-allocations")]
    corral::dev::allocations::report_on_signal();
    corral::cli::main()
}
