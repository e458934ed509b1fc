//! The config model: one serde struct per TOML section. A present section switches its role
//! on; every field has a default so a config names only what it changes.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::balancer::BalancerConfig;
pub use super::storage::{StorageConfig, StorageTarget};
use super::units::{Dur, Size};
use crate::app::static_files::CacheRule;

/// The whole config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings of this node regardless of its roles.
    #[serde(default)]
    pub node: NodeConfig,
    /// The app role: data API and static files. Present in the no-config default.
    pub app: Option<AppConfig>,
    /// The storage role: serves this node's engine to apps over TCP.
    pub storage: Option<StorageConfig>,
    /// The balancer role: a reverse proxy spreading requests over app servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balancer: Option<BalancerConfig>,
    /// The edge role: an RFC 9111 HTTP cache in front of the origins.
    pub edge: Option<super::edge::EdgeConfig>,
}

impl Config {
    /// The config `strata serve` runs without a file: the app role with embedded storage,
    /// everything on loopback.
    pub fn embedded_default() -> Self {
        Config {
            node: NodeConfig::default(),
            app: Some(AppConfig::default()),
            storage: None,
            balancer: None,
            edge: None,
        }
    }

    /// Names of the roles this config switches on, for logs and status pages.
    pub fn roles(&self) -> Vec<&'static str> {
        let mut roles = Vec::new();
        if self.app.is_some() {
            roles.push("app");
        }
        if self.storage.is_some() {
            roles.push("storage");
        }
        if self.balancer.is_some() {
            roles.push("balancer");
        }
        if self.edge.is_some() {
            roles.push("edge");
        }
        roles
    }
}

/// `[node]`: identity, data directory, admin listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Name shown in logs, metrics and status pages; tells fleet members apart.
    pub name: String,
    /// Where the embedded storage keeps its files. Needs a restart to change.
    pub data_dir: PathBuf,
    /// Admin listener: `/healthz`, `/readyz`, `/metrics`, `/admin/*`. Keep it private.
    pub admin: SocketAddr,
    /// Shared secret that storage nodes and apps prove to each other (inline; prefer
    /// `cluster_secret_file` or the `STRATA_CLUSTER_SECRET` env var).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "redact")]
    pub cluster_secret: Option<String>,
    /// File holding the cluster secret; refused when readable by other users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_secret_file: Option<PathBuf>,
    /// How many replication log entries storage keeps behind the newest one. Replicas that
    /// fall further behind resync from a snapshot.
    pub log_retention: u64,
    /// Log one line per request (target `access`). Applies live.
    pub access_log: bool,
    /// How long shutdown waits for in-flight requests before it gives up on them.
    pub shutdown_grace: Dur,
    /// Reload by itself when the config file changes (polled every second, content
    /// compared, so editors that save by rename work too). Applies live.
    pub watch_config: bool,
    /// Bearer tokens for this node's admin endpoints (`/metrics`, `/admin/*`), whatever
    /// its roles: a storage-only node has no `[app]` tokens, yet `/admin/promote` must
    /// not be open. Each needs the `admin` scope. Applies live.
    pub admin_tokens: Vec<TokenConfig>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: "strata".into(),
            data_dir: "strata-data".into(),
            admin: SocketAddr::from(([127, 0, 0, 1], 9900)),
            cluster_secret: None,
            cluster_secret_file: None,
            log_retention: 100_000,
            access_log: false,
            shutdown_grace: Dur::secs(10),
            watch_config: true,
            admin_tokens: Vec::new(),
        }
    }
}

/// `[app]`: the data API and static files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// Where the data API and static files are served. Needs a restart to change.
    pub listen: SocketAddr,
    /// Directory of static files; unset means `./public` when it exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_dir: Option<PathBuf>,
    /// `Cache-Control` per static path pattern; first match wins. Applies live.
    pub static_cache: Vec<CacheRule>,
    /// Where records live: `"embedded"` (this process, under `data_dir`) or a storage
    /// server, `{ primary = "host:port" }`.
    pub storage: StorageTarget,
    /// Largest request body accepted (413 above). Applies live.
    pub max_body: Size,
    /// Listing page size when the request names none. Applies live.
    pub list_default_limit: usize,
    /// Largest listing page a request may ask for. Applies live.
    pub list_max_limit: usize,
    /// Most writes one `POST /api/v1/batch` may carry. Applies live.
    pub max_batch_writes: usize,
    /// Bearer tokens and their scopes. None configured = anonymous access, allowed only on
    /// loopback unless `allow_anonymous`. Applies live.
    pub tokens: Vec<TokenConfig>,
    /// Permit anonymous access on non-loopback listeners. Off by default so a server is
    /// never opened to a network by accident.
    pub allow_anonymous: bool,
    /// Connection limits and timeouts of the listener.
    pub http: HttpLimits,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            static_dir: None,
            static_cache: vec![
                CacheRule {
                    pattern: "assets/**".into(),
                    cache_control: "public, max-age=31536000, immutable".into(),
                },
                CacheRule {
                    pattern: "**/*.html".into(),
                    cache_control: "no-cache".into(),
                },
            ],
            storage: StorageTarget::default(),
            max_body: Size(1 << 20),
            list_default_limit: 100,
            list_max_limit: 1000,
            max_batch_writes: 1000,
            tokens: Vec::new(),
            allow_anonymous: false,
            http: HttpLimits::default(),
        }
    }
}

/// What a bearer token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// GET/HEAD on the data API.
    Read,
    /// PUT/POST/PATCH/DELETE on the data API.
    Write,
    /// The admin endpoints beyond health checks.
    Admin,
}

/// One bearer token. Its value comes from exactly one of `value`, `value_env`, `value_file`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A label for logs (never the token itself).
    pub name: String,
    /// What the token allows.
    pub scopes: Vec<Scope>,
    /// The token inline (fine for tests; prefer env or file in production).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "redact")]
    pub value: Option<String>,
    /// Name of an environment variable holding the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_env: Option<String>,
    /// File holding the token; refused when readable by other users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_file: Option<PathBuf>,
}

fn redact<S: serde::Serializer>(_: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

/// Limits and timeouts of an HTTP listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Time a client has to send a request's headers (defends against slowloris).
    pub header_read_timeout: Dur,
    /// Largest request head (request line plus headers).
    pub max_header_bytes: Size,
    /// Most open connections; further clients wait in the accept backlog.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Dur::secs(10),
            max_header_bytes: Size(64 << 10),
            max_connections: 10_000,
        }
    }
}
