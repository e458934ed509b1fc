//! The cache-aside layer over the real engine: the stale-set race made deterministic, the
//! feed's clear, and the read decision.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::config::{AppCacheConfig, Size};
use crate::storage::{Engine, EngineConfig, Precondition, Write, WriteOp};

fn engine(dir: &Path) -> Arc<Engine> {
    Engine::open(EngineConfig {
        path: dir.join("data"),
        log_retention: 1_000,
        max_group: 16,
        cache_bytes: 4 << 20,
    })
    .expect("engine opens")
}

fn put(key: &Key, body: &str) -> Vec<Write> {
    vec![Write {
        key: key.clone(),
        op: WriteOp::Put(Bytes::from(body.to_owned())),
        precondition: Precondition::None,
    }]
}

fn local_cache() -> Arc<RecordCache> {
    let cfg = AppCacheConfig {
        max_bytes: Size(1 << 20),
        ..AppCacheConfig::default()
    };
    RecordCache::new(&cfg, true, "test".into()).expect("cache builds")
}

fn body(l: Lookup<Arc<CachedRecord>>) -> Option<String> {
    match l {
        Lookup::Hit(v) => Some(String::from_utf8_lossy(&v.record.body).into_owned()),
        _ => None,
    }
}

/// Hold a read (its value loaded from the engine, not yet cached), let a write and its
/// invalidation through, then release the read: the old value must not be cached, and
/// the next read must see the new one.
#[tokio::test]
async fn stale_set_race_through_single_flight_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path());
    let store = Store::Embedded(engine.clone());
    let cache = local_cache();
    let key = Key::new("users", "alice").expect("key");
    engine
        .write(put(&key, "{\"v\":1}"))
        .await
        .expect("write v1");

    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = {
        let (cache, store, key) = (cache.clone(), store.clone(), key.clone());
        tokio::spawn(async move {
            cache
                .cache
                .get_or_load_traced(&key, || async {
                    let (record, read_lsn) = store
                        .read_at(&key, ReadConsistency::Any)
                        .await
                        .expect("read");
                    let _ = loaded_tx.send(());
                    let _ = release_rx.await;
                    Ok::<_, StoreError>(Loaded {
                        value: record.map(CachedRecord::new),
                        read_lsn,
                    })
                })
                .await
                .expect("load")
        })
    };
    loaded_rx.await.expect("the read has loaded v1");
    let committed = engine
        .write(put(&key, "{\"v\":2}"))
        .await
        .expect("write v2");
    // What the change feed (or the writer) does once the write is acknowledged.
    cache.feed_apply(committed.lsn, &[key.to_string()]);
    release_tx.send(()).expect("release the read");
    let (value, fill) = reader.await.expect("reader task");
    assert_eq!(
        value.map(|v| v.record.body.clone()),
        Some(Bytes::from_static(b"{\"v\":1}")),
        "the held read answers its own caller with what it read"
    );
    assert_eq!(fill, Fill::Loaded { stored: false }, "the gate refused it");
    assert_eq!(body(cache.lookup(&key)), None, "v1 was not cached");
    assert_eq!(cache.cache.stats().refused_stale, 1);

    let (found, status) = cache
        .read(&store, key.clone(), ReadConsistency::Any)
        .await
        .expect("read through the cache");
    assert_eq!(
        found.map(|v| v.record.body.clone()),
        Some(Bytes::from_static(b"{\"v\":2}"))
    );
    assert_eq!(status, "strata; fwd=miss; stored");
    assert_eq!(body(cache.lookup(&key)).as_deref(), Some("{\"v\":2}"));
    engine.shutdown().expect("shutdown");
}

/// The same race when the invalidation lands before the fill without single flight (a
/// token read's path): `fill` with the old read LSN is refused; the fresh value is kept.
#[tokio::test]
async fn fill_read_before_an_invalidation_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path());
    let store = Store::Embedded(engine.clone());
    let cache = local_cache();
    let key = Key::new("c", "k").expect("key");
    engine.write(put(&key, "1")).await.expect("write");
    let (old, old_lsn) = store
        .read_at(&key, ReadConsistency::Any)
        .await
        .expect("read");
    let committed = engine.write(put(&key, "2")).await.expect("write");
    cache.invalidate_written([&key], committed.lsn);
    assert!(!cache.fill(key.clone(), old, old_lsn), "stale fill refused");
    let (new, new_lsn) = store
        .read_at(&key, ReadConsistency::Any)
        .await
        .expect("read");
    assert!(new_lsn >= committed.lsn);
    assert!(cache.fill(key.clone(), new, new_lsn));
    assert_eq!(body(cache.lookup(&key)).as_deref(), Some("2"));
    engine.shutdown().expect("shutdown");
}

/// A feed that cannot resume empties the cache and refuses fills from before its start.
#[test]
fn feed_restart_without_resume_clears_and_raises_the_floor() {
    let cache = local_cache();
    let key = Key::new("c", "k").expect("key");
    let rec = |lsn| Record {
        body: Bytes::from_static(b"1"),
        lsn,
        created_ms: 0,
        updated_ms: 0,
    };
    cache.feed_started(1, 5, false);
    assert!(cache.fill(key.clone(), Some(rec(5)), 5));
    cache.feed_started(1, 9, true);
    assert!(
        body(cache.lookup(&key)).is_some(),
        "an exact resume keeps entries"
    );
    cache.feed_started(2, 20, false);
    assert!(
        body(cache.lookup(&key)).is_none(),
        "a broken feed empties the cache"
    );
    assert!(
        !cache.fill(key.clone(), Some(rec(5)), 19),
        "fills from before the restart are refused"
    );
    assert!(cache.fill(key.clone(), Some(rec(5)), 20));
    assert_eq!(cache.feed_position(), (20, 2));
    assert_eq!(cache.status()["feed"]["clears"], 1);
}

#[test]
fn decide_bypasses_strong_stale_and_tokens_ahead() {
    let max = Duration::from_secs(1);
    let live = FeedView {
        applied_lsn: 10,
        epoch: 2,
        staleness: Some(Duration::from_millis(5)),
    };
    let any = ReadConsistency::Any;
    assert_eq!(decide(any, live, max), Decision::Use);
    assert_eq!(
        decide(ReadConsistency::Strong, live, max),
        Decision::Bypass(Bypass::Requested)
    );
    let token = |epoch, lsn| ReadConsistency::AtLeast { epoch, lsn };
    assert_eq!(decide(token(2, 10), live, max), Decision::Use);
    assert_eq!(decide(token(0, 10), live, max), Decision::Use);
    assert_eq!(
        decide(token(2, 11), live, max),
        Decision::Bypass(Bypass::TokenAhead)
    );
    assert_eq!(
        decide(token(3, 1), live, max),
        Decision::Bypass(Bypass::TokenAhead),
        "a token from a newer epoch"
    );
    let stale = FeedView {
        staleness: Some(Duration::from_millis(1001)),
        ..live
    };
    assert_eq!(decide(any, stale, max), Decision::Bypass(Bypass::FeedStale));
    let never = FeedView {
        staleness: None,
        ..live
    };
    assert_eq!(decide(any, never, max), Decision::Bypass(Bypass::FeedStale));
}

/// Live resize: shrinking evicts at once, and the bound holds with mixed sizes.
#[test]
fn apply_shrinks_live() {
    let cache = local_cache();
    cache.feed_started(1, 0, false);
    for i in 0..200u64 {
        let key = Key::new("c", &format!("k{i}")).expect("key");
        let body = Bytes::from(vec![b'x'; 100 + (i as usize % 7) * 300]);
        let rec = Record {
            body,
            lsn: i,
            created_ms: 0,
            updated_ms: 0,
        };
        cache.fill(key, Some(rec), i);
    }
    let before = cache.cache.stats();
    assert!(before.bytes <= 1 << 20 && before.entries > 100);
    let small = AppCacheConfig {
        max_bytes: Size(16 << 10),
        ..AppCacheConfig::default()
    };
    cache.apply(&small);
    let after = cache.cache.stats();
    assert!(
        after.bytes <= 16 << 10,
        "{} bytes after shrinking",
        after.bytes
    );
    assert!(after.entries < before.entries);
}
