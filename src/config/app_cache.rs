//! `[app.cache]`: the app's coherent in-memory record cache (stage 5).
//!
//! Off unless the section is present: a cache makes a record written through another app
//! visible here only once the change feed has delivered the write (milliseconds, bounded by
//! `max_staleness`), which is weaker than reading storage every time, so an operator opts
//! in. `[app.cache]` with no keys turns it on with the defaults below.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::load::ConfigError;
use super::units::{Dur, Size};

/// `[app.cache]`: bounds, lifetimes and the change feed the cache follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppCacheConfig {
    /// Total bytes of cached records (keys, bodies, per-entry bookkeeping). Applies live:
    /// shrinking evicts at once.
    pub max_bytes: Size,
    /// A backstop lifetime for every entry, in case an invalidation were ever missed; unset
    /// relies on the change feed alone. Needs a restart to change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Dur>,
    /// How long "no such record" is remembered (0 disables negative entries). Needs a
    /// restart to change.
    pub negative_ttl: Dur,
    /// Longest the app serves cached records without a live change feed; past it every
    /// read goes to storage until the feed has caught up again. Applies live.
    pub max_staleness: Dur,
    /// The storage node (`host:port`, primary or replica) whose change feed the app
    /// follows; unset means the app's storage primary. Not allowed with embedded storage,
    /// whose engine feeds the cache directly. Needs a restart to change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow: Option<String>,
}

impl Default for AppCacheConfig {
    fn default() -> Self {
        AppCacheConfig {
            max_bytes: Size(64 << 20),
            ttl: None,
            negative_ttl: Dur::secs(5),
            max_staleness: Dur::secs(2),
            follow: None,
        }
    }
}

impl AppCacheConfig {
    /// The checks serde cannot express; `embedded` says whether the app's storage is in
    /// this process.
    pub fn validate(&self, path: &Path, embedded: bool) -> Result<(), ConfigError> {
        if self.ttl.is_some_and(|t| t.get().is_zero()) {
            return Err(ConfigError::invalid(
                path,
                "app.cache.ttl",
                "must be positive; leave it unset for no TTL",
            ));
        }
        if self.max_staleness.get().is_zero() {
            return Err(ConfigError::invalid(
                path,
                "app.cache.max_staleness",
                "must be positive (e.g. \"2s\")",
            ));
        }
        if let Some(f) = &self.follow {
            if embedded {
                return Err(ConfigError::invalid(
                    path,
                    "app.cache.follow",
                    "embedded storage feeds the cache directly; remove follow",
                ));
            }
            let ok = f
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::invalid(
                    path,
                    "app.cache.follow",
                    format!("{f:?} is not host:port"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_refuses_what_cannot_work() {
        let p = Path::new("t");
        let ok = AppCacheConfig::default();
        assert!(ok.validate(p, true).is_ok());
        let follow = AppCacheConfig {
            follow: Some("10.0.0.5:7000".into()),
            ..ok.clone()
        };
        assert!(follow.validate(p, false).is_ok());
        let e = follow.validate(p, true).unwrap_err().to_string();
        assert!(e.contains("app.cache.follow"), "{e}");
        let bad = AppCacheConfig {
            follow: Some("nohost".into()),
            ..ok.clone()
        };
        assert!(bad.validate(p, false).is_err());
        let zero = AppCacheConfig {
            max_staleness: Dur::secs(0),
            ..ok.clone()
        };
        assert!(zero.validate(p, true).is_err());
        let ttl = AppCacheConfig {
            ttl: Some(Dur::secs(0)),
            ..ok
        };
        assert!(ttl.validate(p, true).is_err());
    }

    #[test]
    fn parses_from_toml_with_defaults() {
        let c: AppCacheConfig =
            toml::from_str("max_bytes = \"1MiB\"\nmax_staleness = \"500ms\"").unwrap();
        assert_eq!(c.max_bytes.bytes(), 1 << 20);
        assert_eq!(c.max_staleness.get(), std::time::Duration::from_millis(500));
        assert_eq!(c.negative_ttl, Dur::secs(5));
        assert!(toml::from_str::<AppCacheConfig>("max_byte = 1").is_err());
    }
}
