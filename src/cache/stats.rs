//! Counters the cache keeps as it works, and the snapshot callers read.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Live counters, bumped with relaxed atomics. The lookup counters are striped over
/// cache-line-sized lanes picked per thread, so concurrent readers do not fight over one
/// line; the rest are bumped on paths that take locks anyway. Shared with the eviction
/// hook, hence `pub(crate)` fields.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    lanes: [Lane; LANES],
    pub(crate) inserts: AtomicU64,
    pub(crate) refused_stale: AtomicU64,
    pub(crate) refused_too_large: AtomicU64,
    pub(crate) evictions: AtomicU64,
    /// Fills that replaced an entry (the backend's eviction hook counts those too).
    pub(crate) replaced: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) loads: AtomicU64,
}

/// Lanes for the lookup counters; more than the cores we expect, so threads rarely share.
const LANES: usize = 16;

/// One thread group's lookup counters, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Lane {
    hits: AtomicU64,
    negative_hits: AtomicU64,
    misses: AtomicU64,
}

/// Hands each thread a lane, round robin.
fn lane_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static LANE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % LANES;
    }
    LANE.with(|l| *l)
}

/// Adds one to a counter. Relaxed: counters order nothing, they are only read for reports.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A point-in-time reading of a cache's counters and size, for `/admin/status` and the
/// metrics registry. Counters are monotonic since the cache was built; `bytes` and
/// `entries` are current values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Lookups answered from the cache, values and negative entries alike.
    pub hits: u64,
    /// The part of `hits` that answered "known absent" from a negative entry.
    pub negative_hits: u64,
    /// Lookups the cache could not answer (absent or expired).
    pub misses: u64,
    /// Fills stored (values and negative entries).
    pub inserts: u64,
    /// Fills refused by the LSN gate: read before an invalidation or clear the cache had
    /// seen, or older than the entry already there.
    pub refused_stale: u64,
    /// Fills refused because one entry would exceed the per-entry limit.
    pub refused_too_large: u64,
    /// Entries pushed out by the eviction policy (including by `set_capacity`).
    pub evictions: u64,
    /// Entries found past their TTL and dropped on lookup.
    pub expired: u64,
    /// `invalidate` calls.
    pub invalidations: u64,
    /// Loader runs started by `get_or_load` (one per single flight).
    pub loads: u64,
    /// Bytes currently charged (keys + values + per-entry overhead).
    pub bytes: u64,
    /// Entries currently held, negative entries included.
    pub entries: u64,
    /// The byte bound in force.
    pub capacity_bytes: u64,
    /// Per-key invalidation records the LSN gate holds now (bounded by
    /// `max_invalidations`).
    pub invalidation_records: u64,
}

impl CacheStats {
    /// `hits / (hits + misses)`, or 0 before the first lookup.
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

impl Counters {
    /// Counts a lookup answered with a value.
    pub(crate) fn hit(&self) {
        bump(&self.lanes[lane_index()].hits);
    }

    /// Counts a lookup answered "known absent".
    pub(crate) fn negative_hit(&self) {
        let lane = &self.lanes[lane_index()];
        bump(&lane.hits);
        bump(&lane.negative_hits);
    }

    /// Counts a lookup the cache could not answer.
    pub(crate) fn miss(&self) {
        bump(&self.lanes[lane_index()].misses);
    }

    /// Reads every counter; the size fields are filled in by the cache.
    pub(crate) fn snapshot(&self) -> CacheStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let sum = |f: fn(&Lane) -> &AtomicU64| self.lanes.iter().map(|l| r(f(l))).sum();
        CacheStats {
            hits: sum(|l| &l.hits),
            negative_hits: sum(|l| &l.negative_hits),
            misses: sum(|l| &l.misses),
            inserts: r(&self.inserts),
            refused_stale: r(&self.refused_stale),
            refused_too_large: r(&self.refused_too_large),
            evictions: r(&self.evictions).saturating_sub(r(&self.replaced)),
            expired: r(&self.expired),
            invalidations: r(&self.invalidations),
            loads: r(&self.loads),
            ..CacheStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_handles_zero_and_counts() {
        assert_eq!(CacheStats::default().hit_ratio(), 0.0);
        let c = Counters::default();
        c.hit();
        c.hit();
        c.negative_hit();
        c.miss();
        let s = c.snapshot();
        assert_eq!((s.hits, s.negative_hits, s.misses), (3, 1, 1));
        assert_eq!(s.hit_ratio(), 0.75);
        std::thread::scope(|t| {
            t.spawn(|| c.hit());
        });
        assert_eq!(c.snapshot().hits, 4, "lanes of other threads are summed");
    }
}
