//! The `strata` executable: parses the command line and hands over to the library.

/// mimalloc instead of glibc's malloc: every role allocates small, short-lived buffers per
/// request (header maps, frames, bodies), and glibc's free-list bookkeeping (`_int_free`,
/// `malloc_consolidate`) was ~17% of the app's instructions per request under callgrind.
/// Set here, in the binary, so the library stays allocator-neutral for embedders.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match strata::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
