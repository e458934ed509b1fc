//! The `strata` executable: parses the command line and hands over to the library.

fn main() -> std::process::ExitCode {
    match strata::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
