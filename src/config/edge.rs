//! `[edge]`: the HTTP cache (CDN tier) in front of the balancer or the apps.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::balancer::TlsConfig;
use super::load::ConfigError;
use super::model::{HttpLimits, TokenConfig};
use super::units::{Dur, Size};

/// `[edge]`: where the cache listens, what it forwards to, and how much it keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Where clients connect. Needs a restart to change.
    pub listen: SocketAddr,
    /// Origins (`host:port`), used round robin; one that fails is skipped for
    /// `upstream_down_for`. Applies live.
    pub upstreams: Vec<String>,
    /// Sizes of the object store. Applies live (shrinking evicts at once).
    pub cache: EdgeCacheConfig,
    /// TLS termination: a default certificate, per-name ones chosen by SNI, ALPN h2 and
    /// http/1.1 (the same settings as `balancer.tls`). Unset serves plain HTTP/1.1 and h2c.
    /// Certificates reload live; switching TLS on or off needs a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Accept the non-standard `PURGE` method on the public listener. Off by default: anyone
    /// who reaches the listener could empty the cache. Prefer `POST /admin/purge`.
    pub purge_method: bool,
    /// Compress compressible types (text, JSON, JS, SVG, XML) with gzip or brotli when the
    /// origin sent them unencoded and the client accepts it. Applies live.
    pub compress: bool,
    /// Time to connect to an origin. Applies live.
    pub connect_timeout: Dur,
    /// Time an origin has to send the response head, and then to send each body chunk.
    /// Applies live.
    pub upstream_timeout: Dur,
    /// How long a skipped (failed) origin stays out of rotation. Applies live.
    pub upstream_down_for: Dur,
    /// Longest a request waits for another request's fetch of the same object before going
    /// upstream itself. Applies live.
    pub coalesce_wait: Dur,
    /// How stale a stored response may be and still be served when no origin can be
    /// reached at all (refused, reset, timed out; not a 5xx answer), as RFC 9111 §4.2.4
    /// allows a disconnected cache. `must-revalidate`, `proxy-revalidate`, `s-maxage` and
    /// `no-cache` always forbid it. `"0s"` turns it off. Applies live.
    pub stale_if_unreachable: Dur,
    /// Fraction of the time since `Last-Modified` used as heuristic freshness, for responses
    /// with no explicit freshness whose status allows heuristics (RFC 9111 §4.2.2). Zero
    /// disables heuristics. Applies live.
    pub heuristic_fraction: f64,
    /// Upper bound of a heuristic freshness lifetime. Applies live.
    pub heuristic_max: Dur,
    /// Listener limits and timeouts. Needs a restart to change.
    pub http: HttpLimits,
    /// Active health checks of the origins (off unless `path` is set). Applies live.
    pub health: EdgeHealth,
    /// Bearer tokens for the admin endpoints (`/admin/purge` needs the admin scope), on
    /// nodes without an `[app]` section to declare them. Applies live.
    pub tokens: Vec<TokenConfig>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            upstreams: Vec::new(),
            cache: EdgeCacheConfig::default(),
            tls: None,
            purge_method: false,
            compress: true,
            connect_timeout: Dur::secs(3),
            upstream_timeout: Dur::secs(30),
            upstream_down_for: Dur::secs(5),
            coalesce_wait: Dur::secs(10),
            stale_if_unreachable: Dur::secs(86_400),
            heuristic_fraction: 0.1,
            heuristic_max: Dur::secs(86_400),
            http: HttpLimits::default(),
            health: EdgeHealth::default(),
            tokens: Vec::new(),
        }
    }
}

/// `[edge.health]`: active probes, on top of the passive skipping of an origin that fails
/// a request. An origin whose probes fail `fall` times in a row takes no requests until
/// `rise` probes in a row succeed (a probe succeeds when `GET path` answers below 500).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeHealth {
    /// Path probed; empty (the default) turns active checks off.
    pub path: String,
    /// Time between probes of one origin.
    pub interval: Dur,
    /// Time a probe may take.
    pub timeout: Dur,
    /// Successes in a row that bring an origin back.
    pub rise: u32,
    /// Failures in a row that take an origin out.
    pub fall: u32,
}

impl Default for EdgeHealth {
    fn default() -> Self {
        EdgeHealth {
            path: String::new(),
            interval: Dur::secs(2),
            timeout: Dur::secs(1),
            rise: 2,
            fall: 2,
        }
    }
}

/// `[edge.cache]`: the object store's bounds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeCacheConfig {
    /// Total bytes of stored responses (bodies, headers, keys, bookkeeping).
    pub max_bytes: Size,
    /// Largest body stored; larger responses stream through without being buffered.
    pub max_object_size: Size,
}

impl Default for EdgeCacheConfig {
    fn default() -> Self {
        EdgeCacheConfig {
            max_bytes: Size(256 << 20),
            max_object_size: Size(8 << 20),
        }
    }
}

impl EdgeConfig {
    /// The checks serde cannot express.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(ConfigError::invalid(
                path,
                "edge.upstreams",
                "name at least one origin, e.g. upstreams = [\"127.0.0.1:8080\"]",
            ));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let ok = u
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok || u.contains('/') {
                return Err(ConfigError::invalid(
                    path,
                    &format!("edge.upstreams[{i}]"),
                    format!("{u:?} is not host:port"),
                ));
            }
        }
        if self.cache.max_object_size.bytes() == 0
            || self.cache.max_object_size > self.cache.max_bytes
        {
            return Err(ConfigError::invalid(
                path,
                "edge.cache.max_object_size",
                "must be more than 0 and at most cache.max_bytes",
            ));
        }
        if !(0.0..=1.0).contains(&self.heuristic_fraction) {
            return Err(ConfigError::invalid(
                path,
                "edge.heuristic_fraction",
                "must be between 0 and 1",
            ));
        }
        for (field, d) in [
            ("edge.connect_timeout", self.connect_timeout),
            ("edge.upstream_timeout", self.upstream_timeout),
            ("edge.coalesce_wait", self.coalesce_wait),
        ] {
            if d.get().is_zero() {
                return Err(ConfigError::invalid(path, field, "must be more than 0"));
            }
        }
        let h = &self.health;
        if !h.path.is_empty() && !h.path.starts_with('/') {
            return Err(ConfigError::invalid(
                path,
                "edge.health.path",
                "must start with / (or be empty to turn probes off)",
            ));
        }
        if h.interval.get().is_zero() || h.timeout.get().is_zero() || h.rise == 0 || h.fall == 0 {
            return Err(ConfigError::invalid(
                path,
                "edge.health",
                "interval and timeout must be more than 0, rise and fall at least 1",
            ));
        }
        if self.http.max_connections == 0 {
            return Err(ConfigError::invalid(
                path,
                "edge.http.max_connections",
                "must be at least 1",
            ));
        }
        for (i, token) in self.tokens.iter().enumerate() {
            super::secrets::resolve_token(token).map_err(|e| {
                ConfigError::invalid(path, &format!("edge.tokens[{i}]"), e.to_string())
            })?;
        }
        if let Some(tls) = &self.tls {
            crate::tls::listener_config(tls)
                .map_err(|e| ConfigError::invalid(path, "edge.tls", e.to_string()))?;
        }
        Ok(())
    }
}
