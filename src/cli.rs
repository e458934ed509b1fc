//! The `strata` command line: `serve`, `check`, `promote`, `restore`, `reload`, `status`,
//! `fleet`.

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
        /// Adjustments to the config file (kept on reload).
        #[command(flatten)]
        adjust: Adjust,
    },
    /// Validate a config and print the effective one (defaults filled in).
    Check {
        /// The TOML config to check.
        #[arg(long, short)]
        config: PathBuf,
        /// Adjustments to the config file.
        #[command(flatten)]
        adjust: Adjust,
    },
    /// Run every node config (*.toml) of a directory as child processes: prefixed logs,
    /// wait until all are ready, print their URLs, forward SIGHUP and SIGTERM.
    Fleet {
        /// The directory of node configs, e.g. config/stage6.
        dir: PathBuf,
        /// Adjustments passed to every node.
        #[command(flatten)]
        adjust: Adjust,
        /// How long every node has to report ready.
        #[arg(long, default_value = "60s")]
        ready_timeout: humantime::Duration,
    },
    /// Print a table of node, roles, readiness, config version, LSN and lag, cache hit
    /// ratios and backend health, from each node's /admin/status.
    Status {
        /// An admin address (host:port), a node config file, or a fleet directory.
        target: String,
        /// An admin-scoped bearer token (or STRATA_ADMIN_TOKEN); default: the first admin
        /// token the config names, when its value is available.
        #[arg(long)]
        token: Option<String>,
        /// Adjustments, as given to `strata fleet` / `strata serve`.
        #[command(flatten)]
        adjust: Adjust,
    },
    /// Make nodes re-read their config (POST /admin/reload); prints each node's outcome
    /// and fails if any refused.
    Reload {
        /// An admin address (host:port), a node config file, or a fleet directory.
        target: Option<String>,
        /// The node's config file (its admin address and token are read from it).
        #[arg(long, short, conflicts_with_all = ["target", "admin"])]
        config: Option<PathBuf>,
        /// The node's admin listener, host:port.
        #[arg(long, conflicts_with = "target")]
        admin: Option<String>,
        /// An admin-scoped bearer token (or STRATA_ADMIN_TOKEN).
        #[arg(long)]
        token: Option<String>,
        /// Adjustments, as given to `strata fleet` / `strata serve`.
        #[command(flatten)]
        adjust: Adjust,
    },
    /// Promote a storage replica to primary of a new epoch (POST /admin/promote). Stop
    /// or fence the old primary first; see the README's failover procedure.
    Promote {
        /// The replica's admin listener, host:port.
        #[arg(long)]
        admin: String,
        /// An admin-scoped bearer token (or STRATA_ADMIN_TOKEN).
        #[arg(long)]
        token: Option<String>,
    },
    /// Restore a backup (from `GET /admin/backup`) into a new data directory, checking
    /// it completely first; prints the LSN, record count and content hash.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create (must not exist or be empty).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// `--port-offset` and `--data-root`: run shipped configs on other ports and data
/// directories without editing them (two fleets on one laptop; tests).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Adjust {
    /// Add N to every port the config names (listeners and the addresses it connects to).
    #[arg(long, default_value_t = 0)]
    pub port_offset: u16,
    /// Place relative data directories under this directory.
    #[arg(long)]
    pub data_root: Option<PathBuf>,
}

impl Adjust {
    fn overrides(&self) -> config::Overrides {
        config::Overrides {
            port_offset: self.port_offset,
            data_root: self.data_root.clone(),
        }
    }
}

/// Parses the command line and runs the command; the binary's `main` is just this.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, adjust } => {
            let c = Source::file(config.clone(), adjust.overrides()).load()?;
            print!("{}", toml::to_string_pretty(&c)?);
            eprintln!("{}: ok (roles: {})", config.display(), c.roles().join(", "));
            Ok(())
        }
        Command::Promote { admin, token } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let token = token.or_else(|| std::env::var("STRATA_ADMIN_TOKEN").ok());
            let (status, body) = runtime.block_on(crate::fleet::client::call(
                http::Method::POST,
                &admin,
                "/admin/promote",
                token.as_deref(),
                std::time::Duration::from_secs(30),
            ))?;
            println!("{}", body.trim_end());
            if !(200..300).contains(&status) {
                anyhow::bail!("promotion refused (HTTP {status})");
            }
            Ok(())
        }
        Command::Fleet {
            dir,
            adjust,
            ready_timeout,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crate::fleet::run(crate::fleet::FleetOptions {
                dir,
                overrides: adjust.overrides(),
                ready_timeout: ready_timeout.into(),
            }))?;
            Ok(())
        }
        Command::Status {
            target,
            token,
            adjust,
        } => {
            let token = token.or_else(|| std::env::var("STRATA_ADMIN_TOKEN").ok());
            let targets = crate::fleet::targets(&target, &adjust.overrides(), token)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (table, all_ready) = runtime.block_on(crate::fleet::status(&targets));
            print!("{table}");
            if !all_ready {
                anyhow::bail!("not every node is ready");
            }
            Ok(())
        }
        Command::Reload {
            target,
            config,
            admin,
            token,
            adjust,
        } => {
            let token = token.or_else(|| std::env::var("STRATA_ADMIN_TOKEN").ok());
            let spec = match (target, config, admin) {
                (Some(t), _, _) | (None, None, Some(t)) => t,
                (None, Some(c), _) => c.display().to_string(),
                (None, None, None) => {
                    anyhow::bail!(
                        "name a node: an admin address, --config FILE or a fleet directory"
                    )
                }
            };
            let targets = crate::fleet::targets(&spec, &adjust.overrides(), token)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (lines, ok) = runtime.block_on(crate::fleet::reload(&targets));
            for l in lines {
                println!("{l}");
            }
            if !ok {
                anyhow::bail!("not every node applied its config");
            }
            Ok(())
        }
        Command::Restore { from, data_dir } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let file = std::fs::File::open(&from)
                .map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
            let retention = config::Config::default().node.log_retention;
            let restored = runtime.block_on(crate::storage::backup::restore(
                std::io::BufReader::new(file),
                &data_dir,
                retention,
            ))?;
            println!("{}", serde_json::to_string_pretty(&restored)?);
            eprintln!(
                "strata: restored {} records at LSN {} into {}",
                restored.records,
                restored.lsn,
                restored.data_dir.display()
            );
            Ok(())
        }
        Command::Serve { config, adjust } => {
            init_tracing();
            if !crate::fleet::stop_with_parent() {
                anyhow::bail!("the strata fleet that started this node is gone");
            }
            let source = config.map_or(Source::Default, |c| Source::file(c, adjust.overrides()));
            // On one core a current-thread runtime skips the work-stealing machinery and
            // its cross-thread wake-ups; blocking work still goes to the blocking pool.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let runtime = if cores == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(crate::wake::before_park)
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .on_thread_park(crate::wake::before_park)
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
