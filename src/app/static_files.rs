//! Static files from `static_dir`.
//!
//! Request paths are validated before anything touches the filesystem: the raw path is
//! split on `/` first and each segment percent-decoded exactly once, and a segment that is
//! empty, starts with `.` (this covers `.`, `..` and hidden files), or contains `/`, `\\`,
//! NUL or another control character refuses the request. Whatever survives is still
//! canonicalised and must stay under the canonical root, which is what stops symlinks that
//! lead outside.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use http::header::HeaderValue;
use http::{HeaderMap, Method, Response};
use percent_encoding::percent_decode_str;

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

/// Source of [`CacheRules::generation`] values; 0 is reserved for the empty default rules.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Compiled cache rules, swapped as a whole on config reload.
///
/// Each compiled set carries a process-unique generation number so cached files can memoise
/// their `Cache-Control` value and notice cheaply (one integer compare) when the rules they
/// memoised against were replaced.
#[derive(Debug, Default)]
pub struct CacheRules {
    set: GlobSet,
    values: Vec<HeaderValue>,
    generation: u64,
}

impl CacheRules {
    /// Compiles rules; fails on a bad glob.
    ///
    /// Globs use `literal_separator`: `*` and `?` never cross a `/`, only `**` does, so
    /// `*.html` matches top-level files only and `**/*.html` matches at any depth. A leading
    /// `/` in a pattern is ignored, since paths are matched without one. A `cache_control`
    /// that is not a valid header value is also reported as [`StaticError::Pattern`] (naming
    /// the rule's pattern) so that the error enum stays unchanged.
    pub fn new(rules: &[CacheRule]) -> Result<Self, StaticError> {
        if rules.is_empty() {
            return Ok(CacheRules::default());
        }
        let mut builder = GlobSetBuilder::new();
        let mut values = Vec::with_capacity(rules.len());
        for rule in rules {
            let pattern = rule.pattern.strip_prefix('/').unwrap_or(&rule.pattern);
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| StaticError::Pattern {
                    pattern: rule.pattern.clone(),
                    reason: e.kind().to_string(),
                })?;
            builder.add(glob);
            let value =
                HeaderValue::from_str(&rule.cache_control).map_err(|_| StaticError::Pattern {
                    pattern: rule.pattern.clone(),
                    reason: format!(
                        "cache_control {:?} is not a valid header value",
                        rule.cache_control
                    ),
                })?;
            values.push(value);
        }
        let set = builder.build().map_err(|e| StaticError::Pattern {
            pattern: rules
                .iter()
                .map(|r| r.pattern.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            reason: e.to_string(),
        })?;
        Ok(CacheRules {
            set,
            values,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The `Cache-Control` value of the first rule matching `rel` (relative, no leading `/`).
    fn lookup(&self, rel: &str) -> Option<HeaderValue> {
        if self.values.is_empty() {
            return None;
        }
        let first = self.set.matches(rel).into_iter().min()?;
        self.values.get(first).cloned()
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
        let _ = request_key(_raw_path)?;
        let _ = (_rules.lookup(""), _rules.generation);
        None
    }
}

/// Turns the raw request path into the cache key: the decoded path relative to the root,
/// without a leading `/`, keeping a trailing `/` (a directory request; `""` is the root).
/// `None` for anything that could step outside the root or name a hidden file.
///
/// A path without `%` is already its own decoding, so the common case borrows.
fn request_key(raw: &str) -> Option<Cow<'_, str>> {
    let raw = match raw.find(['?', '#']) {
        Some(end) => &raw[..end],
        None => raw,
    };
    let rel = raw.strip_prefix('/').unwrap_or(raw);
    let body = rel.strip_suffix('/').unwrap_or(rel);
    if body.is_empty() {
        // "" or "/" is the root; "//" is an empty segment.
        return rel.is_empty().then_some(Cow::Borrowed(""));
    }
    if !rel.contains('%') {
        return body
            .split('/')
            .all(segment_ok)
            .then_some(Cow::Borrowed(rel));
    }
    let mut key = String::with_capacity(rel.len());
    for segment in body.split('/') {
        let decoded = percent_decode_str(segment).decode_utf8().ok()?;
        if !segment_ok(&decoded) {
            return None;
        }
        if !key.is_empty() {
            key.push('/');
        }
        key.push_str(&decoded);
    }
    if rel.len() > body.len() {
        key.push('/');
    }
    Some(Cow::Owned(key))
}

/// Whether one decoded path segment is a plain, visible file or directory name.
fn segment_ok(segment: &str) -> bool {
    !segment.is_empty()
        && !segment.starts_with('.')
        && !segment.bytes().any(|b| {
            b == b'/' || b == b'\\' || b.is_ascii_control() || (cfg!(windows) && b == b':')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, cache_control: &str) -> CacheRule {
        CacheRule {
            pattern: pattern.into(),
            cache_control: cache_control.into(),
        }
    }

    #[test]
    fn request_keys() {
        assert_eq!(request_key("").as_deref(), Some(""));
        assert_eq!(request_key("/").as_deref(), Some(""));
        assert_eq!(request_key("/a.txt").as_deref(), Some("a.txt"));
        assert_eq!(request_key("a/b.txt").as_deref(), Some("a/b.txt"));
        assert_eq!(request_key("/docs/").as_deref(), Some("docs/"));
        assert_eq!(request_key("/a%20b.txt?x=1").as_deref(), Some("a b.txt"));
        assert_eq!(request_key("/100%25.txt").as_deref(), Some("100%.txt"));
        assert_eq!(request_key("/%252e%252e/x").as_deref(), Some("%2e%2e/x"));
        assert!(matches!(request_key("/a/b"), Some(Cow::Borrowed(_))));
        for bad in [
            "//",
            "//etc/passwd",
            "/a//b",
            "/..",
            "/../x",
            "/a/../../x",
            "/./a",
            "/.hidden",
            "/a/.git/config",
            "/%2e%2e/x",
            "/%2E%2e/x",
            "/.%2e/x",
            "/%2ehidden",
            "/a%2fb",
            "/a%2Fb",
            "/%2fetc/passwd",
            "/a%5cb",
            "/a\\b",
            "/a%00b",
            "/a\0b",
            "/a%0ab",
            "/%c0%ae%c0%ae/x",
            "/%ff",
        ] {
            assert_eq!(request_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cache_rules_first_match_wins() {
        let rules = CacheRules::new(&[
            rule("assets/**", "A"),
            rule("/**/*.html", "B"),
            rule("*.txt", "C"),
        ])
        .unwrap();
        assert_eq!(rules.lookup("assets/app.js").unwrap(), "A");
        assert_eq!(rules.lookup("assets/x/page.html").unwrap(), "A");
        assert_eq!(rules.lookup("index.html").unwrap(), "B");
        assert_eq!(rules.lookup("docs/index.html").unwrap(), "B");
        assert_eq!(rules.lookup("a.txt").unwrap(), "C");
        assert_eq!(rules.lookup("docs/a.txt"), None, "* does not cross /");
        assert_eq!(CacheRules::default().lookup("a.txt"), None);
        let other = CacheRules::new(&[rule("**", "D")]).unwrap();
        assert_ne!(other.generation, rules.generation);
    }

    #[test]
    fn bad_cache_rules_are_refused() {
        for bad in [
            rule("a[", "x"),
            rule("{a,b", "x"),
            rule("ok/**", "bad\nvalue"),
        ] {
            match CacheRules::new(std::slice::from_ref(&bad)) {
                Err(StaticError::Pattern { pattern, .. }) => assert_eq!(pattern, bad.pattern),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
