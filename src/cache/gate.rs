//! The LSN gate: which fills may enter the cache, given the invalidations seen so far.
//!
//! A fill carries the LSN its value was read at (`read_lsn`); an invalidation carries the
//! LSN of the write that changed the key. A read at `R` reflects every write at or before
//! `R`, so a fill is stale exactly when the key was invalidated at some `L > R`. The gate
//! remembers, per key hash, the latest invalidation LSN, and refuses such fills: a slow
//! read can never put back a value that a later write replaced (the stale-set race).
//!
//! The memory is bounded. Each stripe keeps at most `per_stripe` records, oldest first out;
//! forgetting a record at LSN `L` raises that stripe's watermark to `L`, and a fill read
//! below the watermark is refused, because the forgotten record might have been its key's.
//! Keys are remembered by a 64-bit hash: two keys that collide share a record, which can
//! only refuse more, never admit a stale fill. A `clear(lsn)` raises a global floor the
//! same way.
//!
//! The stripe's mutex is also what makes "check, then insert" atomic against
//! "record, then remove": the cache holds it across both halves of each.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Number of stripes; a power of two so the stripe is a mask of the hash.
pub(crate) const STRIPES: usize = 64;

/// Bounded per-key memory of recent invalidations, striped by key hash.
#[derive(Debug)]
pub(crate) struct Gate {
    stripes: Box<[Mutex<Stripe>]>,
    per_stripe: usize,
    /// Fills read below this LSN are refused everywhere (raised by `clear`). Written only
    /// while every stripe lock is held, so a reader holding any one stripe sees it stable.
    floor: AtomicU64,
}

/// One stripe's records. Pure data: every method is a plain function of its state.
#[derive(Debug, Default)]
pub(crate) struct Stripe {
    /// Key hash → latest invalidation LSN seen for it.
    recent: HashMap<u64, u64>,
    /// Key hashes in the order they were first recorded; `recent` and `order` hold the same
    /// set, so the stripe never holds more than `per_stripe` of either.
    order: VecDeque<u64>,
    /// The highest LSN among records this stripe has forgotten.
    forgotten: u64,
}

/// Why the gate refused a fill: the LSN the fill would have to reach to be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StaleAt(pub(crate) u64);

impl Gate {
    /// A gate remembering about `max_records` invalidations in total (at least one per
    /// stripe).
    pub(crate) fn new(max_records: usize) -> Self {
        Gate {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            per_stripe: max_records.div_ceil(STRIPES).max(1),
            floor: AtomicU64::new(0),
        }
    }

    /// Locks the stripe of `hash`. Hold the guard across the check and the cache write.
    pub(crate) fn lock(&self, hash: u64) -> MutexGuard<'_, Stripe> {
        // Stripe state stays consistent even if a holder panicked: every mutation is a
        // single map/deque operation, so a poisoned lock is safe to reuse.
        self.stripes[(hash as usize) & (STRIPES - 1)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The global floor raised by `clear`. Stable while any stripe lock is held.
    pub(crate) fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Admits a fill of `hash` read at `read_lsn`, or says which LSN it is behind.
    /// Call with the stripe of `hash` locked.
    pub(crate) fn admits(&self, stripe: &Stripe, hash: u64, read_lsn: u64) -> Result<(), StaleAt> {
        let needed = stripe.needed(hash).max(self.floor());
        if read_lsn < needed {
            Err(StaleAt(needed))
        } else {
            Ok(())
        }
    }

    /// Records an invalidation. Call with the stripe of `hash` locked.
    pub(crate) fn record(&self, stripe: &mut Stripe, hash: u64, lsn: u64) {
        stripe.record(hash, lsn, self.per_stripe);
    }

    /// Refuses, from now on, every fill read below `lsn`, and drops records that the new
    /// floor makes redundant. Runs `while_locked` with every stripe held, so no fill can be
    /// between its check and its insert while the cache empties.
    pub(crate) fn raise_floor(&self, lsn: u64, while_locked: impl FnOnce()) {
        let mut guards: Vec<_> = (0..STRIPES).map(|i| self.lock(i as u64)).collect();
        let floor = self.floor.fetch_max(lsn, Ordering::AcqRel).max(lsn);
        for g in &mut guards {
            g.forget_below(floor);
        }
        while_locked();
    }

    /// Total records held now (for stats).
    pub(crate) fn records(&self) -> usize {
        (0..STRIPES).map(|i| self.lock(i as u64).recent.len()).sum()
    }
}

impl Stripe {
    /// The lowest read LSN a fill of `hash` needs to be admitted by this stripe.
    fn needed(&self, hash: u64) -> u64 {
        self.recent
            .get(&hash)
            .copied()
            .unwrap_or(0)
            .max(self.forgotten)
    }

    fn record(&mut self, hash: u64, lsn: u64, cap: usize) {
        if let Some(l) = self.recent.get_mut(&hash) {
            *l = (*l).max(lsn);
            return;
        }
        self.recent.insert(hash, lsn);
        self.order.push_back(hash);
        while self.order.len() > cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(l) = self.recent.remove(&old) {
                self.forgotten = self.forgotten.max(l);
            }
        }
    }

    /// Drops records at or below `floor`: the floor refuses everything they would.
    fn forget_below(&mut self, floor: u64) {
        self.recent.retain(|_, l| *l > floor);
        let recent = &self.recent;
        self.order.retain(|h| recent.contains_key(h));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn admit(g: &Gate, h: u64, r: u64) -> bool {
        let s = g.lock(h);
        g.admits(&s, h, r).is_ok()
    }

    fn invalidate(g: &Gate, h: u64, l: u64) {
        let mut s = g.lock(h);
        g.record(&mut s, h, l);
    }

    #[test]
    fn refuses_reads_older_than_the_invalidation_only() {
        let g = Gate::new(1024);
        assert!(admit(&g, 7, 0));
        invalidate(&g, 7, 10);
        assert!(!admit(&g, 7, 9));
        assert!(admit(&g, 7, 10), "a read at the write's LSN saw the write");
        assert!(admit(&g, 7, 11));
        assert!(admit(&g, 8, 0), "other keys are not affected");
        invalidate(&g, 7, 5);
        assert!(
            !admit(&g, 7, 9),
            "an older invalidation never lowers the bar"
        );
    }

    #[test]
    fn forgetting_raises_the_stripe_watermark() {
        let g = Gate::new(STRIPES); // one record per stripe
        let (a, b) = (3, 3 + STRIPES as u64); // same stripe
        invalidate(&g, a, 10);
        invalidate(&g, b, 20);
        assert_eq!(g.records(), 1);
        assert!(
            !admit(&g, a, 9),
            "a's record is gone; the watermark 10 still refuses"
        );
        assert!(admit(&g, a, 10));
        let c = 3 + 2 * STRIPES as u64; // never invalidated, same stripe
        assert!(
            !admit(&g, c, 9),
            "the watermark covers every key of the stripe"
        );
        assert!(!admit(&g, b, 19));
        assert!(admit(&g, 4, 0), "another stripe keeps its own watermark");
    }

    #[test]
    fn floor_refuses_everything_below_and_drops_redundant_records() {
        let g = Gate::new(1024);
        invalidate(&g, 1, 5);
        invalidate(&g, 2, 50);
        let mut ran = false;
        g.raise_floor(30, || ran = true);
        assert!(ran);
        assert_eq!(g.records(), 1);
        assert!(!admit(&g, 9, 29));
        assert!(admit(&g, 9, 30));
        assert!(!admit(&g, 2, 49), "records above the floor survive");
        g.raise_floor(10, || {});
        assert_eq!(g.floor(), 30, "the floor never goes down");
    }

    proptest! {
        /// Whatever the bound, the gate never admits a fill older than an invalidation it
        /// was told about, and it never holds more than its bound.
        #[test]
        fn never_admits_a_stale_fill(
            cap in 1usize..200,
            ops in proptest::collection::vec((0u64..300, 0u64..1000), 1..400),
            probe_r in 0u64..1000,
        ) {
            let g = Gate::new(cap);
            let mut truth: HashMap<u64, u64> = HashMap::new();
            for (h, l) in &ops {
                invalidate(&g, *h, *l);
                let e = truth.entry(*h).or_default();
                *e = (*e).max(*l);
            }
            prop_assert!(g.records() <= cap.div_ceil(STRIPES).max(1) * STRIPES);
            for (h, l) in &truth {
                if probe_r < *l {
                    prop_assert!(!admit(&g, *h, probe_r));
                }
            }
        }

        /// With room for every key, the gate is exact: it admits exactly the fresh fills.
        #[test]
        fn exact_when_nothing_is_forgotten(
            ops in proptest::collection::vec((0u64..50, 0u64..1000), 1..100),
            probe in (0u64..50, 0u64..1000),
        ) {
            let g = Gate::new(100 * STRIPES);
            let mut latest = 0;
            for (h, l) in &ops {
                invalidate(&g, *h, *l);
                if *h == probe.0 { latest = latest.max(*l); }
            }
            prop_assert_eq!(admit(&g, probe.0, probe.1), probe.1 >= latest);
        }
    }
}
