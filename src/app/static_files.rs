//! Static files from `static_dir`. STUB: the interface is fixed; the implementation is being
//! written (see the static-files task).

use std::path::{Path, PathBuf};

use http::{HeaderMap, Method, Response};

use crate::http::body::{self, Body};

/// One `Cache-Control` rule: requests whose path matches `pattern` (a glob over the path
/// relative to the root, e.g. `assets/**` or `*.html`) get `cache_control`. First match wins.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// Glob over the path relative to the root.
    pub pattern: String,
    /// The `Cache-Control` value to send.
    pub cache_control: String,
}

/// Why the static file server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    /// The root directory is missing or unreadable.
    #[error("static_dir {path}: {source}")]
    Root {
        /// The configured root.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A cache rule's pattern is not a valid glob.
    #[error("static cache rule pattern {pattern:?}: {reason}")]
    Pattern {
        /// The bad pattern.
        pattern: String,
        /// Why.
        reason: String,
    },
}

/// Compiled cache rules, swapped as a whole on config reload.
#[derive(Debug, Default)]
pub struct CacheRules {}

impl CacheRules {
    /// Compiles rules; fails on a bad glob.
    pub fn new(_rules: &[CacheRule]) -> Result<Self, StaticError> {
        Ok(CacheRules {})
    }
}

/// Serves files under one root directory.
pub struct StaticFiles {
    _root: PathBuf,
}

impl StaticFiles {
    /// Opens the root (it must exist and be a directory).
    pub fn new(root: &Path) -> Result<Self, StaticError> {
        Ok(StaticFiles {
            _root: root.to_path_buf(),
        })
    }

    /// Answers a GET or HEAD for the raw (still percent-encoded) request path, which has
    /// the app's mount prefix already removed. Returns `None` when no file matches, so the
    /// caller answers its own 404.
    pub async fn serve(
        &self,
        _method: &Method,
        _raw_path: &str,
        _headers: &HeaderMap,
        _rules: &CacheRules,
    ) -> Option<Response<Body>> {
        let _ = body::empty();
        None
    }
}
