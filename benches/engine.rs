//! Micro-benchmarks of the embedded storage engine: the read fast path (get, list) and
//! durable writes alone and under concurrency (where group commit shares one fsync).
//!
//! Run: `cargo bench --bench engine -- --quick`. The database lives in a temporary
//! directory on the default temp file system, so write figures measure that disk's fsync.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_main, Criterion, Throughput};
use strata::storage::{Engine, EngineConfig, Key, ListQuery, Precondition, Write, WriteOp};

const BODY: &[u8] =
    br#"{"title":"a typical small JSON document","done":false,"tags":["a","b"],"n":42}"#;

fn open(dir: &std::path::Path) -> Arc<Engine> {
    Engine::open(EngineConfig {
        path: dir.join("data"),
        log_retention: 100_000,
        max_group: 256,
        cache_bytes: 64 << 20,
    })
    .expect("open engine")
}

fn put(collection: &str, id: &str) -> Write {
    Write {
        key: Key::new(collection, id).expect("valid key"),
        op: WriteOp::Put(Bytes::from_static(BODY)),
        precondition: Precondition::None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let rt = runtime();
    rt.block_on(async {
        for chunk in 0..10 {
            let batch = (0..100)
                .map(|i| put("bench", &format!("id{:05}", chunk * 100 + i)))
                .collect();
            engine.write(batch).await.expect("prefill");
        }
    });
    let key = Key::new("bench", "id00500").expect("valid key");
    c.bench_function("get_existing", |b| {
        b.iter(|| engine.get(std::hint::black_box(&key)).expect("get"))
    });
    let query = ListQuery {
        prefix: String::new(),
        after: Some("id00400".into()),
        limit: 50,
    };
    c.bench_function("list_50", |b| {
        b.iter(|| {
            let page = engine
                .list("bench", std::hint::black_box(&query))
                .expect("list");
            assert_eq!(page.items.len(), 50);
            page
        })
    });
    engine.shutdown().expect("shutdown");
}

fn writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let rt = runtime();
    let mut n = 0u64;

    let mut group = c.benchmark_group("durable_write");
    group.sample_size(20);
    group.throughput(Throughput::Elements(1));
    group.bench_function("single", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(engine.write(vec![put("w", &format!("s{n}"))]))
                .expect("write")
        })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("concurrent_64", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|i| {
                        n += 1;
                        let engine = engine.clone();
                        let w = put("w", &format!("c{n}-{i}"));
                        tokio::spawn(async move { engine.write(vec![w]).await })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("join").expect("write");
                }
            })
        })
    });
    group.finish();
    let m = engine.metrics();
    eprintln!(
        "durable_write: {} batches in {} group commits",
        m.batches.get(),
        m.groups.get()
    );
    engine.shutdown().expect("shutdown");
}

/// `criterion_group!` generates an undocumented `pub fn`; keep `missing_docs` quiet about it.
#[allow(missing_docs)]
mod group {
    use super::{reads, writes};
    criterion::criterion_group!(benches, reads, writes);
}
criterion_main!(group::benches);
