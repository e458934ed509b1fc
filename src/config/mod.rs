//! Configuration: the model, loading with precise errors, secrets, units, and the live copy
//! every role reads.
//!
//! The running config sits behind [`arc_swap::ArcSwap`]: readers take a cheap snapshot per
//! request, and a reload replaces the whole value at once, so no request ever sees half of
//! an old config and half of a new one.

pub mod app_cache;
pub mod balancer;
pub mod edge;
pub mod load;
pub mod model;
pub mod secrets;
pub mod storage;
pub mod units;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use app_cache::AppCacheConfig;
pub use balancer::BalancerConfig;
pub use load::ConfigError;
pub use model::{AppConfig, Config, HttpLimits, NodeConfig, Scope, TokenConfig};
pub use storage::{
    ClientTls, RemoteStorage, ServerTls, StorageConfig, StorageMode, StorageTarget, SyncPolicy,
};
pub use units::{Dur, Size};

/// Where the running config came from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A file, re-read on reload.
    File(PathBuf),
    /// The built-in embedded default (`strata serve` without `--config`).
    Default,
}

impl Source {
    /// Loads and validates the config from this source.
    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Source::File(path) => load::load_file(path),
            Source::Default => {
                let config = Config::embedded_default();
                load::validate(Path::new("<default>"), &config)?;
                Ok(config)
            }
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

/// Whether an `[app.cache]` change needs a restart: switching it on or off, or anything but
/// `max_bytes` and `max_staleness`, which apply live.
fn app_cache_restart(a: Option<&AppCacheConfig>, b: Option<&AppCacheConfig>) -> bool {
    match (a, b) {
        (None, None) => false,
        (Some(a), Some(b)) => {
            a.ttl != b.ttl || a.negative_ttl != b.negative_ttl || a.follow != b.follow
        }
        _ => true,
    }
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
    if old.node.log_retention != new.node.log_retention {
        changed.push("node.log_retention");
    }
    if old.node.cluster_secret != new.node.cluster_secret
        || old.node.cluster_secret_file != new.node.cluster_secret_file
    {
        changed.push("node.cluster_secret");
    }
    if old.storage != new.storage {
        changed.push("storage");
    }
    if let (Some(a), Some(b)) = (&old.app, &new.app) {
        if a.listen != b.listen {
            changed.push("app.listen");
        }
        if a.static_dir != b.static_dir {
            changed.push("app.static_dir");
        }
        if a.storage != b.storage {
            changed.push("app.storage");
        }
        if a.http != b.http {
            changed.push("app.http");
        }
        if app_cache_restart(a.cache.as_ref(), b.cache.as_ref()) {
            changed.push("app.cache (on/off, ttl, negative_ttl, follow)");
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
        if a.tls != b.tls {
            changed.push("edge.tls");
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
