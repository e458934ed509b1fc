//! Cache-aside for record reads (stage 5): the app's coherent in-memory cache.
//!
//! A record GET looks here first; a miss reads storage once per key however many requests
//! wait for it (single flight) and fills the cache with the LSN the value was read at. The
//! cache stays coherent through three paths, all of which go through the LSN gate of
//! [`crate::cache::Cache`], so a slow read can never put an old value back:
//!
//! - the writer drops its own keys as soon as its write is acknowledged
//!   ([`RecordCache::invalidate_written`]);
//! - the change feed ([`super::feed`]) drops every key any app changed, in LSN order;
//! - a feed that cannot resume exactly empties the cache ([`RecordCache::feed_started`]).
//!
//! Whether a read may use the cache at all is [`decide`], a pure function of the request's
//! consistency and the feed's state: a `?consistency=strong` read, a read whose
//! `Strata-LSN` token the feed has not reached yet, and every read while the feed has not
//! been caught up for `max_staleness` go to storage (`Cache-Status: strata; fwd=bypass`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;

use crate::cache::{Cache, CacheConfig, CacheConfigError, Fill, Loaded, Lookup, Weigh};
use crate::config::AppCacheConfig;
use crate::metrics::Metrics;
use crate::storage::{Key, ReadConsistency, Record, Store, StoreError};

/// The `Cache-Status` header (RFC 9211) the app puts on record reads when its cache is on.
pub const CACHE_STATUS: &str = "cache-status";

/// A cached record with its response headers made once, at fill, so a hit formats nothing.
#[derive(Debug)]
pub struct CachedRecord {
    /// The record as storage returned it.
    pub record: Record,
    /// `ETag`: the quoted version.
    pub etag: HeaderValue,
    /// `Last-Modified`, an HTTP date.
    pub last_modified: HeaderValue,
    /// The 200 answer's fields as HTTP/1.1 lines (`Content-Type`, `ETag`, `Last-Modified`,
    /// `Content-Length`), for the app's fast path to copy whole; the hyper path builds the
    /// same fields from the values above.
    pub head: Bytes,
}

impl CachedRecord {
    /// Prepares a record for serving (and caching).
    pub fn new(record: Record) -> Arc<Self> {
        // Without `fmt`: without the cache, every read from storage comes through here.
        let etag = super::api::etag_header(record.lsn);
        let last_modified = crate::http::date::http_date_header(record.updated_ms / 1000);
        let mut head = Vec::with_capacity(128);
        for (name, value) in [
            (&b"content-type"[..], &b"application/json"[..]),
            (b"etag", etag.as_bytes()),
            (b"last-modified", last_modified.as_bytes()),
            (
                b"content-length",
                itoa::Buffer::new().format(record.body.len()).as_bytes(),
            ),
        ] {
            crate::http::fastio::push_field(&mut head, name, value);
        }
        Arc::new(CachedRecord {
            record,
            etag,
            last_modified,
            head: head.into(),
        })
    }
}

impl Weigh for CachedRecord {
    /// The body, the header values, the pre-made head and the struct itself.
    fn weight(&self) -> usize {
        self.record.body.len()
            + self.etag.len()
            + self.last_modified.len()
            + self.head.len()
            + std::mem::size_of::<Self>()
    }
}

/// Why a read went to storage without looking at the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// The client asked for the primary (`?consistency=strong`).
    Requested,
    /// The feed has not been caught up within `max_staleness` (or never was).
    FeedStale,
    /// The read's `Strata-LSN` token is newer than what the feed has delivered.
    TokenAhead,
}

/// What a read may do with the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve from the cache; fill on a miss.
    Use,
    /// Read storage; the reason goes into `Cache-Status`.
    Bypass(Bypass),
}

/// The feed's state as [`decide`] needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedView {
    /// Every change up to this LSN has been applied to the cache.
    pub applied_lsn: u64,
    /// The epoch of those LSNs.
    pub epoch: u64,
    /// Time since the feed was last known caught up with its source; `None` if never.
    pub staleness: Option<Duration>,
}

/// Whether a read with `consistency` may use the cache, given the feed. Pure.
///
/// A cached entry read at `R` that is still present has seen no invalidation after `R` up
/// to the feed's applied LSN, so it is current as of that LSN: a token at or below it is
/// honoured by the cache.
pub fn decide(consistency: ReadConsistency, feed: FeedView, max_staleness: Duration) -> Decision {
    if consistency == ReadConsistency::Strong {
        return Decision::Bypass(Bypass::Requested);
    }
    if feed.staleness.is_none_or(|s| s > max_staleness) {
        return Decision::Bypass(Bypass::FeedStale);
    }
    match consistency {
        ReadConsistency::AtLeast { epoch, lsn } if lsn > feed.applied_lsn || epoch > feed.epoch => {
            Decision::Bypass(Bypass::TokenAhead)
        }
        _ => Decision::Use,
    }
}

/// `Cache-Status` values (RFC 9211). `from_static` is a `const fn`: each value is checked
/// at compile time, not on every response.
const HIT: HeaderValue = HeaderValue::from_static("strata; hit");
const MISS_STORED: HeaderValue = HeaderValue::from_static("strata; fwd=miss; stored");
const MISS: HeaderValue = HeaderValue::from_static("strata; fwd=miss");
const COLLAPSED: HeaderValue = HeaderValue::from_static("strata; fwd=miss; collapsed");
const FEED_STALE: HeaderValue = HeaderValue::from_static("strata; fwd=bypass; detail=feed-stale");
const REQUESTED: HeaderValue = HeaderValue::from_static("strata; fwd=request");
const REQUESTED_STORED: HeaderValue = HeaderValue::from_static("strata; fwd=request; stored");
const TOKEN_AHEAD: HeaderValue = HeaderValue::from_static("strata; fwd=bypass; detail=token-ahead");
const TOKEN_AHEAD_STORED: HeaderValue =
    HeaderValue::from_static("strata; fwd=bypass; stored; detail=token-ahead");

/// The feed's live state, written by the feed task, read by every request.
struct Feed {
    /// True for embedded storage: the engine in this process is the feed, never stale.
    local: bool,
    /// Where the feed comes from, for status pages.
    source: String,
    base: Instant,
    applied_lsn: AtomicU64,
    epoch: AtomicU64,
    source_lsn: AtomicU64,
    /// Nanoseconds after `base` when the feed was last caught up; 0 = never.
    live_at: AtomicU64,
    connected: AtomicBool,
    clears: AtomicU64,
    changes: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Counters of reads that skipped the cache, by reason.
#[derive(Default)]
struct Bypasses {
    requested: AtomicU64,
    feed_stale: AtomicU64,
    token_ahead: AtomicU64,
}

/// The app's record cache and the state of the feed that keeps it coherent.
pub struct RecordCache {
    cache: Cache<Key, Arc<CachedRecord>>,
    feed: Feed,
    max_staleness_ns: AtomicU64,
    bypasses: Bypasses,
}

impl RecordCache {
    /// A cache sized by `config`, fed by the local engine (`local`) or by the storage node
    /// named `source`. Reads bypass it until the feed has caught up once (a local feed
    /// never lags).
    pub fn new(
        config: &AppCacheConfig,
        local: bool,
        source: String,
    ) -> Result<Arc<Self>, CacheConfigError> {
        let cache = Cache::new(CacheConfig {
            capacity_bytes: config.max_bytes.bytes(),
            ttl: config.ttl.map(|t| t.get()),
            negative_ttl: config.negative_ttl.get(),
            ..CacheConfig::default()
        })?;
        Ok(Arc::new(RecordCache {
            cache,
            feed: Feed {
                local,
                source,
                base: Instant::now(),
                applied_lsn: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
                source_lsn: AtomicU64::new(0),
                live_at: AtomicU64::new(0),
                connected: AtomicBool::new(local),
                clears: AtomicU64::new(0),
                changes: AtomicU64::new(0),
                last_error: Mutex::new(None),
            },
            max_staleness_ns: AtomicU64::new(nanos(config.max_staleness.get())),
            bypasses: Bypasses::default(),
        }))
    }

    /// Applies the settings that change live: the byte bound (shrinking evicts at once)
    /// and `max_staleness`.
    pub fn apply(&self, config: &AppCacheConfig) {
        self.cache.set_capacity(config.max_bytes.bytes());
        self.max_staleness_ns
            .store(nanos(config.max_staleness.get()), Ordering::Relaxed);
    }

    /// The longest the cache is trusted without a caught-up feed.
    pub fn max_staleness(&self) -> Duration {
        Duration::from_nanos(self.max_staleness_ns.load(Ordering::Relaxed))
    }

    /// The feed's state now.
    pub fn feed_view(&self) -> FeedView {
        let staleness = if self.feed.local {
            Some(Duration::ZERO)
        } else {
            match self.feed.live_at.load(Ordering::Acquire) {
                0 => None,
                at => Some(
                    self.feed
                        .base
                        .elapsed()
                        .saturating_sub(Duration::from_nanos(at)),
                ),
            }
        };
        FeedView {
            applied_lsn: self.feed.applied_lsn.load(Ordering::Acquire),
            epoch: self.feed.epoch.load(Ordering::Acquire),
            staleness,
        }
    }

    /// Reads one record through the cache. Returns the record (`None`: absent) and the
    /// `Cache-Status` value to send.
    pub async fn read(
        &self,
        store: &Store,
        key: Key,
        consistency: ReadConsistency,
    ) -> Result<(Option<Arc<CachedRecord>>, HeaderValue), StoreError> {
        match decide(consistency, self.feed_view(), self.max_staleness()) {
            Decision::Use if consistency == ReadConsistency::Any => {
                let load = || async {
                    let (record, read_lsn) = store.read_at(&key, consistency).await?;
                    Ok::<_, StoreError>(Loaded {
                        value: record.map(CachedRecord::new),
                        read_lsn,
                    })
                };
                let (value, fill) = self.cache.get_or_load_traced(&key, load).await?;
                let status = match fill {
                    Fill::Hit => HIT,
                    Fill::Loaded { stored: true } => MISS_STORED,
                    Fill::Loaded { stored: false } => MISS,
                    Fill::Joined => COLLAPSED,
                };
                Ok((value, status))
            }
            // A token read the feed has reached: the cache answers, but a miss reads with
            // the token itself rather than joining another read's flight, which may be
            // reading a replica that is behind the token.
            Decision::Use => match self.cache.get(&key) {
                Lookup::Hit(v) => Ok((Some(v), HIT)),
                Lookup::Absent => Ok((None, HIT)),
                Lookup::Miss => {
                    let (value, stored) = self.read_and_fill(store, key, consistency).await?;
                    let status = if stored { MISS_STORED } else { MISS };
                    Ok((value, status))
                }
            },
            Decision::Bypass(Bypass::FeedStale) => {
                bump(&self.bypasses.feed_stale);
                let (record, _) = store.read_at(&key, consistency).await?;
                Ok((record.map(CachedRecord::new), FEED_STALE))
            }
            Decision::Bypass(why) => {
                let (counter, plain, stored_status) = match why {
                    Bypass::Requested => (&self.bypasses.requested, REQUESTED, REQUESTED_STORED),
                    _ => (&self.bypasses.token_ahead, TOKEN_AHEAD, TOKEN_AHEAD_STORED),
                };
                bump(counter);
                let (value, stored) = self.read_and_fill(store, key, consistency).await?;
                Ok((value, if stored { stored_status } else { plain }))
            }
        }
    }

    /// Reads storage and offers the result to the cache (the gate decides).
    async fn read_and_fill(
        &self,
        store: &Store,
        key: Key,
        consistency: ReadConsistency,
    ) -> Result<(Option<Arc<CachedRecord>>, bool), StoreError> {
        let (record, read_lsn) = store.read_at(&key, consistency).await?;
        let value = record.map(CachedRecord::new);
        let stored = match &value {
            Some(v) => self.cache.insert_if_fresh(key, v.clone(), read_lsn),
            None => self.cache.insert_absent_if_fresh(key, read_lsn),
        }
        .is_ok();
        Ok((value, stored))
    }

    /// Offers a value read at `read_lsn` to the cache: what a read does after loading.
    /// `Ok(false)` when the LSN gate (or the size bound) refused it.
    pub fn fill(&self, key: Key, value: Option<Record>, read_lsn: u64) -> bool {
        match value {
            Some(r) => self
                .cache
                .insert_if_fresh(key, CachedRecord::new(r), read_lsn)
                .is_ok(),
            None => self.cache.insert_absent_if_fresh(key, read_lsn).is_ok(),
        }
    }

    /// Whether `key` has a usable entry now (tests and diagnostics; counts as a lookup).
    pub fn lookup(&self, key: &Key) -> Lookup<Arc<CachedRecord>> {
        self.cache.get(key)
    }

    /// Drops the keys of a write this app made, once storage acknowledged it at `lsn`.
    pub fn invalidate_written<'a>(&self, keys: impl IntoIterator<Item = &'a Key>, lsn: u64) {
        for k in keys {
            self.cache.invalidate(k, lsn);
        }
    }

    /// The feed (re)started after `after_lsn` of `epoch`. If it did not resume exactly
    /// where it left off, whatever was cached may have missed invalidations: empty the
    /// cache and refuse fills read before `after_lsn`.
    pub fn feed_started(&self, epoch: u64, after_lsn: u64, resumed: bool) {
        if !resumed {
            self.cache.clear(after_lsn);
            // The first subscription (epoch 0) empties an empty cache: not worth counting.
            if self.feed.epoch.load(Ordering::Acquire) != 0 {
                bump(&self.feed.clears);
            }
            // A new start point may be behind the old one (another source): tokens are
            // then judged against it, which only bypasses more.
            self.feed.applied_lsn.store(after_lsn, Ordering::Release);
        }
        self.feed.epoch.store(epoch, Ordering::Release);
        self.feed.connected.store(true, Ordering::Relaxed);
    }

    /// Applies one log entry of the feed: drops its keys, then advances the applied LSN
    /// (in that order, so a token read never trusts an entry not yet dropped).
    pub fn feed_apply(&self, lsn: u64, keys: &[String]) {
        for k in keys {
            match Key::parse(k) {
                Ok(key) => self.cache.invalidate(&key, lsn),
                Err(e) => tracing::warn!(key = %k, error = %e, "change feed sent an invalid key"),
            }
        }
        bump(&self.feed.changes);
        self.feed.applied_lsn.fetch_max(lsn, Ordering::AcqRel);
    }

    /// The source says it is at `source_lsn` and `source_lag` behind the primary; if the
    /// feed has applied that far, the cache is current as of `source_lag` ago (with a
    /// primary as the source: now).
    pub fn feed_source_at(&self, source_lsn: u64, source_lag: Duration) {
        self.feed.source_lsn.store(source_lsn, Ordering::Relaxed);
        if self.feed.applied_lsn.load(Ordering::Acquire) < source_lsn {
            return;
        }
        // A lag longer than this process has run reads as "not caught up" (no update).
        if let Some(at) = self.feed.base.elapsed().checked_sub(source_lag) {
            self.feed
                .live_at
                .fetch_max(nanos(at).max(1), Ordering::AcqRel);
        }
    }

    /// The feed link is down (it reconnects by itself); `why` goes to the status page.
    pub fn feed_down(&self, why: String) {
        self.feed.connected.store(false, Ordering::Relaxed);
        if let Ok(mut e) = self.feed.last_error.lock() {
            *e = Some(why);
        }
    }

    /// `(applied LSN, epoch)` to resubscribe from.
    pub fn feed_position(&self) -> (u64, u64) {
        (
            self.feed.applied_lsn.load(Ordering::Acquire),
            self.feed.epoch.load(Ordering::Acquire),
        )
    }

    /// Registers the cache's metrics (computed at scrape time).
    pub fn register_metrics(self: &Arc<Self>, metrics: &Metrics) {
        type Get = fn(&RecordCache) -> i64;
        let gauges: [(&str, &str, Get); 11] = [
            (
                "app_cache_hits",
                "Record reads answered by the app cache",
                |c| to_i64(c.cache.stats().hits),
            ),
            (
                "app_cache_misses",
                "Record reads the app cache could not answer",
                |c| to_i64(c.cache.stats().misses),
            ),
            (
                "app_cache_hit_ratio_permille",
                "Hits per thousand lookups since start",
                |c| (c.cache.stats().hit_ratio() * 1000.0) as i64,
            ),
            (
                "app_cache_evictions",
                "Entries evicted from the app cache",
                |c| to_i64(c.cache.stats().evictions),
            ),
            ("app_cache_bytes", "Bytes held by the app cache", |c| {
                to_i64(c.cache.stats().bytes)
            }),
            ("app_cache_entries", "Entries in the app cache", |c| {
                to_i64(c.cache.stats().entries)
            }),
            (
                "app_cache_refused_fills",
                "Fills refused by the LSN gate (stale) or the size bound",
                |c| {
                    let s = c.cache.stats();
                    to_i64(s.refused_stale + s.refused_too_large)
                },
            ),
            (
                "app_cache_bypasses",
                "Record reads that skipped the cache (strong, token ahead, feed stale)",
                |c| {
                    let b = &c.bypasses;
                    to_i64(
                        b.requested.load(Ordering::Relaxed)
                            + b.token_ahead.load(Ordering::Relaxed)
                            + b.feed_stale.load(Ordering::Relaxed),
                    )
                },
            ),
            (
                "app_cache_feed_lag_entries",
                "Log entries the source has that the cache's feed has not applied",
                |c| {
                    let v = c.feed_view();
                    to_i64(
                        c.feed
                            .source_lsn
                            .load(Ordering::Relaxed)
                            .saturating_sub(v.applied_lsn),
                    )
                },
            ),
            (
                "app_cache_feed_lag_milliseconds",
                "Time since the cache's feed was last caught up (-1: never)",
                |c| {
                    c.feed_view()
                        .staleness
                        .map_or(-1, |s| to_i64(s.as_millis() as u64))
                },
            ),
            (
                "app_cache_clears",
                "Times the cache was emptied because the feed could not resume",
                |c| to_i64(c.feed.clears.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, f) in gauges {
            let weak = Arc::downgrade(self);
            metrics.gauge_fn(name, help, move || weak.upgrade().map_or(0, |c| f(&c)));
        }
    }

    /// The cache and its feed for `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let s = self.cache.stats();
        let v = self.feed_view();
        let max = self.max_staleness();
        serde_json::json!({
            "hits": s.hits,
            "negative_hits": s.negative_hits,
            "misses": s.misses,
            "hit_ratio": s.hit_ratio(),
            "evictions": s.evictions,
            "expired": s.expired,
            "bytes": s.bytes,
            "entries": s.entries,
            "capacity_bytes": s.capacity_bytes,
            "refused_fills": { "stale": s.refused_stale, "too_large": s.refused_too_large },
            "invalidations": s.invalidations,
            "loads": s.loads,
            "bypasses": {
                "requested": self.bypasses.requested.load(Ordering::Relaxed),
                "token_ahead": self.bypasses.token_ahead.load(Ordering::Relaxed),
                "feed_stale": self.bypasses.feed_stale.load(Ordering::Relaxed),
            },
            "feed": {
                "source": self.feed.source,
                "connected": self.feed.connected.load(Ordering::Relaxed),
                "trusted": v.staleness.is_some_and(|x| x <= max),
                "epoch": v.epoch,
                "applied_lsn": v.applied_lsn,
                "source_lsn": self.feed.source_lsn.load(Ordering::Relaxed),
                "lag_entries": self.feed.source_lsn.load(Ordering::Relaxed).saturating_sub(v.applied_lsn),
                "lag_ms": v.staleness.map(|x| x.as_millis() as u64),
                "max_staleness_ms": max.as_millis() as u64,
                "changes": self.feed.changes.load(Ordering::Relaxed),
                "clears": self.feed.clears.load(Ordering::Relaxed),
                "last_error": self.feed.last_error.lock().ok().and_then(|e| e.clone()),
            },
        })
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
