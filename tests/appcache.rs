//! Stage 5: the apps' coherent record cache. Real processes on loopback: a storage primary,
//! a replica, apps with `[app.cache]`; the feed cut by a TCP fault proxy.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultProxy};
use common::{wait_until, Node};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECRET: &str = "appcache-test-secret-0123456789";

fn node_section(dir: &Path, name: &str) -> String {
    format!(
        "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\ncluster_secret = \"{SECRET}\"\n",
        dir.join("data").display()
    )
}

fn start_storage(root: &Path, name: &str, follow: Option<SocketAddr>) -> Node {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mode = follow.map_or(String::new(), |p| {
        format!("mode = \"replica\"\nfollow = \"{p}\"\n")
    });
    let text = format!(
        "{}\n[storage]\nlisten = \"127.0.0.1:0\"\n{mode}",
        node_section(&dir, name)
    );
    Node::start_with(&dir, &text)
}

/// An app on remote storage; `storage` is the inline table's body, `cache` the
/// `[app.cache]` keys (`None`: no cache).
fn start_app(root: &Path, name: &str, storage: &str, app: &str, cache: Option<&str>) -> Node {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = cache.map_or(String::new(), |c| format!("\n[app.cache]\n{c}\n"));
    let text = format!(
        "{}\n[app]\nlisten = \"127.0.0.1:0\"\nstorage = {{ {storage} }}\n{app}\n{cache}",
        node_section(&dir, name)
    );
    Node::start_with(&dir, &text)
}

async fn put(url: &str, body: Value) -> u64 {
    let r = common::client()
        .put(url)
        .json(&body)
        .send()
        .await
        .expect("PUT");
    assert!(r.status().is_success(), "PUT {url}: {}", r.status());
    r.headers()["strata-lsn"].to_str().unwrap().parse().unwrap()
}

/// GET → (status, body as JSON or Null, Cache-Status).
async fn get(url: &str, token: Option<u64>) -> (StatusCode, Value, String) {
    let mut req = common::client().get(url);
    if let Some(t) = token {
        req = req.header("strata-lsn", t.to_string());
    }
    let r = req.send().await.expect("GET");
    let status = r.status();
    let cs = r
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = if status == StatusCode::OK {
        r.json().await.expect("JSON body")
    } else {
        Value::Null
    };
    (status, body, cs)
}

fn app_cache(status: &Value) -> &Value {
    &status["components"]["app"]["cache"]
}

/// Waits until `app`'s feed has applied `lsn` (and says it is trusted).
async fn feed_reaches(app: &Node, lsn: u64) {
    wait_until(
        "the cache feed to deliver the write",
        Duration::from_secs(10),
        || async {
            let s = app.status().await;
            let f = &app_cache(&s)["feed"];
            f["applied_lsn"].as_u64().unwrap_or(0) >= lsn && f["trusted"] == json!(true)
        },
    )
    .await;
}

/// Two apps, a primary and a replica. Writes through one app, reads through the other:
/// a read carrying the write's token never sees the old value; once the feed delivered the
/// write, no read does, and the new value is then served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_stay_coherent_through_the_change_feed() {
    let root = tempfile::tempdir().unwrap();
    let primary = start_storage(root.path(), "primary", None);
    let p = primary.storage.unwrap();
    let replica = start_storage(root.path(), "replica", Some(p));
    let r = replica.storage.unwrap();
    let link =
        format!("primary = \"{p}\", replicas = [\"{r}\"], max_lag = \"30s\", token_wait = \"1s\"");
    // A follows the replica's feed, B the primary's: both sources are exercised.
    let a = start_app(
        root.path(),
        "app-a",
        &link,
        "",
        Some(&format!("max_bytes = \"4MiB\"\nfollow = \"{r}\"")),
    );
    let b = start_app(
        root.path(),
        "app-b",
        &link,
        "",
        Some("max_bytes = \"4MiB\""),
    );
    let (ua, ub) = (a.url(), b.url());
    let key = "/api/v1/things/k";

    let lsn = put(&format!("{ua}{key}"), json!({"v": 0})).await;
    feed_reaches(&a, lsn).await;
    feed_reaches(&b, lsn).await;
    for round in 1..=20u64 {
        let (writer, reader, reader_node) = if round % 2 == 0 {
            (&ua, &ub, &b)
        } else {
            (&ub, &ua, &a)
        };
        // Warm the reader's cache with the current value.
        let before = round - 1;
        wait_until(
            "the reader to cache the current value",
            Duration::from_secs(10),
            || async {
                let (s, v, cs) = get(&format!("{reader}{key}"), None).await;
                s == StatusCode::OK && v["v"] == json!(before) && cs == "strata; hit"
            },
        )
        .await;
        let lsn = put(&format!("{writer}{key}"), json!({"v": round})).await;
        // With the write's token: never the old value, whatever the feed has done.
        let (s, v, cs) = get(&format!("{reader}{key}"), Some(lsn)).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            v["v"],
            json!(round),
            "token read returned an old value ({cs})"
        );
        // Once the feed delivered the write: never the old value, and then hits.
        feed_reaches(reader_node, lsn).await;
        for _ in 0..3 {
            let (_, v, cs) = get(&format!("{reader}{key}"), None).await;
            assert_eq!(v["v"], json!(round), "read after the feed delivered: {cs}");
        }
        let (_, _, cs) = get(&format!("{reader}{key}"), None).await;
        assert_eq!(cs, "strata; hit");
    }
    // Deletes and negative entries: a cached 404 is dropped by a create elsewhere.
    let gone = "/api/v1/things/created-later";
    assert_eq!(
        get(&format!("{ua}{gone}"), None).await.0,
        StatusCode::NOT_FOUND
    );
    let (s, _, cs) = get(&format!("{ua}{gone}"), None).await;
    assert_eq!((s, cs.as_str()), (StatusCode::NOT_FOUND, "strata; hit"));
    let lsn = put(&format!("{ub}{gone}"), json!({"here": true})).await;
    feed_reaches(&a, lsn).await;
    let (s, v, _) = get(&format!("{ua}{gone}"), None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"here": true})));

    let st = a.status().await;
    let c = app_cache(&st);
    assert!(c["hits"].as_u64().unwrap() > 0 && c["entries"].as_u64().unwrap() > 0);
    assert_eq!(c["feed"]["source"], json!(r.to_string()));
    let metrics = b.metrics_text().await;
    for m in [
        "strata_app_cache_hits",
        "strata_app_cache_misses",
        "strata_app_cache_hit_ratio_permille",
        "strata_app_cache_evictions",
        "strata_app_cache_bytes",
        "strata_app_cache_entries",
        "strata_app_cache_refused_fills",
        "strata_app_cache_feed_lag_milliseconds",
    ] {
        assert!(metrics.contains(m), "{m} missing from /metrics");
    }
}

/// The data API suite against an app with remote storage and the cache on: every
/// behaviour is unchanged (writes drop their own keys, so read-after-write holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_suite_with_the_cache_on() {
    let root = tempfile::tempdir().unwrap();
    let primary = start_storage(root.path(), "primary", None);
    let p = primary.storage.unwrap();
    let app = start_app(
        root.path(),
        "app",
        &format!("primary = \"{p}\""),
        "max_body = \"64KiB\"",
        Some("max_bytes = \"8MiB\""),
    );
    feed_reaches(&app, 0).await;
    common::suite::all(&app.url(), 64 << 10).await;
    // And embedded storage, where the engine feeds the cache directly.
    let embedded = Node::start_app("max_body = \"64KiB\"\n[app.cache]\nmax_bytes = \"8MiB\"\n");
    common::suite::all(&embedded.url(), 64 << 10).await;
    let st = embedded.status().await;
    assert!(app_cache(&st)["hits"].as_u64().unwrap() > 0, "{st}");
    assert!(app_cache(&st)["bytes"].as_u64().unwrap() > 0, "{st}");

    // Live resize on reload: the new bound is in force at once.
    let text = std::fs::read_to_string(&embedded.config).unwrap();
    std::fs::write(
        &embedded.config,
        text.replace("max_bytes = \"8MiB\"", "max_bytes = \"16KiB\""),
    )
    .unwrap();
    let r = common::client()
        .post(format!("http://{}/admin/reload", embedded.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let st = embedded.status().await;
    assert_eq!(app_cache(&st)["capacity_bytes"], json!(16 << 10), "{st}");
    assert!(
        app_cache(&st)["bytes"].as_u64().unwrap() <= 16 << 10,
        "{st}"
    );
}

/// The feed to app A goes through a fault proxy that starts swallowing everything (a
/// partition TCP does not see). A write through B must become visible through A within
/// `max_staleness` (plus the time to notice), the cache is bypassed meanwhile, and once
/// the link heals the feed resumes and A serves from its cache again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_cut_stops_trusting_the_cache_within_max_staleness() {
    let root = tempfile::tempdir().unwrap();
    let primary = start_storage(root.path(), "primary", None);
    let p = primary.storage.unwrap();
    let proxy = FaultProxy::start(p, 0);
    let max_staleness = Duration::from_millis(800);
    let a = start_app(
        root.path(),
        "app-a",
        &format!("primary = \"{p}\""),
        "",
        Some(&format!(
            "max_staleness = \"{}ms\"\nfollow = \"{}\"",
            max_staleness.as_millis(),
            proxy.addr
        )),
    );
    let b = start_app(
        root.path(),
        "app-b",
        &format!("primary = \"{p}\""),
        "",
        None,
    );
    let key = "/api/v1/cut/k";
    let lsn = put(&format!("{}{key}", b.url()), json!({"v": 1})).await;
    feed_reaches(&a, lsn).await;
    wait_until("A to cache v1", Duration::from_secs(10), || async {
        get(&format!("{}{key}", a.url()), None).await.2 == "strata; hit"
    })
    .await;

    proxy.set(Fault::Blackhole);
    let cut_at = Instant::now();
    put(&format!("{}{key}", b.url()), json!({"v": 2})).await;
    let saw_bypass = loop {
        let (_, v, cs) = get(&format!("{}{key}", a.url()), None).await;
        if v["v"] == json!(2) {
            break cs.contains("fwd=bypass") && cs.contains("feed-stale");
        }
        assert_eq!(v["v"], json!(1), "only the old or the new value");
        assert!(
            cut_at.elapsed() < max_staleness + Duration::from_secs(2),
            "A still served the cached old value {:?} after the feed was cut",
            cut_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        saw_bypass,
        "the new value came from storage, bypassing the cache"
    );
    let st = a.status().await;
    assert_eq!(app_cache(&st)["feed"]["trusted"], json!(false), "{st}");

    // Heal: the feed reconnects, resumes exactly (no clear) and the cache is used again.
    proxy.set(Fault::Pass);
    proxy.cut_all();
    let lsn = put(&format!("{}{key}", b.url()), json!({"v": 3})).await;
    feed_reaches(&a, lsn).await;
    wait_until(
        "A to serve v3 from its cache",
        Duration::from_secs(10),
        || async {
            let (_, v, cs) = get(&format!("{}{key}", a.url()), None).await;
            v["v"] == json!(3) && cs == "strata; hit"
        },
    )
    .await;
    let st = a.status().await;
    assert_eq!(
        app_cache(&st)["feed"]["clears"],
        json!(0),
        "an exact resume keeps the cache"
    );
}

/// Values of mixed sizes, several times the cache's size, read through an app: the cache
/// stays within its bound and the process's resident memory grows by no more than the
/// bound plus the documented overhead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_the_cache_bound() {
    const CACHE: u64 = 8 << 20;
    let root = tempfile::tempdir().unwrap();
    let primary = start_storage(root.path(), "primary", None);
    let p = primary.storage.unwrap();
    let app = start_app(
        root.path(),
        "app",
        &format!("primary = \"{p}\""),
        "",
        Some(&format!("max_bytes = \"{}MiB\"", CACHE >> 20)),
    );
    // The data goes in through another app, so the measured one's baseline is not
    // inflated by request buffers of the writes.
    let writer = start_app(
        root.path(),
        "writer",
        &format!("primary = \"{p}\""),
        "max_body = \"8MiB\"",
        None,
    );
    let (url, wurl) = (app.url(), writer.url());
    let c = common::client();
    // ~38 MiB of records (nearly 5× the bound), 512 B to 64 KiB each, written in batches.
    let sizes: Vec<usize> = (0..1200).map(|i| 512 + (i * 7919) % (64 << 10)).collect();
    for chunk in sizes.chunks(100).enumerate() {
        let (n, sizes) = chunk;
        let writes: Vec<Value> = sizes
            .iter()
            .enumerate()
            .map(|(i, len)| {
                json!({"op": "put", "collection": "mem", "id": format!("k{}", n * 100 + i),
                       "value": {"pad": "x".repeat(*len)}})
            })
            .collect();
        let r = c
            .post(format!("{wurl}/api/v1/batch"))
            .json(&json!({ "writes": writes }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    feed_reaches(&app, 12).await;
    let pid = app.child.id();
    let before = rss_bytes(pid);
    for (i, len) in sizes.iter().enumerate() {
        let r = c
            .get(format!("{url}/api/v1/mem/k{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), len + 10, "every value intact"); // {"pad":"…"}
    }
    let after = rss_bytes(pid);
    let st = app.status().await;
    let cache = app_cache(&st);
    assert!(cache["bytes"].as_u64().unwrap() <= CACHE, "{cache}");
    assert!(cache["evictions"].as_u64().unwrap() > 0, "{cache}");
    // Documented in README (Stage 5): RSS growth ≤ max_bytes × 1.25 + 16 MiB (allocator
    // slack and fragmentation, connection buffers).
    let allowed = CACHE + CACHE / 4 + (16 << 20);
    let grew = after.saturating_sub(before);
    eprintln!(
        "RSS {before} -> {after} (+{grew} bytes), cache {}",
        cache["bytes"]
    );
    assert!(
        grew <= allowed,
        "RSS grew by {grew} bytes, more than the cache bound {CACHE} + overhead"
    );
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// App A follows a replica's feed; the replica loses its primary. A counts the replica's
/// own lag against `max_staleness`: a write it cannot see through the replica is served
/// from storage (the primary) within the bound, not hidden by the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_feed_counts_the_replicas_lag() {
    let root = tempfile::tempdir().unwrap();
    let primary = start_storage(root.path(), "primary", None);
    let p = primary.storage.unwrap();
    let proxy = FaultProxy::start(p, 0);
    let replica = start_storage(root.path(), "replica", Some(proxy.addr));
    let r = replica.storage.unwrap();
    let max_staleness = Duration::from_millis(800);
    let a = start_app(
        root.path(),
        "app-a",
        &format!("primary = \"{p}\""),
        "",
        Some(&format!(
            "max_staleness = \"{}ms\"\nfollow = \"{r}\"",
            max_staleness.as_millis()
        )),
    );
    let b = start_app(
        root.path(),
        "app-b",
        &format!("primary = \"{p}\""),
        "",
        None,
    );
    let key = "/api/v1/lag/k";
    let lsn = put(&format!("{}{key}", b.url()), json!({"v": 1})).await;
    feed_reaches(&a, lsn).await;
    wait_until("A to cache v1", Duration::from_secs(10), || async {
        get(&format!("{}{key}", a.url()), None).await.2 == "strata; hit"
    })
    .await;

    proxy.set(Fault::Drop); // the replica is cut off from the primary
    let cut_at = Instant::now();
    put(&format!("{}{key}", b.url()), json!({"v": 2})).await;
    loop {
        let (_, v, cs) = get(&format!("{}{key}", a.url()), None).await;
        if v["v"] == json!(2) {
            assert!(cs.contains("feed-stale"), "{cs}");
            break;
        }
        assert_eq!(v["v"], json!(1), "only the old or the new value");
        assert!(
            cut_at.elapsed() < max_staleness + Duration::from_secs(3),
            "A hid the write behind its cache for {:?}",
            cut_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = a.status().await;
    assert_eq!(app_cache(&st)["feed"]["connected"], json!(true), "{st}");
    assert_eq!(app_cache(&st)["feed"]["trusted"], json!(false), "{st}");
}
