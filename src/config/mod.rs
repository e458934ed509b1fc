//! Configuration: the model, loading with precise errors, secrets, units, and the live copy
//! every role reads.
//!
//! The running config sits behind [`arc_swap::ArcSwap`]: readers take a cheap snapshot per
//! request, and a reload replaces the whole value at once, so no request ever sees half of
//! an old config and half of a new one.

pub mod balancer;
pub mod edge;
pub mod load;
pub mod model;
pub mod overrides;
pub mod secrets;
pub mod storage;
pub mod units;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use balancer::BalancerConfig;
pub use load::ConfigError;
pub use model::{AppConfig, Config, HttpLimits, NodeConfig, Scope, TokenConfig};
pub use overrides::Overrides;
pub use storage::{
    ClientTls, RemoteStorage, ServerTls, StorageConfig, StorageMode, StorageTarget, SyncPolicy,
};
pub use units::{Dur, Size};

/// Where the running config came from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A file, re-read on reload.
    File(PathBuf),
    /// A file adjusted by `--port-offset` / `--data-root` (re-applied on every reload).
    Adjusted(PathBuf, Overrides),
    /// The built-in embedded default (`strata serve` without `--config`).
    Default,
}

impl Source {
    /// A file source with command-line adjustments (plain [`Source::File`] when none).
    pub fn file(path: PathBuf, overrides: Overrides) -> Self {
        if overrides.is_empty() {
            Source::File(path)
        } else {
            Source::Adjusted(path, overrides)
        }
    }

    /// Loads and validates the config from this source.
    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Source::File(path) => load::load_file(path),
            Source::Adjusted(path, overrides) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let mut config = load::parse(path, &text)?;
                overrides
                    .apply(&mut config)
                    .map_err(|(field, reason)| ConfigError::invalid(path, &field, reason))?;
                load::validate(path, &config)?;
                Ok(config)
            }
            Source::Default => {
                let config = Config::embedded_default();
                load::validate(Path::new("<default>"), &config)?;
                Ok(config)
            }
        }
    }

    /// The file behind this source, if any (what the file watcher polls).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Source::File(p) | Source::Adjusted(p, _) => Some(p),
            Source::Default => None,
        }
    }

    /// For status pages: the file and any adjustments.
    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Adjusted(p, o) => format!(
                "{} (port offset {}{})",
                p.display(),
                o.port_offset,
                o.data_root
                    .as_ref()
                    .map(|r| format!(", data root {}", r.display()))
                    .unwrap_or_default()
            ),
            Source::Default => "<built-in default>".to_owned(),
        }
    }
}

/// The config a node runs with, swappable at run time.
pub struct LiveConfig {
    source: Source,
    current: ArcSwap<Config>,
}

impl LiveConfig {
    /// Wraps an already validated config.
    pub fn new(source: Source, config: Config) -> Self {
        LiveConfig {
            source,
            current: ArcSwap::from_pointee(config),
        }
    }

    /// The current config (a cheap pointer copy; hold it for one request, not forever).
    pub fn get(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Where it came from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Replaces the current config; the caller has validated it.
    pub fn store(&self, config: Config) {
        self.current.store(Arc::new(config));
    }
}

/// A short stable fingerprint of a config, shown in status pages so an operator can tell
/// whether two nodes (or a node before and after reload) run the same settings.
pub fn version(config: &Config) -> String {
    let text = toml::to_string(config).unwrap_or_default();
    format!("{:08x}", crc32fast::hash(text.as_bytes()))
}

/// Settings that differ between two configs but only take effect after a restart.
pub fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.roles() != new.roles() {
        changed.push("the set of roles");
    }
    if old.node.data_dir != new.node.data_dir {
        changed.push("node.data_dir");
    }
    if old.node.admin != new.node.admin {
        changed.push("node.admin");
    }
    if old.node.shutdown_grace != new.node.shutdown_grace {
        changed.push("node.shutdown_grace");
    }
    if old.node.log_retention != new.node.log_retention {
        changed.push("node.log_retention");
    }
    if old.node.cluster_secret != new.node.cluster_secret
        || old.node.cluster_secret_file != new.node.cluster_secret_file
    {
        changed.push("node.cluster_secret");
    }
    // sync_replicas, sync_timeout, sync_policy and max_lag apply live; the rest of the
    // section (listener, mode, follow, TLS, limits) waits for a restart.
    let storage_fixed = |c: &Config| {
        c.storage.clone().map(|mut s| {
            s.sync_replicas = 0;
            s.sync_timeout = Dur::secs(0);
            s.sync_policy = SyncPolicy::default();
            s.max_lag = Dur::secs(0);
            s
        })
    };
    if storage_fixed(old) != storage_fixed(new) {
        changed.push("storage (listen, mode, follow, TLS, limits)");
    }
    if let (Some(a), Some(b)) = (&old.app, &new.app) {
        if a.listen != b.listen {
            changed.push("app.listen");
        }
        if a.static_dir != b.static_dir {
            changed.push("app.static_dir");
        }
        // replicas, max_lag and token_wait apply live; the primary and the link settings
        // wait for a restart.
        let fixed = |t: &StorageTarget| match t {
            StorageTarget::Remote(r) => {
                let mut r = r.clone();
                r.replicas.clear();
                r.max_lag = Dur::secs(0);
                r.token_wait = Dur::secs(0);
                StorageTarget::Remote(r)
            }
            StorageTarget::Embedded => StorageTarget::Embedded,
        };
        if fixed(&a.storage) != fixed(&b.storage) {
            changed.push("app.storage (primary, TLS, connections, timeouts)");
        }
        if a.http != b.http {
            changed.push("app.http");
        }
    }
    if let (Some(a), Some(b)) = (&old.balancer, &new.balancer) {
        if a.listen != b.listen {
            changed.push("balancer.listen");
        }
        if a.http != b.http {
            changed.push("balancer.http");
        }
        if a.tls.is_some() != b.tls.is_some() {
            changed.push("balancer.tls (switching TLS on or off)");
        }
    }
    if let (Some(a), Some(b)) = (&old.edge, &new.edge) {
        if a.listen != b.listen {
            changed.push("edge.listen");
        }
        if a.tls.is_some() != b.tls.is_some() {
            changed.push("edge.tls (switching TLS on or off)");
        }
        if a.http != b.http {
            changed.push("edge.http");
        }
    }
    changed
}

/// What the last reload did, for logs, `/admin/status` and `strata reload`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReloadReport {
    /// When it ran (RFC 3339).
    pub at: String,
    /// Whether the new config was applied.
    pub applied: bool,
    /// The version now in force.
    pub version: String,
    /// Why it was refused, or what changed.
    pub message: String,
    /// Settings that changed in the file but wait for a restart.
    pub restart_required: Vec<String>,
}

impl ReloadReport {
    /// A report stamped now.
    pub fn now(
        applied: bool,
        version: String,
        message: String,
        restart_required: Vec<String>,
    ) -> Self {
        ReloadReport {
            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            applied,
            version,
            message,
            restart_required,
        }
    }
}
