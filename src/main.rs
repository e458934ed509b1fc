//! The `strata` executable: parses the command line and hands over to the library.

/// jemalloc rather than glibc's allocator: 7 % fewer CPU cycles per durable PUT on the
/// storage server (BENCHMARKS.md, "Commit journal"), for a few MB more resident memory.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    match strata::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
