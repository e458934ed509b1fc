//! Behaviour of the whole cache: gate, TTLs, bounds, eviction order and single flight.

use std::sync::atomic::AtomicUsize;
use std::sync::Barrier;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn config(capacity_bytes: u64) -> CacheConfig {
    CacheConfig {
        capacity_bytes,
        shards: 1,
        expected_entry_bytes: 128,
        ..CacheConfig::default()
    }
}

fn cache(capacity_bytes: u64) -> Cache<u64, Bytes> {
    Cache::new(config(capacity_bytes)).expect("valid config")
}

fn clocked(cfg: CacheConfig) -> (Cache<u64, Bytes>, ManualClock) {
    let clock = ManualClock::new();
    let c = Cache::with_clock(cfg, Arc::new(clock.clone())).expect("valid config");
    (c, clock)
}

fn val(n: usize) -> Bytes {
    Bytes::from(vec![7u8; n])
}

/// Charged size of a `u64` key with an `n`-byte `Bytes` value.
fn charged(n: usize) -> u64 {
    (8 + n + std::mem::size_of::<Bytes>() + ENTRY_OVERHEAD) as u64
}

#[test]
fn cache_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cache<u64, Bytes>>();
    assert_send_sync::<Cache<crate::storage::Key, Arc<str>>>();
}

#[test]
fn hit_miss_and_stats() {
    let c = cache(1 << 20);
    assert_eq!(c.get(&1), Lookup::Miss);
    c.insert_if_fresh(1, val(10), 5).expect("fresh");
    assert_eq!(c.get(&1), Lookup::Hit(val(10)));
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.inserts, s.entries), (1, 1, 1, 1));
    assert_eq!(s.bytes, charged(10));
    assert_eq!(s.capacity_bytes, 1 << 20);
    assert_eq!(s.hit_ratio(), 0.5);
}

#[test]
fn config_errors_are_reported() {
    let bad = |f: fn(&mut CacheConfig)| {
        let mut cfg = config(1000);
        f(&mut cfg);
        Cache::<u64, Bytes>::new(cfg).err()
    };
    assert_eq!(
        bad(|c| c.ttl = Some(Duration::ZERO)),
        Some(CacheConfigError::ZeroTtl)
    );
    assert!(matches!(
        bad(|c| c.max_invalidations = 3),
        Some(CacheConfigError::TooFewInvalidations { .. })
    ));
    assert!(matches!(
        bad(|c| c.shards = 0),
        Some(CacheConfigError::Zero { .. })
    ));
}

#[test]
fn fill_is_refused_after_a_later_invalidation_and_accepted_otherwise() {
    let c = cache(1 << 20);
    c.invalidate(&1, 10);
    assert_eq!(
        c.insert_if_fresh(1, val(1), 9),
        Err(Refused::Stale {
            read_lsn: 9,
            needed: 10
        })
    );
    assert_eq!(c.get(&1), Lookup::Miss);
    c.insert_if_fresh(1, val(2), 10)
        .expect("read saw the write");
    assert_eq!(c.get(&1), Lookup::Hit(val(2)));
    c.insert_if_fresh(2, val(3), 0)
        .expect("other keys unaffected");
    assert_eq!(c.stats().refused_stale, 1);
}

#[test]
fn invalidation_drops_older_entries_but_not_fresher_ones() {
    let c = cache(1 << 20);
    c.insert_if_fresh(1, val(1), 5).expect("fresh");
    c.invalidate(&1, 6);
    assert_eq!(c.get(&1), Lookup::Miss);
    c.insert_if_fresh(2, val(1), 20).expect("fresh");
    c.invalidate(&2, 15); // a late invalidation: the value already reflects it
    assert_eq!(c.get(&2), Lookup::Hit(val(1)));
}

#[test]
fn of_two_racing_fills_the_fresher_wins() {
    let c = cache(1 << 20);
    c.insert_if_fresh(1, val(2), 20).expect("fresh");
    assert!(matches!(
        c.insert_if_fresh(1, val(1), 10),
        Err(Refused::Stale { needed: 20, .. })
    ));
    assert_eq!(c.get(&1), Lookup::Hit(val(2)));
    c.insert_if_fresh(1, val(3), 20)
        .expect("same LSN may refill");
}

#[test]
fn clear_empties_and_refuses_fills_read_before_it() {
    let c = cache(1 << 20);
    for k in 0..10 {
        c.insert_if_fresh(k, val(4), 3).expect("fresh");
    }
    c.clear(100);
    assert_eq!(c.stats().entries, 0);
    assert_eq!(c.get(&1), Lookup::Miss);
    assert!(c.insert_if_fresh(1, val(4), 99).is_err());
    assert!(c.insert_absent_if_fresh(2, 50).is_err());
    c.insert_if_fresh(1, val(4), 100)
        .expect("read after the clear point");
}

#[test]
fn forgotten_invalidations_refuse_conservatively() {
    let cfg = CacheConfig {
        max_invalidations: gate::STRIPES,
        ..config(1 << 20)
    };
    let c: Cache<u64, Bytes> = Cache::new(cfg).expect("valid");
    for k in 0..10_000u64 {
        c.invalidate(&k, 1000 + k);
    }
    // Whatever was forgotten, no fill older than its key's invalidation gets in.
    for k in 0..10_000u64 {
        assert!(c.insert_if_fresh(k, val(1), 999 + k).is_err());
    }
    c.insert_if_fresh(5, val(1), 20_000)
        .expect("newer than every invalidation");
}

#[test]
fn ttl_expires_entries() {
    let (c, clock) = clocked(CacheConfig {
        ttl: Some(Duration::from_secs(60)),
        ..config(1 << 20)
    });
    c.insert_if_fresh(1, val(1), 1).expect("fresh");
    clock.advance(Duration::from_secs(59));
    assert_eq!(c.get(&1), Lookup::Hit(val(1)));
    clock.advance(Duration::from_secs(1));
    assert_eq!(c.get(&1), Lookup::Miss);
    let s = c.stats();
    assert_eq!((s.expired, s.entries, s.bytes), (1, 0, 0));
}

#[test]
fn negative_entries_answer_absent_then_expire() {
    let (c, clock) = clocked(CacheConfig {
        negative_ttl: Duration::from_secs(2),
        ..config(1 << 20)
    });
    c.insert_absent_if_fresh(1, 1).expect("fresh");
    assert_eq!(c.get(&1), Lookup::Absent);
    assert_eq!(c.stats().negative_hits, 1);
    assert_eq!(c.stats().bytes, (8 + ENTRY_OVERHEAD) as u64);
    clock.advance(Duration::from_secs(2));
    assert_eq!(c.get(&1), Lookup::Miss);
    // A create invalidates the negative entry like any other.
    c.insert_absent_if_fresh(2, 1).expect("fresh");
    c.invalidate(&2, 2);
    assert_eq!(c.get(&2), Lookup::Miss);
}

#[test]
fn negative_ttl_is_capped_by_the_cache_ttl_and_zero_disables() {
    let (c, clock) = clocked(CacheConfig {
        ttl: Some(Duration::from_secs(1)),
        negative_ttl: Duration::from_secs(10),
        ..config(1 << 20)
    });
    c.insert_absent_if_fresh(1, 1).expect("fresh");
    clock.advance(Duration::from_secs(1));
    assert_eq!(c.get(&1), Lookup::Miss);
    let off: Cache<u64, Bytes> = Cache::new(CacheConfig {
        negative_ttl: Duration::ZERO,
        ..config(1 << 20)
    })
    .expect("valid");
    assert_eq!(
        off.insert_absent_if_fresh(1, 1),
        Err(Refused::NegativeDisabled)
    );
}

#[test]
fn oversized_entries_are_refused() {
    let c = cache(10_000);
    let limit = c.max_entry_bytes();
    assert!(matches!(
        c.insert_if_fresh(1, val(20_000), 1),
        Err(Refused::TooLarge { limit: l, .. }) if l == limit
    ));
    assert_eq!(c.stats().refused_too_large, 1);
    let fits = usize::try_from(limit - charged(0)).expect("small");
    c.insert_if_fresh(2, val(fits), 1).expect("fits exactly");
    assert_eq!(c.get(&2), Lookup::Hit(val(fits)));
}

#[test]
fn shrinking_evicts_to_the_new_bound() {
    let c = cache(1 << 20);
    for k in 0..500 {
        c.insert_if_fresh(k, val(100), 1).expect("fresh");
    }
    assert_eq!(c.stats().entries, 500);
    c.set_capacity(10_000);
    let s = c.stats();
    assert!(s.bytes <= 10_000, "{s:?}");
    assert!(s.entries < 500 && s.evictions > 0, "{s:?}");
    assert_eq!(s.capacity_bytes, 10_000);
    c.set_capacity(1 << 20);
    for k in 1000..1500 {
        c.insert_if_fresh(k, val(100), 1).expect("fresh");
    }
    assert_eq!(c.stats().entries as usize, 500 + s.entries as usize);
}

#[test]
fn frequently_hit_keys_survive_a_scan_of_one_hit_keys() {
    // Room for about 100 entries; 40 hot keys hit repeatedly, then 10 000 one-hit keys.
    let c = cache(100 * charged(100));
    for round in 0..4 {
        for k in 0..40u64 {
            if c.get(&k) == Lookup::Miss {
                assert_eq!(round, 0, "hot key {k} evicted while warming");
                c.insert_if_fresh(k, val(100), 1).expect("fresh");
            }
        }
    }
    for k in 1_000..11_000u64 {
        if c.get(&k) == Lookup::Miss {
            c.insert_if_fresh(k, val(100), 1).expect("fresh");
        }
    }
    let survivors = (0..40u64).filter(|k| c.get(k) != Lookup::Miss).count();
    // A plain LRU keeps none of them.
    assert!(
        survivors >= 36,
        "only {survivors} of 40 hot keys survived the scan"
    );
}

#[test]
fn concurrent_writes_never_leave_a_stale_value_behind() {
    // A "storage" whose value is its version; readers fill, a writer writes and
    // invalidates. Whatever the interleaving, what stays cached is the latest version.
    let c: Cache<u64, u64> = Cache::new(config(1 << 20)).expect("valid");
    let version = AtomicU64::new(0);
    let start = Barrier::new(3);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                start.wait();
                for _ in 0..20_000 {
                    let read = version.load(Ordering::SeqCst);
                    std::hint::spin_loop();
                    let _ = c.insert_if_fresh(1, read, read);
                }
            });
        }
        s.spawn(|| {
            start.wait();
            for _ in 0..2_000 {
                let v = version.fetch_add(1, Ordering::SeqCst) + 1;
                c.invalidate(&1, v);
                std::thread::yield_now();
            }
        });
    });
    let last = version.load(Ordering::SeqCst);
    match c.get(&1) {
        Lookup::Hit(v) => assert_eq!(v, last),
        other => assert_eq!(other, Lookup::Miss),
    }
}

#[tokio::test]
async fn single_flight_makes_one_load_for_100_callers() {
    let c = cache(1 << 20);
    let loads = AtomicUsize::new(0);
    let callers = (0..100).map(|_| {
        c.get_or_load(7, || async {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, std::io::Error>(Loaded {
                value: Some(val(3)),
                read_lsn: 1,
            })
        })
    });
    let results = futures_util::future::join_all(callers).await;
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(Some(v)) if *v == val(3))));
    assert_eq!(c.stats().loads, 1);
    assert_eq!(c.get(&7), Lookup::Hit(val(3)));
    assert!(c.flights.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_makes_one_load_for_100_spawned_tasks() {
    let c = Arc::new(cache(1 << 20));
    let loads = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (c, loads, entered) = (c.clone(), loads.clone(), entered.clone());
            tokio::spawn(async move {
                entered.fetch_add(1, Ordering::SeqCst);
                let waiting = entered.clone();
                c.get_or_load(7, || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    // Hold the load open until every caller has arrived, and a bit more.
                    while waiting.load(Ordering::SeqCst) < 100 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, std::io::Error>(Loaded {
                        value: Some(val(5)),
                        read_lsn: 1,
                    })
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        let got = t.await.expect("task ran").expect("loaded");
        assert_eq!(got, Some(val(5)));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_too_large_fresher_fill_drops_the_older_entry() {
    let c = cache(10_000);
    c.insert_if_fresh(1, val(10), 1).expect("fresh");
    assert!(c.insert_if_fresh(1, val(20_000), 2).is_err());
    assert_eq!(c.get(&1), Lookup::Miss);
}

#[tokio::test]
async fn single_flight_respects_the_gate_and_caches_absence() {
    let c = cache(1 << 20);
    // The key is written (LSN 9) while a load that read at LSN 8 is in flight.
    let got = c
        .get_or_load(1, || async {
            c.invalidate(&1, 9);
            Ok::<_, std::io::Error>(Loaded {
                value: Some(val(1)),
                read_lsn: 8,
            })
        })
        .await
        .expect("loads");
    assert_eq!(got, Some(val(1)), "the caller still gets what it read");
    assert_eq!(c.get(&1), Lookup::Miss, "but the stale value is not cached");
    assert_eq!(c.stats().refused_stale, 1);

    let none = c
        .get_or_load(2, || async {
            Ok::<_, std::io::Error>(Loaded {
                value: None,
                read_lsn: 9,
            })
        })
        .await
        .expect("loads");
    assert_eq!(none, None);
    assert_eq!(c.get(&2), Lookup::Absent);
}

#[tokio::test]
async fn a_failed_load_is_retried_by_the_next_waiter() {
    let c = cache(1 << 20);
    let loads = AtomicUsize::new(0);
    let call = |fail: bool| {
        let loads = &loads;
        c.get_or_load(1, move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            if fail {
                Err("storage down")
            } else {
                Ok(Loaded {
                    value: Some(val(1)),
                    read_lsn: 1,
                })
            }
        })
    };
    let (a, b) = tokio::join!(call(true), call(false));
    assert_eq!(a, Err("storage down"));
    assert_eq!(b, Ok(Some(val(1))));
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    assert!(c.flights.is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u64, usize, u64),
    Absent(u64, u64),
    Get(u64),
    Invalidate(u64, u64),
    Resize(u64),
    Clear(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..64, 0usize..3000, 0u64..100).prop_map(|(k, n, l)| Op::Insert(k, n, l)),
        1 => (0u64..64, 0u64..100).prop_map(|(k, l)| Op::Absent(k, l)),
        3 => (0u64..64).prop_map(Op::Get),
        2 => (0u64..64, 0u64..100).prop_map(|(k, l)| Op::Invalidate(k, l)),
        1 => (0u64..40_000).prop_map(Op::Resize),
        1 => (0u64..100).prop_map(Op::Clear),
    ]
}

proptest! {
    /// The byte bound holds after every operation, whatever the sequence.
    #[test]
    fn capacity_is_never_exceeded(
        capacity in 0u64..40_000,
        shards in 1usize..8,
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let c: Cache<u64, Bytes> = Cache::new(CacheConfig {
            capacity_bytes: capacity,
            shards,
            expected_entry_bytes: 64,
            ..CacheConfig::default()
        }).expect("valid");
        for op in ops {
            match op {
                Op::Insert(k, n, l) => { let _ = c.insert_if_fresh(k, val(n), l); }
                Op::Absent(k, l) => { let _ = c.insert_absent_if_fresh(k, l); }
                Op::Get(k) => { let _ = c.get(&k); }
                Op::Invalidate(k, l) => c.invalidate(&k, l),
                Op::Resize(b) => c.set_capacity(b),
                Op::Clear(l) => c.clear(l),
            }
            let s = c.stats();
            prop_assert!(s.bytes <= s.capacity_bytes, "{:?}", s);
        }
    }

    /// After `invalidate(k, L)`, a fill of `k` read at `R` is stored iff `R >= L`, and
    /// no sequence of operations makes the cache serve a value read before the latest
    /// invalidation of its key.
    #[test]
    fn the_gate_never_serves_a_value_older_than_its_invalidation(
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let c: Cache<u64, u64> = Cache::new(config(1 << 30)).expect("valid");
        let mut latest_inval: std::collections::HashMap<u64, u64> = Default::default();
        let mut floor = 0;
        for op in ops {
            match op {
                Op::Insert(k, _, r) => {
                    let needed = latest_inval.get(&k).copied().unwrap_or(0).max(floor);
                    let res = c.insert_if_fresh(k, r, r);
                    if r < needed {
                        prop_assert!(res.is_err());
                    }
                }
                Op::Invalidate(k, l) => {
                    c.invalidate(&k, l);
                    let e = latest_inval.entry(k).or_default();
                    *e = (*e).max(l);
                }
                Op::Clear(l) => { c.clear(l); floor = floor.max(l); }
                Op::Get(k) => {
                    if let Lookup::Hit(read) = c.get(&k) {
                        let needed = latest_inval.get(&k).copied().unwrap_or(0).max(floor);
                        prop_assert!(read >= needed);
                    }
                }
                Op::Absent(..) | Op::Resize(_) => {}
            }
        }
    }
}

#[test]
fn replacing_an_entry_is_not_an_eviction() {
    let c = cache(1 << 20);
    c.insert_if_fresh(1, val(10), 1).unwrap();
    c.insert_if_fresh(1, val(20), 2).unwrap();
    c.insert_if_fresh(1, val(30), 2).unwrap();
    let s = c.stats();
    assert_eq!((s.inserts, s.evictions, s.entries), (3, 0, 1), "{s:?}");
}
