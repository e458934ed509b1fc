//! Static files from `static_dir`.
//!
//! Request paths are validated before anything touches the filesystem: the raw path is
//! split on `/` first and each segment percent-decoded exactly once, and a segment that is
//! empty, starts with `.` (this covers `.`, `..` and hidden files), or contains `/`, `\\`,
//! NUL or another control character refuses the request. Whatever survives is still
//! canonicalised and must stay under the canonical root, which is what stops symlinks that
//! lead outside.

use std::borrow::Cow;
use std::io::{self, Read};
#[cfg(not(unix))]
use std::io::{Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures_util::TryStreamExt;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use percent_encoding::percent_decode_str;

use crate::http::body::{self, Body, BodyError};

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

/// The file a directory request serves.
const INDEX: &str = "index.html";

/// Default largest file kept in memory (see [`StaticFiles::with_cache_limits`]): pages,
/// scripts, styles and icons, which dominate request counts, fit; bigger files are bound by
/// bandwidth rather than per-request overhead, so streaming them from disk costs little.
pub const DEFAULT_MAX_CACHED_FILE: u64 = 256 * 1024;

/// Default memory budget of the file cache: hundreds of typical assets, yet small next to
/// the rest of the process, so a large static tree cannot crowd out the other roles.
pub const DEFAULT_MAX_CACHED_TOTAL: usize = 64 * 1024 * 1024;

/// Default time a cached file is served without looking at the filesystem again: like
/// nginx's `open_file_cache_valid`, one stat per hot file per second is negligible, and a
/// deploy shows up within a second.
pub const DEFAULT_REVALIDATE_AFTER: Duration = Duration::from_secs(1);

/// Chunk size when streaming files too large to cache.
const STREAM_CHUNK: u64 = 64 * 1024;

/// Serves files under one root directory.
///
/// Directory requests (`/docs/`, and the root) serve the directory's `index.html`. A
/// directory path without its trailing slash (`/docs`) is answered `301` with the relative
/// `Location: ./docs/` (resolving correctly whatever mount prefix the app sits under), so
/// that relative links inside the index resolve against the directory, as nginx does; this
/// happens only when the index exists, so bare directories stay 404s. There is no listing.
///
/// Only a single byte range is honoured; a request for several ranges gets the whole file
/// with `200` (RFC 9110 lets a server ignore `Range`), which avoids multipart bodies.
///
/// Files up to [`DEFAULT_MAX_CACHED_FILE`] are kept in memory, keyed by request path, with
/// their header values prebuilt, so a hit does no syscall and no filesystem work. A cached
/// file is served for [`DEFAULT_REVALIDATE_AFTER`] (one second, like nginx's
/// `open_file_cache_valid`) after it was last checked; the first request after that
/// re-resolves the path on the blocking pool (still under the root, same inode, length and
/// mtime) and keeps or replaces the entry, while concurrent requests keep getting the cached
/// copy meanwhile. So a change on disk shows within about a second. Larger files are
/// streamed in 64 KiB chunks and never held whole. When the cache outgrows its byte budget
/// the entries validated longest ago (roughly, used longest ago) go first.
pub struct StaticFiles {
    /// The canonical root; every served file canonicalises to a path under it.
    root: Arc<Path>,
    /// Files up to this size are read whole and cached; larger ones are streamed.
    max_file: u64,
    /// Bound on the summed [`Entry::cost`] of the cache.
    max_total: usize,
    /// Nanoseconds an entry is trusted without looking at the filesystem.
    revalidate_after: u64,
    /// Origin of the monotonic nanosecond clock entries are stamped with.
    epoch: Instant,
    cache: DashMap<Box<str>, Arc<Entry>>,
    /// Summed cost of the entries in `cache`.
    cached_bytes: AtomicUsize,
}

impl StaticFiles {
    /// Opens the root (it must exist and be a directory).
    pub fn new(root: &Path) -> Result<Self, StaticError> {
        let fail = |source| StaticError::Root {
            path: root.to_path_buf(),
            source,
        };
        let canonical = std::fs::canonicalize(root).map_err(fail)?;
        let meta = std::fs::metadata(&canonical).map_err(fail)?;
        if !meta.is_dir() {
            return Err(fail(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        std::fs::read_dir(&canonical).map_err(fail)?;
        Ok(StaticFiles {
            root: canonical.into(),
            max_file: DEFAULT_MAX_CACHED_FILE,
            max_total: DEFAULT_MAX_CACHED_TOTAL,
            revalidate_after: nanos(DEFAULT_REVALIDATE_AFTER),
            epoch: Instant::now(),
            cache: DashMap::new(),
            cached_bytes: AtomicUsize::new(0),
        })
    }

    /// Sets how long a cached file is served before the filesystem is consulted again:
    /// shorter shows edits sooner at the price of a stat per file per interval. Zero checks
    /// on every request (tests use this to see edits deterministically).
    pub fn with_revalidate_after(mut self, interval: Duration) -> Self {
        self.revalidate_after = nanos(interval);
        self
    }

    /// Sets the largest file held in memory (larger ones are streamed from disk on every
    /// request) and the memory budget of the whole cache, for deployments whose working
    /// set or memory differs from the defaults. A `max_file` of 0 caches only empty files.
    pub fn with_cache_limits(mut self, max_file: u64, max_total: usize) -> Self {
        self.max_file = max_file;
        self.max_total = max_total;
        self.clear();
        self
    }

    /// Drops every cached file, for when the root's contents were replaced wholesale and
    /// waiting out the revalidation interval is not wanted.
    pub fn clear(&self) {
        self.cache.retain(|_, entry| {
            self.cached_bytes.fetch_sub(entry.cost, Ordering::Relaxed);
            false
        });
    }

    /// Answers a GET or HEAD for the raw (still percent-encoded) request path, which has
    /// the app's mount prefix already removed. Returns `None` when no file matches, so the
    /// caller answers its own 404.
    pub async fn serve(
        &self,
        method: &Method,
        raw_path: &str,
        headers: &HeaderMap,
        rules: &CacheRules,
    ) -> Option<Response<Body>> {
        let head = match *method {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        let key = request_key(raw_path)?;
        let now = self.now();
        let known = match self.cache.get(&*key).map(|e| Arc::clone(e.value())) {
            Some(entry) => {
                let validated = entry.validated.load(Ordering::Acquire);
                // Fresh, or someone else already claimed the revalidation: answer from memory.
                if now.saturating_sub(validated) < self.revalidate_after
                    || entry
                        .validated
                        .compare_exchange(validated, now, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                {
                    return Some(entry.respond(head, headers, rules));
                }
                Some(entry)
            }
            None => None,
        };
        self.slow_path(key.into_owned(), known, raw_path, head, headers, rules)
            .await
    }

    /// A miss or a due revalidation: ask the filesystem, on the blocking pool.
    async fn slow_path(
        &self,
        key: String,
        known: Option<Arc<Entry>>,
        raw_path: &str,
        head: bool,
        headers: &HeaderMap,
        rules: &CacheRules,
    ) -> Option<Response<Body>> {
        let root = Arc::clone(&self.root);
        let max_file = self.max_file;
        let known_ident = known.as_ref().map(|entry| entry.ident.clone());
        let (key, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = resolve(&root, &key, known_ident.as_ref(), max_file);
            (key, outcome)
        })
        .await
        .ok()?;
        if let (Some(entry), false) = (&known, matches!(outcome, Outcome::Unchanged)) {
            self.forget(&key, entry);
        }
        match outcome {
            Outcome::NotFound => None,
            Outcome::Redirect => redirect(raw_path),
            Outcome::Unchanged => {
                let entry = known?;
                entry.validated.store(self.now(), Ordering::Release);
                Some(entry.respond(head, headers, rules))
            }
            Outcome::Small {
                meta,
                ident,
                body,
                stable,
            } => {
                let entry = Arc::new(Entry::new(&key, meta, ident, body, self.now(), rules));
                let response = entry.respond(head, headers, rules);
                if stable {
                    self.remember(key, entry);
                }
                Some(response)
            }
            Outcome::Large { meta, file } => {
                let cache_control = rules.lookup(&meta.rel);
                Some(respond_file(&meta, file, cache_control, head, headers))
            }
        }
    }

    /// Monotonic nanoseconds since this server was built (vDSO clock read, not a syscall).
    fn now(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }

    /// Caches an entry, then evicts down to 90% of the budget if it went over.
    fn remember(&self, key: String, entry: Arc<Entry>) {
        let cost = entry.cost;
        if cost > self.max_total {
            return;
        }
        // Count before inserting so a concurrent removal never subtracts first.
        let total = self.cached_bytes.fetch_add(cost, Ordering::AcqRel) + cost;
        if let Some(old) = self.cache.insert(key.into_boxed_str(), entry) {
            self.cached_bytes.fetch_sub(old.cost, Ordering::AcqRel);
        }
        if total > self.max_total {
            self.evict(self.max_total / 10 * 9);
        }
    }

    /// Removes `entry` if it is still the one cached under `key`.
    fn forget(&self, key: &str, entry: &Arc<Entry>) {
        if let Some((_, old)) = self.cache.remove_if(key, |_, e| Arc::ptr_eq(e, entry)) {
            self.cached_bytes.fetch_sub(old.cost, Ordering::AcqRel);
        }
    }

    /// Drops the entries validated longest ago until the cache costs at most `target`.
    fn evict(&self, target: usize) {
        let mut ages: Vec<(u64, Box<str>)> = self
            .cache
            .iter()
            .map(|e| (e.value().validated.load(Ordering::Relaxed), e.key().clone()))
            .collect();
        ages.sort_unstable();
        for (_, key) in ages {
            if self.cached_bytes.load(Ordering::Acquire) <= target {
                break;
            }
            if let Some((_, old)) = self.cache.remove(&key) {
                self.cached_bytes.fetch_sub(old.cost, Ordering::AcqRel);
            }
        }
    }
}

/// A duration in nanoseconds, saturating.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Bookkeeping bytes charged per cached entry on top of its content, so that a directory
/// full of empty files cannot grow the cache without bound.
const ENTRY_OVERHEAD: usize = 512;

/// One file held in memory, with every header value it needs prebuilt.
struct Entry {
    meta: Meta,
    ident: Ident,
    body: Bytes,
    content_length: HeaderValue,
    /// When the entry was last checked against the filesystem ([`StaticFiles::now`] nanos).
    validated: AtomicU64,
    /// `Cache-Control` memoised against one [`CacheRules::generation`].
    cache_control: RwLock<(u64, Option<HeaderValue>)>,
    /// What this entry counts against [`StaticFiles::with_cache_limits`]' total.
    cost: usize,
}

impl Entry {
    fn new(
        key: &str,
        meta: Meta,
        ident: Ident,
        body: Bytes,
        now: u64,
        rules: &CacheRules,
    ) -> Entry {
        let cost = body.len() + key.len() + ident.path.as_os_str().len() + ENTRY_OVERHEAD;
        let cache_control = rules.lookup(&meta.rel);
        Entry {
            content_length: HeaderValue::from(meta.len),
            meta,
            ident,
            body,
            validated: AtomicU64::new(now),
            cache_control: RwLock::new((rules.generation, cache_control)),
            cost,
        }
    }

    fn cache_control(&self, rules: &CacheRules) -> Option<HeaderValue> {
        {
            let memo = self
                .cache_control
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if memo.0 == rules.generation {
                return memo.1.clone();
            }
        }
        let value = rules.lookup(&self.meta.rel);
        *self
            .cache_control
            .write()
            .unwrap_or_else(PoisonError::into_inner) = (rules.generation, value.clone());
        value
    }

    fn respond(&self, head: bool, headers: &HeaderMap, rules: &CacheRules) -> Response<Body> {
        respond_bytes(
            &self.meta,
            &self.body,
            &self.content_length,
            self.cache_control(rules),
            head,
            headers,
        )
    }
}

/// What the filesystem says about a request key.
enum Outcome {
    /// Nothing servable: missing, outside the root, hidden, not a regular file, unreadable.
    NotFound,
    /// A directory with an index, asked for without the trailing slash.
    Redirect,
    /// The cached version is still the one on disk.
    Unchanged,
    /// A file small enough to hold in memory, read whole.
    Small {
        meta: Meta,
        ident: Ident,
        body: Bytes,
        /// False when the file changed while being read: serve this once, don't keep it.
        stable: bool,
    },
    /// A file to stream, open.
    Large { meta: Meta, file: std::fs::File },
}

/// What identifies one version of a file on disk: revalidation compares these.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ident {
    path: PathBuf,
    len: u64,
    mtime: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

impl Ident {
    fn new(path: PathBuf, md: &std::fs::Metadata) -> Ident {
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (md.dev(), md.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        Ident {
            path,
            len: md.len(),
            mtime: md.modified().ok(),
            dev,
            ino,
        }
    }
}

/// The response-header view of one file version, built once per version.
#[derive(Debug)]
struct Meta {
    /// Path relative to the root as requested (with `index.html` for directories): what
    /// cache rules and the content type are derived from.
    rel: Box<str>,
    len: u64,
    content_type: HeaderValue,
    etag: HeaderValue,
    last_modified: HeaderValue,
    /// `Last-Modified` as seconds since the epoch, for date preconditions.
    modified_secs: u64,
}

impl Meta {
    fn new(rel: &str, len: u64, mtime: Option<SystemTime>) -> Meta {
        // HTTP dates run from the epoch to the end of year 9999; clamp odd mtimes into that.
        let since_epoch = mtime
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let modified_secs = since_epoch.as_secs().min(253_402_300_799);
        let last_modified =
            httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(modified_secs));
        let etag = format!("\"{len:x}-{:x}\"", since_epoch.as_nanos());
        Meta {
            rel: rel.into(),
            len,
            content_type: content_type(rel),
            etag: HeaderValue::try_from(etag).expect("hex digits are a valid header value"),
            last_modified: HeaderValue::try_from(last_modified)
                .expect("an HTTP date is a valid header value"),
            modified_secs,
        }
    }
}

/// `Content-Type` by extension; textual types say they are UTF-8.
fn content_type(rel: &str) -> HeaderValue {
    let mime = mime_guess::from_path(rel).first_or_octet_stream();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || matches!(mime.subtype().as_str(), "javascript" | "json" | "xml")
        || matches!(mime.suffix().map(|s| s.as_str()), Some("json" | "xml"));
    let value = if textual && mime.get_param(mime_guess::mime::CHARSET).is_none() {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.to_string()
    };
    HeaderValue::try_from(value)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// Resolves a request key against the filesystem (blocking: run it off the runtime).
/// `known` is the cached version, if any: when the filesystem still shows it, the answer is
/// [`Outcome::Unchanged`] without opening the file.
fn resolve(root: &Path, key: &str, known: Option<&Ident>, max_file: u64) -> Outcome {
    resolve_inner(root, key, known, max_file).unwrap_or(Outcome::NotFound)
}

fn resolve_inner(root: &Path, key: &str, known: Option<&Ident>, max_file: u64) -> Option<Outcome> {
    let dir_request = key.is_empty() || key.ends_with('/');
    let rel = key.trim_end_matches('/');
    let candidate = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let (mut path, mut md) = confined(root, &candidate)?;
    let mut rel = Cow::Borrowed(key);
    if md.is_dir() {
        let (index_path, index_md) = confined(root, &path.join(INDEX))?;
        if !index_md.is_file() {
            return None;
        }
        if !dir_request {
            return Some(Outcome::Redirect);
        }
        (path, md) = (index_path, index_md);
        rel = Cow::Owned(format!("{key}{INDEX}"));
    } else if dir_request {
        return None;
    }
    if !md.is_file() {
        return None;
    }
    if let Some(known) = known {
        if known.path == path && *known == Ident::new(path.clone(), &md) {
            return Some(Outcome::Unchanged);
        }
    }
    let file = open_regular(&path)?;
    // Describe what was opened, not what was looked at a moment earlier.
    let md = file.metadata().ok()?;
    if !md.is_file() {
        return None;
    }
    let ident = Ident::new(path, &md);
    if md.len() > max_file {
        let meta = Meta::new(&rel, md.len(), ident.mtime);
        return Some(Outcome::Large { meta, file });
    }
    let mut buf = Vec::with_capacity(md.len() as usize);
    (&file).take(md.len()).read_to_end(&mut buf).ok()?;
    let after = file.metadata().ok()?;
    let stable = buf.len() as u64 == md.len()
        && after.len() == md.len()
        && after.modified().ok() == ident.mtime;
    let meta = Meta::new(&rel, buf.len() as u64, ident.mtime);
    Some(Outcome::Small {
        meta,
        ident,
        body: Bytes::from(buf),
        stable,
    })
}

/// Canonicalises `candidate` and returns it with its metadata only if it lies under the
/// canonical `root` without passing through a hidden name (a symlink inside the root may
/// point anywhere inside it, but not outside and not at a dotfile).
fn confined(root: &Path, candidate: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
    let canonical = std::fs::canonicalize(candidate).ok()?;
    let inside = canonical.strip_prefix(root).ok()?;
    let visible = inside.components().all(|c| match c {
        Component::Normal(name) => !name.as_encoded_bytes().starts_with(b"."),
        _ => false,
    });
    if !visible {
        return None;
    }
    let md = std::fs::metadata(&canonical).ok()?;
    Some((canonical, md))
}

/// Opens a canonical path for reading, refusing a symlink swapped in since canonicalisation
/// and never blocking on a FIFO swapped in for the file (its metadata is checked after).
fn open_regular(path: &Path) -> Option<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    options.open(path).ok()
}

/// The `301` to the slash form of a directory path, relative so the mount prefix (already
/// stripped from `raw_path`) survives; the query string, if the caller left one, is kept.
fn redirect(raw_path: &str) -> Option<Response<Body>> {
    let (path, query) = match raw_path.find('?') {
        Some(at) => raw_path.split_at(at),
        None => (raw_path, ""),
    };
    let path = path.split('#').next().unwrap_or_default();
    let last = path.rsplit('/').next().filter(|s| !s.is_empty())?;
    let location = HeaderValue::try_from(format!("./{last}/{query}")).ok()?;
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    let h = response.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    Some(response)
}

/// What to answer, after evaluating preconditions and `Range` (RFC 9110 §13.2.2 order).
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Full,
    /// First and last byte, inclusive.
    Partial(u64, u64),
    Unsatisfiable,
    NotModified,
    PreconditionFailed,
}

fn plan(head: bool, headers: &HeaderMap, meta: &Meta) -> Plan {
    if headers.contains_key(header::IF_MATCH) {
        if !etag_listed(headers, header::IF_MATCH, &meta.etag, false) {
            return Plan::PreconditionFailed;
        }
    } else if let Some(since) = header_date(headers, header::IF_UNMODIFIED_SINCE) {
        if meta.modified_secs > since {
            return Plan::PreconditionFailed;
        }
    }
    if headers.contains_key(header::IF_NONE_MATCH) {
        if etag_listed(headers, header::IF_NONE_MATCH, &meta.etag, true) {
            return Plan::NotModified;
        }
    } else if let Some(since) = header_date(headers, header::IF_MODIFIED_SINCE) {
        if meta.modified_secs <= since {
            return Plan::NotModified;
        }
    }
    // Range is defined for GET only (RFC 9110 §14.2).
    if head {
        return Plan::Full;
    }
    let Some(range) = headers.get(header::RANGE) else {
        return Plan::Full;
    };
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        if !if_range_holds(if_range, meta) {
            return Plan::Full;
        }
    }
    parse_range(range.as_bytes(), meta.len)
}

/// Whether any entity tag listed in the `name` header fields matches `ours` (weak or strong
/// comparison), `*` matching anything. Our tags are always strong.
fn etag_listed(
    headers: &HeaderMap,
    name: header::HeaderName,
    ours: &HeaderValue,
    weak: bool,
) -> bool {
    let ours = ours.as_bytes();
    for value in headers.get_all(name) {
        let mut rest = value.as_bytes();
        loop {
            while let [b' ' | b'\t' | b',', tail @ ..] = rest {
                rest = tail;
            }
            let (is_weak, tag) = match rest {
                [] => break,
                [b'*', ..] => return true,
                [b'W', b'/', tail @ ..] => (true, tail),
                _ => (false, rest),
            };
            let Some(end) = tag
                .strip_prefix(b"\"")
                .and_then(|t| t.iter().position(|&b| b == b'"'))
            else {
                // Malformed member: skip to the next comma.
                match tag.iter().position(|&b| b == b',') {
                    Some(comma) => {
                        rest = &tag[comma..];
                        continue;
                    }
                    None => break,
                }
            };
            let (quoted, tail) = tag.split_at(end + 2);
            if quoted == ours && (weak || !is_weak) {
                return true;
            }
            rest = tail;
        }
    }
    false
}

/// `If-Range`: an entity tag must match strongly, a date must equal `Last-Modified`.
fn if_range_holds(value: &HeaderValue, meta: &Meta) -> bool {
    let bytes = value.as_bytes();
    if bytes.starts_with(b"\"") || bytes.starts_with(b"W/") {
        return bytes == meta.etag.as_bytes();
    }
    value
        .to_str()
        .ok()
        .and_then(|s| httpdate::parse_http_date(s.trim()).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .is_some_and(|d| d.as_secs() == meta.modified_secs)
}

/// An HTTP-date header as seconds since the epoch; `None` if absent or invalid (ignored).
fn header_date(headers: &HeaderMap, name: header::HeaderName) -> Option<u64> {
    let value = headers.get(name)?.to_str().ok()?;
    let time = httpdate::parse_http_date(value.trim()).ok()?;
    Some(time.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// A `Range` value for a representation of `len` bytes. Anything but one well-formed
/// `bytes` range is ignored (a full `200`), including several ranges.
fn parse_range(value: &[u8], len: u64) -> Plan {
    let Some((unit, spec)) = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.split_once('='))
    else {
        return Plan::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return Plan::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Plan::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        let Some(suffix) = digits(last) else {
            return Plan::Full;
        };
        if suffix == 0 || len == 0 {
            return Plan::Unsatisfiable;
        }
        return Plan::Partial(len - suffix.min(len), len - 1);
    }
    let Some(first) = digits(first) else {
        return Plan::Full;
    };
    let last = if last.is_empty() {
        None
    } else {
        match digits(last) {
            Some(last) if last >= first => Some(last),
            _ => return Plan::Full,
        }
    };
    if first >= len {
        return Plan::Unsatisfiable;
    }
    Plan::Partial(first, last.map_or(len - 1, |last| last.min(len - 1)))
}

/// A non-empty run of ASCII digits, saturating (a huge bound is still a valid bound).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// Builds a response with the headers every outcome shares: validators, caching, ranges.
fn response(
    status: StatusCode,
    meta: &Meta,
    cache_control: Option<HeaderValue>,
    body: Body,
) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::ETAG, meta.etag.clone());
    h.insert(header::LAST_MODIFIED, meta.last_modified.clone());
    if let Some(cache_control) = cache_control {
        h.insert(header::CACHE_CONTROL, cache_control);
    }
    if status != StatusCode::NOT_MODIFIED {
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    response
}

/// The bodiless answers, shared by in-memory and streamed files; `None` for 200/206.
fn bodiless(
    plan: &Plan,
    meta: &Meta,
    cache_control: Option<HeaderValue>,
) -> Option<Response<Body>> {
    let (status, cache_control) = match plan {
        Plan::Full | Plan::Partial(..) => return None,
        // A 304 carries the validators and caching headers a 200 would have, and no
        // Content-Length (it would have to be the full length; omitting it is simpler).
        Plan::NotModified => {
            return Some(response(
                StatusCode::NOT_MODIFIED,
                meta,
                cache_control,
                body::empty(),
            ))
        }
        Plan::Unsatisfiable => (StatusCode::RANGE_NOT_SATISFIABLE, None),
        Plan::PreconditionFailed => (StatusCode::PRECONDITION_FAILED, None),
    };
    let mut response = response(status, meta, cache_control, body::empty());
    let h = response.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    if *plan == Plan::Unsatisfiable {
        let range = HeaderValue::try_from(format!("bytes */{}", meta.len)).expect("digits");
        h.insert(header::CONTENT_RANGE, range);
    }
    Some(response)
}

/// Adds the representation headers of a `200`/`206` carrying `content_length` bytes.
fn with_content(
    mut response: Response<Body>,
    meta: &Meta,
    content_length: HeaderValue,
    range: Option<(u64, u64)>,
) -> Response<Body> {
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, meta.content_type.clone());
    h.insert(header::CONTENT_LENGTH, content_length);
    if let Some((first, last)) = range {
        let value = format!("bytes {first}-{last}/{}", meta.len);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::try_from(value).expect("digits"),
        );
    }
    response
}

/// Answers from bytes in memory.
fn respond_bytes(
    meta: &Meta,
    bytes: &Bytes,
    content_length: &HeaderValue,
    cache_control: Option<HeaderValue>,
    head: bool,
    headers: &HeaderMap,
) -> Response<Body> {
    let plan = plan(head, headers, meta);
    match plan {
        Plan::Full => {
            let body = if head {
                body::empty()
            } else {
                body::full(bytes.clone())
            };
            let response = response(StatusCode::OK, meta, cache_control, body);
            with_content(response, meta, content_length.clone(), None)
        }
        Plan::Partial(first, last) => {
            let part = bytes.slice(first as usize..=last as usize);
            let length = HeaderValue::from(part.len());
            let response = response(
                StatusCode::PARTIAL_CONTENT,
                meta,
                cache_control,
                body::full(part),
            );
            with_content(response, meta, length, Some((first, last)))
        }
        _ => bodiless(&plan, meta, cache_control).expect("bodiless plan"),
    }
}

/// Answers from an open file, streaming the body.
fn respond_file(
    meta: &Meta,
    file: std::fs::File,
    cache_control: Option<HeaderValue>,
    head: bool,
    headers: &HeaderMap,
) -> Response<Body> {
    let plan = plan(head, headers, meta);
    let (status, first, last) = match plan {
        Plan::Full => (StatusCode::OK, 0, meta.len.checked_sub(1)),
        Plan::Partial(first, last) => (StatusCode::PARTIAL_CONTENT, first, Some(last)),
        _ => return bodiless(&plan, meta, cache_control).expect("bodiless plan"),
    };
    let length = last.map_or(0, |last| last - first + 1);
    let body = if head || length == 0 {
        body::empty()
    } else {
        file_body(file, first, length)
    };
    let response = response(status, meta, cache_control, body);
    let range = (status == StatusCode::PARTIAL_CONTENT).then(|| (first, last.unwrap_or_default()));
    with_content(response, meta, HeaderValue::from(length), range)
}

/// Streams `len` bytes from `offset` in chunks, each read positionally on the blocking pool
/// straight into the buffer that becomes the frame (no intermediate copy, no shared file
/// cursor). Ends with an error if the file turns out shorter, so a truncated response is
/// never mistaken for a whole one.
fn file_body(file: std::fs::File, offset: u64, len: u64) -> Body {
    let chunks = futures_util::stream::try_unfold(
        (file, offset, len),
        |(file, offset, remaining)| async move {
            if remaining == 0 {
                return Ok(None);
            }
            let want = remaining.min(STREAM_CHUNK) as usize;
            let (file, buf) = tokio::task::spawn_blocking(move || {
                let mut buf = BytesMut::zeroed(want);
                let n = read_at(&file, &mut buf, offset)?;
                buf.truncate(n);
                Ok::<_, io::Error>((file, buf))
            })
            .await
            .map_err(io::Error::other)??;
            if buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while being served",
                ));
            }
            let n = buf.len() as u64;
            Ok(Some((
                Frame::data(buf.freeze()),
                (file, offset + n, remaining - n),
            )))
        },
    );
    StreamBody::new(chunks.map_err(|e| -> BodyError { Box::new(e) })).boxed()
}

/// One positional read (blocking).
#[cfg(unix)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

/// One positional read (blocking); each chunk owns the file, so seeking is race-free.
#[cfg(not(unix))]
fn read_at(mut file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    file.seek(SeekFrom::Start(offset))?;
    file.read(buf)
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

    use std::fs;
    use std::time::Duration;

    use http::header::HeaderName;
    use http_body_util::BodyExt;

    /// A root with some files, inside a temp dir that also holds a secret outside the root.
    struct Site {
        dir: tempfile::TempDir,
        files: StaticFiles,
    }

    impl Site {
        fn new() -> Site {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            fs::create_dir_all(root.join("docs")).unwrap();
            fs::create_dir_all(root.join("bare")).unwrap();
            fs::create_dir_all(root.join("assets")).unwrap();
            fs::write(dir.path().join("secret.txt"), "SECRET").unwrap();
            fs::write(root.join("a.txt"), "hello world").unwrap();
            fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
            fs::write(root.join("docs/index.html"), "<h1>docs</h1>").unwrap();
            fs::write(root.join("assets/app.js"), "let x = 1;").unwrap();
            fs::write(root.join(".env"), "HIDDEN").unwrap();
            let files = StaticFiles::new(&root).unwrap();
            Site { dir, files }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }

        fn secret(&self) -> PathBuf {
            self.dir.path().join("secret.txt")
        }
    }

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Reply {
        fn header(&self, name: HeaderName) -> &str {
            self.headers
                .get(&name)
                .unwrap_or_else(|| panic!("no {name}"))
                .to_str()
                .unwrap()
        }
    }

    async fn request(
        files: &StaticFiles,
        method: Method,
        path: &str,
        headers: &[(HeaderName, &str)],
        rules: &CacheRules,
    ) -> Option<Reply> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        let response = files.serve(&method, path, &map, rules).await?;
        let (parts, body) = response.into_parts();
        Some(Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        })
    }

    async fn get(files: &StaticFiles, path: &str, headers: &[(HeaderName, &str)]) -> Option<Reply> {
        request(files, Method::GET, path, headers, &CacheRules::default()).await
    }

    #[tokio::test]
    async fn content_types_and_headers() {
        let site = Site::new();
        let root = site.root();
        for (name, expected) in [
            ("page.html", "text/html; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("app.js", "text/javascript; charset=utf-8"),
            ("data.json", "application/json; charset=utf-8"),
            ("icon.svg", "image/svg+xml; charset=utf-8"),
            ("notes.txt", "text/plain; charset=utf-8"),
            ("photo.png", "image/png"),
            ("font.woff2", "font/woff2"),
            ("blob", "application/octet-stream"),
        ] {
            fs::write(root.join(name), "x").unwrap();
            let reply = get(&site.files, &format!("/{name}"), &[]).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{name}");
            assert_eq!(reply.header(header::CONTENT_TYPE), expected, "{name}");
        }
        let reply = get(&site.files, "/a.txt", &[]).await.unwrap();
        assert_eq!(&reply.body[..], b"hello world");
        assert_eq!(reply.header(header::CONTENT_LENGTH), "11");
        assert_eq!(reply.header(header::ACCEPT_RANGES), "bytes");
        let etag = reply.header(header::ETAG);
        assert!(etag.starts_with("\"b-") && etag.ends_with('"'), "{etag}");
        let modified = fs::metadata(root.join("a.txt"))
            .unwrap()
            .modified()
            .unwrap();
        let last_modified = httpdate::parse_http_date(reply.header(header::LAST_MODIFIED)).unwrap();
        assert!(modified.duration_since(last_modified).unwrap() < Duration::from_secs(1));
        assert!(!reply.headers.contains_key(header::CACHE_CONTROL));
    }

    #[tokio::test]
    async fn head_has_get_headers_and_no_body() {
        let site = Site::new();
        for _ in 0..2 {
            // Miss, then hit.
            let get = get(&site.files, "/a.txt", &[]).await.unwrap();
            let head = request(
                &site.files,
                Method::HEAD,
                "/a.txt",
                &[],
                &CacheRules::default(),
            )
            .await
            .unwrap();
            assert_eq!(head.status, StatusCode::OK);
            assert_eq!(head.headers, get.headers);
            assert!(head.body.is_empty());
        }
    }

    #[tokio::test]
    async fn other_methods_are_not_served() {
        let site = Site::new();
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let reply = request(&site.files, method, "/a.txt", &[], &CacheRules::default()).await;
            assert!(reply.is_none());
        }
    }

    #[tokio::test]
    async fn etag_and_last_modified_revalidate() {
        let site = Site::new();
        let full = get(&site.files, "/a.txt", &[]).await.unwrap();
        let etag = full.header(header::ETAG).to_owned();
        let last_modified = full.header(header::LAST_MODIFIED).to_owned();
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let weak = format!("W/{etag}");
        let listed = format!("\"x\", W/\"y\" ,{etag}");
        let not_modified = [
            vec![(header::IF_NONE_MATCH, etag.as_str())],
            vec![(header::IF_NONE_MATCH, weak.as_str())],
            vec![(header::IF_NONE_MATCH, listed.as_str())],
            vec![
                (header::IF_NONE_MATCH, "\"nope\""),
                (header::IF_NONE_MATCH, &etag),
            ],
            vec![(header::IF_NONE_MATCH, "*")],
            vec![(header::IF_MODIFIED_SINCE, last_modified.as_str())],
            vec![(header::IF_MODIFIED_SINCE, later.as_str())],
        ];
        for headers in not_modified {
            let reply = get(&site.files, "/a.txt", &headers).await.unwrap();
            assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{headers:?}");
            assert!(reply.body.is_empty());
            assert_eq!(reply.header(header::ETAG), etag);
            assert_eq!(reply.header(header::LAST_MODIFIED), last_modified);
        }
        let modified = [
            vec![(header::IF_NONE_MATCH, "\"other\"")],
            vec![(header::IF_NONE_MATCH, "W/\"other\", \"b-0\"")],
            // If-None-Match wins over a satisfied If-Modified-Since.
            vec![
                (header::IF_NONE_MATCH, "\"other\""),
                (header::IF_MODIFIED_SINCE, later.as_str()),
            ],
            vec![(header::IF_MODIFIED_SINCE, "Thu, 01 Jan 1970 00:00:00 GMT")],
            vec![(header::IF_MODIFIED_SINCE, "not a date")],
        ];
        for headers in modified {
            let reply = get(&site.files, "/a.txt", &headers).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{headers:?}");
            assert_eq!(&reply.body[..], b"hello world");
        }
    }

    #[tokio::test]
    async fn if_match_and_if_unmodified_since() {
        let site = Site::new();
        let etag = get(&site.files, "/a.txt", &[])
            .await
            .unwrap()
            .header(header::ETAG)
            .to_owned();
        let weak = format!("W/{etag}");
        for (headers, status) in [
            (vec![(header::IF_MATCH, etag.as_str())], StatusCode::OK),
            (vec![(header::IF_MATCH, "*")], StatusCode::OK),
            (
                vec![(header::IF_MATCH, "\"other\"")],
                StatusCode::PRECONDITION_FAILED,
            ),
            (
                vec![(header::IF_MATCH, weak.as_str())],
                StatusCode::PRECONDITION_FAILED,
            ),
            (
                vec![(header::IF_UNMODIFIED_SINCE, "Thu, 01 Jan 1970 00:00:00 GMT")],
                StatusCode::PRECONDITION_FAILED,
            ),
        ] {
            let reply = get(&site.files, "/a.txt", &headers).await.unwrap();
            assert_eq!(reply.status, status, "{headers:?}");
        }
    }

    #[tokio::test]
    async fn byte_ranges() {
        let site = Site::new();
        // "hello world" is 11 bytes.
        for (range, content_range, body) in [
            ("bytes=0-4", "bytes 0-4/11", "hello"),
            ("bytes=6-", "bytes 6-10/11", "world"),
            ("bytes=-5", "bytes 6-10/11", "world"),
            ("bytes=-50", "bytes 0-10/11", "hello world"),
            ("bytes=4-4", "bytes 4-4/11", "o"),
            ("bytes=6-1000", "bytes 6-10/11", "world"),
            ("Bytes = 1-2", "bytes 1-2/11", "el"),
        ] {
            for _ in 0..2 {
                let reply = get(&site.files, "/a.txt", &[(header::RANGE, range)])
                    .await
                    .unwrap();
                assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{range}");
                assert_eq!(reply.header(header::CONTENT_RANGE), content_range);
                assert_eq!(reply.header(header::CONTENT_LENGTH), body.len().to_string());
                assert_eq!(&reply.body[..], body.as_bytes());
                assert_eq!(
                    reply.header(header::CONTENT_TYPE),
                    "text/plain; charset=utf-8"
                );
            }
        }
        for range in ["bytes=11-", "bytes=11-20", "bytes=-0"] {
            let reply = get(&site.files, "/a.txt", &[(header::RANGE, range)])
                .await
                .unwrap();
            assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
            assert_eq!(reply.header(header::CONTENT_RANGE), "bytes */11");
            assert_eq!(reply.header(header::CONTENT_LENGTH), "0");
            assert!(reply.body.is_empty());
        }
        // Several ranges, malformed or foreign-unit ranges: the whole file.
        for range in [
            "bytes=0-1,3-4",
            "bytes=5-2",
            "bytes=x-1",
            "bytes=1",
            "items=0-1",
            "bytes=--1",
        ] {
            let reply = get(&site.files, "/a.txt", &[(header::RANGE, range)])
                .await
                .unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{range}");
            assert_eq!(&reply.body[..], b"hello world");
        }
        // HEAD ignores Range.
        let head = request(
            &site.files,
            Method::HEAD,
            "/a.txt",
            &[(header::RANGE, "bytes=0-1")],
            &CacheRules::default(),
        )
        .await
        .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.header(header::CONTENT_LENGTH), "11");
        // Any range of an empty file is unsatisfiable.
        fs::write(site.root().join("empty.txt"), "").unwrap();
        let reply = get(&site.files, "/empty.txt", &[(header::RANGE, "bytes=0-")])
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(reply.header(header::CONTENT_RANGE), "bytes */0");
        let reply = get(&site.files, "/empty.txt", &[]).await.unwrap();
        assert_eq!(reply.header(header::CONTENT_LENGTH), "0");
    }

    #[tokio::test]
    async fn if_range() {
        let site = Site::new();
        let full = get(&site.files, "/a.txt", &[]).await.unwrap();
        let etag = full.header(header::ETAG).to_owned();
        let last_modified = full.header(header::LAST_MODIFIED).to_owned();
        let weak = format!("W/{etag}");
        for (if_range, status) in [
            (etag.as_str(), StatusCode::PARTIAL_CONTENT),
            (last_modified.as_str(), StatusCode::PARTIAL_CONTENT),
            ("\"stale\"", StatusCode::OK),
            (weak.as_str(), StatusCode::OK),
            ("Thu, 01 Jan 1970 00:00:00 GMT", StatusCode::OK),
            ("garbage", StatusCode::OK),
        ] {
            let headers = [(header::RANGE, "bytes=0-4"), (header::IF_RANGE, if_range)];
            let reply = get(&site.files, "/a.txt", &headers).await.unwrap();
            assert_eq!(reply.status, status, "{if_range}");
            let body: &[u8] = if status == StatusCode::OK {
                b"hello world"
            } else {
                b"hello"
            };
            assert_eq!(&reply.body[..], body);
        }
    }

    #[tokio::test]
    async fn directories_serve_their_index() {
        let site = Site::new();
        for (path, body) in [
            ("", "<h1>home</h1>"),
            ("/", "<h1>home</h1>"),
            ("/docs/", "<h1>docs</h1>"),
        ] {
            let reply = get(&site.files, path, &[]).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(&reply.body[..], body.as_bytes());
            assert_eq!(
                reply.header(header::CONTENT_TYPE),
                "text/html; charset=utf-8"
            );
        }
        let reply = get(&site.files, "/docs", &[]).await.unwrap();
        assert_eq!(reply.status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(reply.header(header::LOCATION), "./docs/");
        assert_eq!(reply.header(header::CONTENT_LENGTH), "0");
        let reply = get(&site.files, "/docs?lang=en", &[]).await.unwrap();
        assert_eq!(reply.header(header::LOCATION), "./docs/?lang=en");
        // No index, no listing; a file is not a directory; missing is missing.
        for path in [
            "/bare",
            "/bare/",
            "/a.txt/",
            "/missing.txt",
            "/missing/",
            "/docs/index.html/",
        ] {
            assert!(get(&site.files, path, &[]).await.is_none(), "{path}");
        }
    }

    #[tokio::test]
    async fn cache_control_by_first_matching_rule() {
        let site = Site::new();
        fs::write(site.root().join("assets/page.html"), "p").unwrap();
        let rules = CacheRules::new(&[
            rule("assets/**", "public, max-age=31536000, immutable"),
            rule("**/*.html", "no-cache"),
            rule("*.txt", "max-age=60"),
        ])
        .unwrap();
        for (path, expected) in [
            (
                "/assets/app.js",
                Some("public, max-age=31536000, immutable"),
            ),
            (
                "/assets/page.html",
                Some("public, max-age=31536000, immutable"),
            ),
            ("/", Some("no-cache")),
            ("/docs/", Some("no-cache")),
            ("/docs/index.html", Some("no-cache")),
            ("/a.txt", Some("max-age=60")),
        ] {
            for _ in 0..2 {
                let reply = request(&site.files, Method::GET, path, &[], &rules)
                    .await
                    .unwrap();
                let got = reply
                    .headers
                    .get(header::CACHE_CONTROL)
                    .map(|v| v.to_str().unwrap());
                assert_eq!(got, expected, "{path}");
            }
        }
        // Swapped rules apply to already cached files.
        let reply = get(&site.files, "/a.txt", &[]).await.unwrap();
        assert!(!reply.headers.contains_key(header::CACHE_CONTROL));
        let swapped = CacheRules::new(&[rule("a.*", "private")]).unwrap();
        let reply = request(&site.files, Method::GET, "/a.txt", &[], &swapped)
            .await
            .unwrap();
        assert_eq!(reply.header(header::CACHE_CONTROL), "private");
        // 304s carry it too.
        let etag = reply.header(header::ETAG).to_owned();
        let reply = request(
            &site.files,
            Method::GET,
            "/a.txt",
            &[(header::IF_NONE_MATCH, &etag)],
            &swapped,
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
        assert_eq!(reply.header(header::CACHE_CONTROL), "private");
    }

    #[tokio::test]
    async fn traversal_is_refused_in_every_form() {
        let site = Site::new();
        let secret = site.secret();
        let absolute = secret.to_str().unwrap().to_owned();
        let mut attempts: Vec<String> = [
            "/../secret.txt",
            "../secret.txt",
            "/..",
            "/docs/../../secret.txt",
            "/docs/../a.txt",
            "/./a.txt",
            "/%2e%2e/secret.txt",
            "/%2E%2E/secret.txt",
            "/.%2e/secret.txt",
            "/%2e./secret.txt",
            "/%2e%2e%2fsecret.txt",
            "/docs%2f..%2f..%2fsecret.txt",
            "/docs/..%2f..%2fsecret.txt",
            "/..%5csecret.txt",
            "/docs%5c..%5c..%5csecret.txt",
            "/docs\\..\\..\\secret.txt",
            "/a.txt%00",
            "/a.txt%00.html",
            "/a\0.txt",
            "//secret.txt",
            "/%2fetc%2fpasswd",
            "/%252e%252e/secret.txt",
            "/%c0%ae%c0%ae/secret.txt",
            "/.env",
            "/%2eenv",
            "/docs/.env",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        attempts.push(absolute.clone());
        attempts.push(format!("/{absolute}"));
        attempts.push(format!("/{}", absolute.replace('/', "%2f")));
        for attempt in &attempts {
            for method in [Method::GET, Method::HEAD] {
                let reply =
                    request(&site.files, method, attempt, &[], &CacheRules::default()).await;
                assert!(reply.is_none(), "{attempt:?} was served");
            }
            let ok = get(&site.files, "/a.txt", &[]).await.unwrap();
            assert_eq!(&ok.body[..], b"hello world", "after {attempt:?}");
        }
    }

    #[tokio::test]
    async fn decoding_happens_once() {
        let site = Site::new();
        fs::write(site.root().join("%2e%2e"), "literal").unwrap();
        fs::write(site.root().join("100%.txt"), "percent").unwrap();
        fs::write(site.root().join("a b.txt"), "space").unwrap();
        for (path, body) in [
            ("/%252e%252e", "literal"),
            ("/100%25.txt", "percent"),
            ("/100%.txt", "percent"),
            ("/a%20b.txt", "space"),
        ] {
            let reply = get(&site.files, path, &[]).await.unwrap();
            assert_eq!(&reply.body[..], body.as_bytes(), "{path}");
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinks_must_stay_inside_the_root() {
        use std::os::unix::fs::symlink;
        let site = Site::new();
        let root = site.root();
        symlink(site.secret(), root.join("out.txt")).unwrap();
        symlink(site.dir.path(), root.join("outdir")).unwrap();
        symlink("../secret.txt", root.join("rel-out.txt")).unwrap();
        symlink(root.join(".env"), root.join("env.txt")).unwrap();
        symlink(root.join("a.txt"), root.join("in.txt")).unwrap();
        symlink("docs", root.join("docs-link")).unwrap();
        for path in ["/out.txt", "/outdir/secret.txt", "/rel-out.txt", "/env.txt"] {
            assert!(get(&site.files, path, &[]).await.is_none(), "{path}");
            let ok = get(&site.files, "/a.txt", &[]).await.unwrap();
            assert_eq!(&ok.body[..], b"hello world");
        }
        // Links that resolve inside the root are fine, however they get there.
        for path in ["/in.txt", "/outdir/root/a.txt"] {
            let reply = get(&site.files, path, &[]).await.unwrap();
            assert_eq!(&reply.body[..], b"hello world");
        }
        let reply = get(&site.files, "/docs-link/", &[]).await.unwrap();
        assert_eq!(&reply.body[..], b"<h1>docs</h1>");
        // A link re-pointed outside after being cached is refused on revalidation.
        let files = StaticFiles::new(&root)
            .unwrap()
            .with_revalidate_after(Duration::ZERO);
        assert!(get(&files, "/in.txt", &[]).await.is_some());
        fs::remove_file(root.join("in.txt")).unwrap();
        symlink(site.secret(), root.join("in.txt")).unwrap();
        assert!(get(&files, "/in.txt", &[]).await.is_none());
        assert!(files.cache.get("in.txt").is_none());
    }

    #[tokio::test]
    async fn changed_files_are_served_fresh_after_revalidation() {
        let site = Site::new();
        let path = site.root().join("a.txt");
        // Within the interval the cached copy is served without looking at the disk.
        let patient = StaticFiles::new(&site.root())
            .unwrap()
            .with_revalidate_after(Duration::from_secs(3600));
        assert_eq!(
            &get(&patient, "/a.txt", &[]).await.unwrap().body[..],
            b"hello world"
        );
        fs::write(&path, "changed").unwrap();
        assert_eq!(
            &get(&patient, "/a.txt", &[]).await.unwrap().body[..],
            b"hello world"
        );

        let files = StaticFiles::new(&site.root())
            .unwrap()
            .with_revalidate_after(Duration::from_millis(50));
        let first = get(&files, "/a.txt", &[]).await.unwrap();
        assert_eq!(&first.body[..], b"changed");
        // Same length, new mtime.
        fs::write(&path, "CHANGED").unwrap();
        let file = fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = get(&files, "/a.txt", &[]).await.unwrap();
        assert_eq!(&second.body[..], b"CHANGED");
        assert_ne!(second.header(header::ETAG), first.header(header::ETAG));
        // The old validator no longer matches.
        let old = first.header(header::ETAG);
        let reply = get(&files, "/a.txt", &[(header::IF_NONE_MATCH, old)])
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        // Deleted: gone after the interval, and dropped from the cache.
        fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get(&files, "/a.txt", &[]).await.is_none());
        assert!(files.cache.get("a.txt").is_none());
    }

    #[tokio::test]
    async fn large_files_stream_and_ranges_read_only_the_range() {
        let site = Site::new();
        let len = 3 * STREAM_CHUNK as usize + 12_345;
        let content: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(site.root().join("big.bin"), &content).unwrap();
        let files = StaticFiles::new(&site.root())
            .unwrap()
            .with_cache_limits(64 * 1024, 1 << 20);

        let mut map = HeaderMap::new();
        let response = files
            .serve(&Method::GET, "/big.bin", &map, &CacheRules::default())
            .await
            .unwrap();
        assert_eq!(
            response.headers()[header::CONTENT_LENGTH],
            len.to_string().as_str()
        );
        let mut body = response.into_body();
        let (mut frames, mut received) = (0, Vec::new());
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() as u64 <= STREAM_CHUNK);
            received.extend_from_slice(&data);
            frames += 1;
        }
        assert!(frames >= 4, "{frames} frames");
        assert!(received == content);
        assert!(files.cache.is_empty(), "large files are not cached");

        let open_ended = format!("bytes={}-", len - 70_000);
        for (range, first, last) in [
            ("bytes=100000-200000", 100_000, 200_000),
            ("bytes=-10", len - 10, len - 1),
            (open_ended.as_str(), len - 70_000, len - 1),
            ("bytes=0-0", 0, 0),
        ] {
            let reply = get(&files, "/big.bin", &[(header::RANGE, range)])
                .await
                .unwrap();
            assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{range}");
            assert_eq!(
                reply.header(header::CONTENT_RANGE),
                format!("bytes {first}-{last}/{len}")
            );
            assert_eq!(
                reply.header(header::CONTENT_LENGTH),
                (last - first + 1).to_string()
            );
            assert!(reply.body[..] == content[first..=last], "{range}");
        }
        let reply = get(&files, "/big.bin", &[(header::RANGE, "bytes=999999999-")])
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(
            reply.header(header::CONTENT_RANGE),
            format!("bytes */{len}")
        );

        let head = request(
            &files,
            Method::HEAD,
            "/big.bin",
            &[],
            &CacheRules::default(),
        )
        .await
        .unwrap();
        assert_eq!(head.header(header::CONTENT_LENGTH), len.to_string());
        assert!(head.body.is_empty());
        let etag = head.header(header::ETAG);
        let reply = get(&files, "/big.bin", &[(header::IF_NONE_MATCH, etag)])
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
        map.insert(header::RANGE, HeaderValue::from_static("bytes=1-2"));
        let reply = files
            .serve(&Method::GET, "/big.bin", &map, &CacheRules::default())
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::PARTIAL_CONTENT);
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_budget() {
        let site = Site::new();
        let files = StaticFiles::new(&site.root())
            .unwrap()
            .with_cache_limits(4096, 16 * 1024);
        for i in 0..40 {
            let name = format!("f{i}.txt");
            fs::write(site.root().join(&name), vec![b'a' + (i % 26) as u8; 1000]).unwrap();
            let reply = get(&files, &format!("/{name}"), &[]).await.unwrap();
            assert_eq!(reply.body.len(), 1000);
            assert!(files.cached_bytes.load(Ordering::Acquire) <= 16 * 1024);
        }
        let counted: usize = files.cache.iter().map(|e| e.value().cost).sum();
        assert_eq!(counted, files.cached_bytes.load(Ordering::Acquire));
        assert!(!files.cache.is_empty());
        assert!(
            files.cache.contains_key("f39.txt"),
            "the newest entry survives eviction"
        );
        files.clear();
        assert_eq!(files.cached_bytes.load(Ordering::Acquire), 0);
        assert_eq!(
            &get(&files, "/f0.txt", &[]).await.unwrap().body[..3],
            b"aaa"
        );
    }

    #[test]
    fn serving_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let site = Site::new();
        let (headers, rules) = (HeaderMap::new(), CacheRules::default());
        let future = site.files.serve(&Method::GET, "/a.txt", &headers, &rules);
        assert_send(&future);
    }

    #[test]
    fn bad_roots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        for root in [dir.path().join("missing"), file] {
            assert!(
                matches!(StaticFiles::new(&root), Err(StaticError::Root { .. })),
                "{root:?}"
            );
        }
    }

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
