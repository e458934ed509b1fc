//! The bounded in-memory cache the app role (and later the edge role) share.
//!
//! What it promises, and why:
//!
//! - **Bounded by bytes.** Every entry is charged `key.weight() + value.weight() +`
//!   [`ENTRY_OVERHEAD`] (see [`Weigh`]), and the total never exceeds the capacity, which
//!   [`Cache::set_capacity`] changes live (shrinking evicts at once).
//! - **Scan resistant.** Eviction is S3-FIFO-class (a small probationary queue, a main
//!   queue, and a ghost list of recently evicted hashes), provided by `quick_cache`, which
//!   beat a hand-made S3-FIFO on `dashmap`, a plain LRU and moka's W-TinyLFU on both hit
//!   ratio and read throughput (`BENCHMARKS.md`, `benches/cache.rs`).
//! - **Coherent with storage.** Fills carry the LSN they were read at and pass an LSN gate
//!   ([`Cache::insert_if_fresh`]): after `invalidate(key, lsn)` no fill read before `lsn`
//!   can enter, so a slow read never puts back a value a later write replaced.
//!   [`Cache::clear`] does the same for every key when the change feed breaks.
//! - **Negative entries** ("known absent") with their own short TTL, and an optional TTL
//!   for everything as a backstop against a missed invalidation.
//! - **Single flight** ([`Cache::get_or_load`]): concurrent misses for one key run one load.
//!
//! Submodules: `weigh` (sizes), `clock` (injectable time), `gate` (the LSN gate), `stats`
//! (counters), `flight` (single flight).

mod clock;
mod flight;
mod gate;
mod stats;
mod weigh;

use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use quick_cache::sync::Cache as Backend;
use quick_cache::{Lifecycle, OptionsBuilder, Weighter};

pub use clock::{Clock, ManualClock, SystemClock};
pub use flight::{Fill, Loaded};
pub use stats::CacheStats;
pub use weigh::Weigh;

use gate::Gate;
use stats::{bump, Counters};

/// Bytes charged per entry on top of its key and value: the slot's own fields (read LSN,
/// expiry, weight: 24 B), the backend's slab links and queue state (≈16 B) and its hash
/// table slot with load-factor slack (≈16 B), rounded up. Ghost hashes of evicted keys
/// (≈16 B each, at most half the estimated entry count) and the gate's invalidation
/// records (≈40 B each, at most `max_invalidations`) are extra, bounded memory.
pub const ENTRY_OVERHEAD: usize = 64;

/// How a cache is sized and how long entries may live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The byte bound (keys + values + [`ENTRY_OVERHEAD`] per entry). Zero stores nothing.
    pub capacity_bytes: u64,
    /// A backstop TTL for every entry, or `None` to rely on invalidations alone.
    pub ttl: Option<Duration>,
    /// How long a negative ("known absent") entry lives; short, because a create is the
    /// likeliest write to be missed. Zero disables negative entries.
    pub negative_ttl: Duration,
    /// How many per-key invalidation records the LSN gate keeps. Past that the oldest are
    /// forgotten and their LSNs become a watermark below which fills are refused, so a
    /// bigger number refuses fewer fills after bursts of writes (≈40 B per record).
    pub max_invalidations: usize,
    /// Internal shards (rounded to a power of two; reduced for small caches). More shards
    /// mean less lock contention but a smaller per-entry limit (capacity / shards).
    pub shards: usize,
    /// The expected mean entry size, used to size tables and the ghost list. Within an
    /// order of magnitude is good enough.
    pub expected_entry_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity_bytes: 64 << 20,
            ttl: None,
            negative_ttl: Duration::from_secs(5),
            max_invalidations: 64 * 1024,
            shards: std::thread::available_parallelism().map_or(4, |n| n.get() * 4),
            expected_entry_bytes: 1024,
        }
    }
}

/// A configuration the cache cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheConfigError {
    /// `ttl = Some(0)` would expire every entry as it is stored.
    #[error("cache ttl must be positive (leave it unset for no TTL)")]
    ZeroTtl,
    /// The gate needs at least one record per stripe to be useful.
    #[error("cache max_invalidations must be at least {min}")]
    TooFewInvalidations {
        /// The smallest accepted value.
        min: usize,
    },
    /// Zero shards or a zero expected entry size.
    #[error("cache {what} must be at least 1")]
    Zero {
        /// The offending field.
        what: &'static str,
    },
}

/// Why a fill was not stored. Callers usually just serve the value they loaded and move
/// on; the reason is for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The value was read at `read_lsn`, but the cache has seen an invalidation, a clear,
    /// or a fresher fill for this key at `needed`: storing it could serve stale data.
    #[error("stale fill: read at LSN {read_lsn}, the cache needs at least {needed}")]
    Stale {
        /// The LSN the refused value was read at.
        read_lsn: u64,
        /// The lowest read LSN the cache would have accepted.
        needed: u64,
    },
    /// The entry alone is bigger than one shard may hold.
    #[error("entry of {weight} bytes exceeds the per-entry limit of {limit} bytes")]
    TooLarge {
        /// The entry's charged size.
        weight: u64,
        /// The current per-entry limit.
        limit: u64,
    },
    /// A negative entry was offered but this cache's `negative_ttl` is zero.
    #[error("negative entries are disabled (negative_ttl = 0)")]
    NegativeDisabled,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<V> {
    /// A live value.
    Hit(V),
    /// A live negative entry: the key was absent when last read.
    Absent,
    /// Nothing usable: never filled, evicted, invalidated or expired.
    Miss,
}

/// A concurrent, byte-bounded, LSN-gated cache. All methods take `&self`; share it in an
/// `Arc`. Values are cloned out on every hit, so store cheap clones (`Bytes`, `Arc<T>`).
pub struct Cache<K, V> {
    backend: Backend<K, Slot<V>, SlotWeighter, quick_cache::DefaultHashBuilder, EvictionHook>,
    gate: Gate,
    hasher: RandomState,
    counters: Arc<Counters>,
    clock: Arc<dyn Clock>,
    ttl: Option<Duration>,
    negative_ttl: Duration,
    /// The bound callers asked for; the backend gets it rounded down to a multiple of the
    /// shard count so that the per-shard bounds sum to no more than this.
    capacity: AtomicU64,
    /// Serialises `set_capacity` so two resizes cannot interleave shard by shard.
    resize: Mutex<()>,
    flights: DashMap<K, Arc<flight::Flight<V>>>,
}

/// What the backend stores per key.
#[derive(Clone)]
struct Slot<V> {
    /// `None` is a negative entry.
    value: Option<V>,
    read_lsn: u64,
    /// Clock reading (ns) at which the entry expires; `u64::MAX` for never.
    expires_at: u64,
    /// Charged bytes, computed once at fill (the backend asks often).
    weight: u64,
}

#[derive(Clone)]
struct SlotWeighter;

impl<K, V> Weighter<K, Slot<V>> for SlotWeighter {
    fn weight(&self, _key: &K, slot: &Slot<V>) -> u64 {
        slot.weight
    }
}

/// Counts evictions into the cache's counters.
#[derive(Clone)]
struct EvictionHook(Arc<Counters>);

impl<K, V> Lifecycle<K, V> for EvictionHook {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: K, _val: V) {
        bump(&self.0.evictions);
    }
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Weigh + Send + Sync + 'static,
    V: Clone + Weigh + Send + Sync + 'static,
{
    /// A cache on the real monotonic clock.
    pub fn new(config: CacheConfig) -> Result<Self, CacheConfigError> {
        Self::with_clock(config, Arc::new(SystemClock::new()))
    }

    /// A cache on the given clock (tests pass a [`ManualClock`]).
    pub fn with_clock(
        config: CacheConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CacheConfigError> {
        if config.ttl == Some(Duration::ZERO) {
            return Err(CacheConfigError::ZeroTtl);
        }
        if config.max_invalidations < gate::STRIPES {
            return Err(CacheConfigError::TooFewInvalidations { min: gate::STRIPES });
        }
        if config.shards == 0 {
            return Err(CacheConfigError::Zero { what: "shards" });
        }
        if config.expected_entry_bytes == 0 {
            return Err(CacheConfigError::Zero {
                what: "expected_entry_bytes",
            });
        }
        let counters = Arc::new(Counters::default());
        let estimated_items = (config.capacity_bytes / config.expected_entry_bytes).max(1);
        let options = OptionsBuilder::new()
            .shards(config.shards)
            .estimated_items_capacity(usize::try_from(estimated_items).unwrap_or(usize::MAX))
            .weight_capacity(config.capacity_bytes)
            .build()
            // Only an unset weight capacity or estimate fails `build`; both are set above.
            .map_err(|_| CacheConfigError::Zero { what: "capacity" })?;
        let backend = Backend::with_options(
            options,
            SlotWeighter,
            quick_cache::DefaultHashBuilder::default(),
            EvictionHook(counters.clone()),
        );
        let cache = Cache {
            backend,
            gate: Gate::new(config.max_invalidations),
            hasher: RandomState::new(),
            counters,
            clock,
            ttl: config.ttl,
            negative_ttl: config.negative_ttl,
            capacity: AtomicU64::new(config.capacity_bytes),
            resize: Mutex::new(()),
            flights: DashMap::new(),
        };
        // The backend rounds shard bounds up; re-apply ours rounded down.
        cache.set_capacity(config.capacity_bytes);
        Ok(cache)
    }

    /// Looks a key up. Expired entries are dropped here and count as misses.
    pub fn get(&self, key: &K) -> Lookup<V> {
        let Some(slot) = self.backend.get(key) else {
            self.counters.miss();
            return Lookup::Miss;
        };
        if slot.expires_at != u64::MAX {
            let now = self.now_nanos();
            if slot.expires_at <= now {
                // Removing needs no gate: taking a value out can never make the cache stale.
                self.backend.remove_if(key, |s| s.expires_at <= now);
                bump(&self.counters.expired);
                self.counters.miss();
                return Lookup::Miss;
            }
        }
        match slot.value {
            Some(v) => {
                self.counters.hit();
                Lookup::Hit(v)
            }
            None => {
                self.counters.negative_hit();
                Lookup::Absent
            }
        }
    }

    /// Stores `value`, read from storage at `read_lsn`, unless the cache has seen a reason
    /// it may be stale: an invalidation of `key` or a clear at a later LSN, or an entry for
    /// `key` read at a later LSN (of two racing fills the fresher wins).
    pub fn insert_if_fresh(&self, key: K, value: V, read_lsn: u64) -> Result<(), Refused> {
        let weight = key.weight().saturating_add(value.weight());
        let ttl = self.ttl;
        self.fill(key, Some(value), weight, read_lsn, ttl)
    }

    /// Records that `key` was absent at `read_lsn` (a negative entry), under the same gate
    /// as [`insert_if_fresh`](Self::insert_if_fresh). Lives for the negative TTL (or the
    /// cache TTL if shorter).
    pub fn insert_absent_if_fresh(&self, key: K, read_lsn: u64) -> Result<(), Refused> {
        if self.negative_ttl.is_zero() {
            return Err(Refused::NegativeDisabled);
        }
        let ttl = Some(
            self.ttl
                .map_or(self.negative_ttl, |t| t.min(self.negative_ttl)),
        );
        let weight = key.weight();
        self.fill(key, None, weight, read_lsn, ttl)
    }

    /// Tells the cache that the write committed at `lsn` changed `key`: drops an entry read
    /// before `lsn`, refuses later fills read before `lsn`, and detaches any load in flight
    /// so that later callers start a fresh one. Late or repeated invalidations are harmless.
    pub fn invalidate(&self, key: &K, lsn: u64) {
        bump(&self.counters.invalidations);
        let hash = self.hasher.hash_one(key);
        let mut stripe = self.gate.lock(hash);
        self.gate.record(&mut stripe, hash, lsn);
        self.backend.remove_if(key, |s| s.read_lsn < lsn);
        drop(stripe);
        self.flights.remove(key);
    }

    /// Empties the cache and refuses every later fill read before `lsn`: what to do when
    /// the change feed breaks. Pass the LSN from which the resumed feed is known to deliver
    /// every invalidation (for a new subscription, the storage's last LSN when it starts);
    /// fills read before it may have missed an invalidation and are refused.
    pub fn clear(&self, lsn: u64) {
        self.gate.raise_floor(lsn, || self.backend.clear());
        self.flights.clear();
    }

    /// Keys held now (values and negative entries alike) for which `pred` holds: what a
    /// purge by pattern (the edge's purge by URL prefix) needs. Walks every shard, so it
    /// costs O(entries): for admin paths, never for lookups.
    pub fn keys_where(&self, mut pred: impl FnMut(&K) -> bool) -> Vec<K> {
        self.backend
            .iter()
            .filter_map(|(k, _)| pred(&k).then_some(k))
            .collect()
    }

    /// Changes the byte bound live. Shrinking evicts, before returning, until the contents
    /// fit.
    pub fn set_capacity(&self, bytes: u64) {
        let _serial = self.resize.lock().unwrap_or_else(PoisonError::into_inner);
        let shards = self.backend.num_shards() as u64;
        self.capacity.store(bytes, Ordering::Release);
        self.backend.set_capacity(bytes - bytes % shards);
    }

    /// The byte bound in force.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// The largest entry (key + value + overhead) a fill may have under the current bound:
    /// a little under one shard's share, where the backend's admission limit lies.
    pub fn max_entry_bytes(&self) -> u64 {
        let shard = self.capacity() / self.backend.num_shards() as u64;
        shard - shard / 16
    }

    /// Counters and sizes as of now.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            bytes: self.backend.weight(),
            entries: self.backend.len() as u64,
            capacity_bytes: self.capacity(),
            invalidation_records: self.gate.records() as u64,
            ..self.counters.snapshot()
        }
    }

    fn fill(
        &self,
        key: K,
        value: Option<V>,
        weight: usize,
        read_lsn: u64,
        ttl: Option<Duration>,
    ) -> Result<(), Refused> {
        let weight = u64::try_from(weight.saturating_add(ENTRY_OVERHEAD)).unwrap_or(u64::MAX);
        let limit = self.max_entry_bytes();
        if weight > limit {
            bump(&self.counters.refused_too_large);
            // An entry read before this (fresher) read may be outdated; taking it out is
            // always safe.
            self.backend.remove_if(&key, |s| s.read_lsn < read_lsn);
            return Err(Refused::TooLarge { weight, limit });
        }
        let expires_at = match ttl {
            None => u64::MAX,
            Some(t) => self
                .now_nanos()
                .saturating_add(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)),
        };
        let hash = self.hasher.hash_one(&key);
        let stripe = self.gate.lock(hash);
        let mut needed = match self.gate.admits(&stripe, hash, read_lsn) {
            Ok(()) => 0,
            Err(gate::StaleAt(n)) => n,
        };
        let existing = self.backend.peek(&key);
        if let Some(existing) = &existing {
            if existing.read_lsn > read_lsn {
                needed = needed.max(existing.read_lsn);
            }
        }
        if needed > read_lsn {
            bump(&self.counters.refused_stale);
            return Err(Refused::Stale { read_lsn, needed });
        }
        let slot = Slot {
            value,
            read_lsn,
            expires_at,
            weight,
        };
        self.backend.insert(key, slot);
        drop(stripe);
        bump(&self.counters.inserts);
        if existing.is_some() {
            // The backend reports the replaced value through its eviction hook; it was
            // not evicted, so take it back out of the count.
            bump(&self.counters.replaced);
        }
        Ok(())
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.clock.now().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl<K, V> std::fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("capacity", &self.capacity.load(Ordering::Relaxed))
            .field("ttl", &self.ttl)
            .field("negative_ttl", &self.negative_ttl)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
