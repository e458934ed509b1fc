//! Storage protocol benchmarks: encode/decode of typical frames (pure CPU), and the latency
//! of a get over loopback against a real in-process storage server with the real engine.
//!
//! Run: `cargo bench --bench protocol`. Besides criterion's figures it prints p50/p99/p999
//! of sequential gets and the throughput of pipelined gets over one connection pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_main, Criterion};
use strata::config::{RemoteStorage, StorageConfig};
use strata::storage::client::RemoteStore;
use strata::storage::protocol::{
    decode_frame, encode_frame, Message, Request, Response, WirePrecondition, WireRecord,
    WireWrite, MAX_FRAME_CEILING,
};
use strata::storage::server::StorageServer;
use strata::storage::{Engine, EngineConfig, Key, Precondition, Write, WriteOp};

const SECRET: &[u8] = b"bench-secret-0123456789";

fn record(len: usize) -> WireRecord {
    WireRecord {
        body: vec![b'x'; len],
        lsn: 123_456,
        created_ms: 1_700_000_000_000,
        updated_ms: 1_700_000_000_123,
    }
}

fn frames() -> Vec<(&'static str, Message)> {
    vec![
        (
            "get_request",
            Message::Request {
                id: 42,
                body: Request::Get {
                    key: "users/01HZY3K8Q9V0M2N4P6R8T0W2Y4".into(),
                },
            },
        ),
        (
            "record_response_100B",
            Message::Response {
                id: 42,
                body: Response::Record(Some(record(100))),
            },
        ),
        (
            "write_request_100B",
            Message::Request {
                id: 43,
                body: Request::Write {
                    writes: vec![WireWrite {
                        key: "bench/1234".into(),
                        body: Some(vec![b'x'; 100]),
                        precondition: WirePrecondition::None,
                    }],
                },
            },
        ),
        (
            "page_response_100x100B",
            Message::Response {
                id: 44,
                body: Response::Page {
                    items: (0..100)
                        .map(|i| (format!("id{i:05}"), record(100)))
                        .collect(),
                    next: Some("id00099".into()),
                },
            },
        ),
    ]
}

fn codec(c: &mut Criterion) {
    for (name, msg) in frames() {
        c.bench_function(&format!("encode/{name}"), |b| b.iter(|| encode_frame(&msg)));
        let bytes = encode_frame(&msg);
        c.bench_function(&format!("decode/{name}"), |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(&bytes[..]);
                decode_frame(&mut buf, MAX_FRAME_CEILING)
            })
        });
    }
}

struct Loopback {
    rt: tokio::runtime::Runtime,
    store: Arc<RemoteStore>,
    _stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn loopback() -> Loopback {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let store = rt.block_on(async {
        let engine = Engine::open(EngineConfig {
            path: dir.path().join("data"),
            log_retention: 100_000,
            max_group: 1024,
            cache_bytes: 64 << 20,
        })
        .expect("engine");
        let config: StorageConfig =
            toml::from_str("listen = \"127.0.0.1:0\"").expect("storage config");
        let server = StorageServer::new(&config, engine.clone(), SECRET, "bench").expect("server");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(server.run(listener, stop_rx.clone(), Duration::from_secs(1)));
        let link: RemoteStorage =
            toml::from_str(&format!("primary = \"{addr}\"")).expect("link config");
        let store = RemoteStore::start(&link, SECRET, stop_rx).expect("client");
        assert!(store.wait_ready(Duration::from_secs(5)).await, "connects");
        let writes = (0..1000)
            .map(|i| Write {
                key: Key::new("bench", &i.to_string()).expect("key"),
                op: WriteOp::Put(Bytes::from(format!("{{\"v\":\"{}\"}}", "x".repeat(92)))),
                precondition: Precondition::None,
            })
            .collect();
        store.write(writes).await.expect("seed");
        store
    });
    Loopback {
        rt,
        store,
        _stop: stop_tx,
        _dir: dir,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn remote_get(c: &mut Criterion) {
    let lb = loopback();
    let key = Key::new("bench", "500").expect("key");
    c.bench_function("loopback/get_100B", |b| {
        b.iter(|| lb.rt.block_on(lb.store.get(&key)).expect("get"))
    });

    // Latency distribution of sequential gets (one in flight at a time).
    let mut lat = Vec::with_capacity(20_000);
    lb.rt.block_on(async {
        for i in 0..20_000u32 {
            let key = Key::new("bench", &(i % 1000).to_string()).expect("key");
            let t = Instant::now();
            lb.store.get(&key).await.expect("get");
            lat.push(t.elapsed());
        }
    });
    lat.sort();
    println!(
        "loopback get, sequential, 20000 samples: p50 {:?}  p99 {:?}  p99.9 {:?}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999)
    );

    // Pipelined: 64 concurrent getters over the pool.
    let (n, took) = lb.rt.block_on(async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..64u32 {
            let store = lb.store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..1000u32 {
                    let key = Key::new("bench", &((t * 7 + i) % 1000).to_string()).expect("key");
                    store.get(&key).await.expect("get");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        (64_000u32, started.elapsed())
    });
    println!(
        "loopback get, 64 concurrent: {n} gets in {took:?} = {:.0} gets/s",
        f64::from(n) / took.as_secs_f64()
    );
}

/// `criterion_group!` generates an undocumented `pub fn`; keep `missing_docs` quiet about it.
#[allow(missing_docs)]
mod group {
    use super::{codec, remote_get};
    use criterion::Criterion;
    use std::time::Duration;

    criterion::criterion_group! {
        name = benches;
        config = Criterion::default()
            .sample_size(30)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        targets = codec, remote_get
    }
}
criterion_main!(group::benches);
