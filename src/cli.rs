//! The `strata` command line: `serve`, `check`, `promote`, `restore`.

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
        Command::Promote { admin, token } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let token = token.or_else(|| std::env::var("STRATA_ADMIN_TOKEN").ok());
            let (status, body) = runtime.block_on(post(&admin, "/admin/promote", token))?;
            println!("{}", body.trim_end());
            if !(200..300).contains(&status) {
                anyhow::bail!("promotion refused (HTTP {status})");
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

/// A minimal HTTP/1.1 POST to an admin listener (no body), with a deadline: returns the
/// status and the response body.
async fn post(addr: &str, path: &str, token: Option<String>) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within 30s"))??;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{addr} did not answer HTTP"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Chunked bodies: keep only the JSON part for the operator.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if a < b => &body[a..=b],
        _ => body,
    };
    Ok((status, body.to_owned()))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
