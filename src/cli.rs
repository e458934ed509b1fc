//! The `strata` command line: `serve`, `check`, `reload`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, Source};

/// Strata: one binary that is a whole web stack.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node. Without --config: app + embedded storage on 127.0.0.1:8080.
    Serve {
        /// The node's TOML config; its sections choose the roles.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config and print the effective one (defaults filled in).
    Check {
        /// The TOML config to check.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Parses the command line and runs the command; the binary's `main` is just this.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let c = config::load::load_file(&config)?;
            print!("{}", toml::to_string_pretty(&c)?);
            eprintln!("{}: ok (roles: {})", config.display(), c.roles().join(", "));
            Ok(())
        }
        Command::Serve { config } => {
            init_tracing();
            let source = config.map_or(Source::Default, Source::File);
            // On one core a current-thread runtime skips the work-stealing machinery and
            // its cross-thread wake-ups; blocking work still goes to the blocking pool.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let runtime = if cores == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?
            };
            runtime.block_on(crate::node::run(source))?;
            Ok(())
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
