//! Stage 4: read replicas fed by log shipping. Real processes on loopback; faults injected
//! by a TCP proxy between replica and primary (tests/common/fault_proxy.rs).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::fault_proxy::{Fault, FaultProxy};
use common::Node;
use strata::storage::protocol::{
    self, Message, Purpose, Request, Response, WirePrecondition, WireReplStatus, WireWrite,
};

const SECRET: &str = "replication-test-secret-0123456789";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Config of a storage node; `follow` makes it a replica.
fn storage_config(
    dir: &Path,
    name: &str,
    port: u16,
    follow: Option<SocketAddr>,
    extra: &str,
) -> String {
    let mode = match follow {
        Some(p) => format!("mode = \"replica\"\nfollow = \"{p}\"\n"),
        None => String::new(),
    };
    format!(
        "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\ncluster_secret = \"{SECRET}\"\n{}\n[storage]\nlisten = \"127.0.0.1:{port}\"\n{mode}{extra}\n",
        dir.join("data").display(),
        "",
    )
}

fn start(
    root: &Path,
    name: &str,
    port: u16,
    follow: Option<SocketAddr>,
    node_extra: &str,
    extra: &str,
) -> Node {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = storage_config(&dir, name, port, follow, extra);
    if !node_extra.is_empty() {
        text = text.replacen("[storage]", &format!("{node_extra}\n[storage]"), 1);
    }
    Node::start_with(&dir, &text)
}

/// A blocking client speaking the storage protocol.
struct Peer {
    s: TcpStream,
    buf: BytesMut,
    next: u64,
}

impl Peer {
    fn connect(addr: SocketAddr) -> std::io::Result<Peer> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        let mut p = Peer {
            s,
            buf: BytesMut::new(),
            next: 1,
        };
        let cn = protocol::nonce();
        p.send(&Message::Hello {
            magic: protocol::MAGIC,
            version: protocol::VERSION,
            client_nonce: cn,
            purpose: Purpose::Client,
        })?;
        let Some(Message::Challenge { server_nonce, .. }) = p.recv() else {
            return Err(std::io::Error::other("no challenge"));
        };
        p.send(&Message::Auth {
            client_proof: protocol::proof(SECRET.as_bytes(), "client", &server_nonce, &cn),
        })?;
        match p.recv() {
            Some(Message::Welcome { .. }) => Ok(p),
            other => Err(std::io::Error::other(format!("{other:?}"))),
        }
    }

    fn send(&mut self, m: &Message) -> std::io::Result<()> {
        self.s.write_all(&protocol::encode_frame(m))
    }

    fn recv(&mut self) -> Option<Message> {
        loop {
            if let Ok(Some(m)) = protocol::decode_frame(&mut self.buf, 64 << 20) {
                return Some(m);
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn call(&mut self, body: Request) -> Option<Response> {
        let id = self.next;
        self.next += 1;
        self.send(&Message::Request { id, body }).ok()?;
        match self.recv()? {
            Message::Response { id: got, body } if got == id => Some(body),
            _ => None,
        }
    }

    fn put(&mut self, key: &str, body: &str) -> Option<u64> {
        let w = WireWrite {
            key: key.into(),
            body: Some(body.as_bytes().to_vec()),
            precondition: WirePrecondition::None,
        };
        match self.call(Request::Write { writes: vec![w] })? {
            Response::Committed { lsn, .. } => Some(lsn),
            _ => None,
        }
    }

    fn repl(&mut self) -> Option<WireReplStatus> {
        match self.call(Request::ReplStatus)? {
            Response::ReplStatus(s) => Some(s),
            _ => None,
        }
    }

    fn hash(&mut self) -> Option<(u64, u64, String)> {
        match self.call(Request::ContentHash)? {
            Response::ContentHash { lsn, records, hash } => Some((lsn, records, hash)),
            _ => None,
        }
    }
}

/// The text of a node's `/metrics` (admin listener), over plain HTTP/1.0.
fn scrape_metrics(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn status(addr: SocketAddr) -> Option<WireReplStatus> {
    Peer::connect(addr).ok()?.repl()
}

/// Waits until the replica has applied everything the primary has and both hash alike.
fn wait_converged(primary: SocketAddr, replica: SocketAddr, limit: Duration) -> (u64, u64, String) {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        if let (Ok(mut p), Ok(mut r)) = (Peer::connect(primary), Peer::connect(replica)) {
            if let (Some(a), Some(b)) = (p.hash(), r.hash()) {
                if a == b {
                    return a;
                }
                last = Some((a, b));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("replica did not converge: {last:?}");
}

/// A writer thread: overwrites `keys` keys round robin with increasing sequence numbers,
/// waiting `pace` after each; returns the count of acknowledged writes and the newest
/// acknowledged LSN.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    last_lsn: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(primary: SocketAddr, keys: u64, body_len: usize, pace: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let last_lsn = Arc::new(AtomicU64::new(0));
        let (s, a, l) = (stop.clone(), acked.clone(), last_lsn.clone());
        let handle = std::thread::spawn(move || {
            let pad = "x".repeat(body_len);
            let mut peer = None;
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                if peer.is_none() {
                    peer = Peer::connect(primary).ok();
                    if peer.is_none() {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
                let p = peer.as_mut().unwrap();
                match p.put(
                    &format!("load/k{}", i % keys),
                    &format!("{{\"seq\":{i},\"pad\":\"{pad}\"}}"),
                ) {
                    Some(lsn) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        l.store(lsn, Ordering::Relaxed);
                        i += 1;
                        std::thread::sleep(pace);
                    }
                    None => peer = None,
                }
            }
        });
        Load {
            stop,
            acked,
            last_lsn,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.acked.load(Ordering::Relaxed)
    }
}

/// Watches a replica's applied LSN and records whether it ever went backwards.
struct Monotonic {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<u64>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Monotonic {
    fn start(replica: SocketAddr) -> Monotonic {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(st) = status(replica) {
                    v.lock().unwrap().push(st.applied_lsn);
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        Monotonic {
            stop,
            seen,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        let v = self.seen.lock().unwrap().clone();
        v
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn scrape(node: &Node) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", &format!("{}/metrics", node.admin_url())])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(_) => String::new(),
    }
}

#[test]
fn replica_kill9_mid_stream_resumes_without_snapshot_and_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = start(tmp.path(), "primary", 0, None, "", "");
    let paddr = primary.storage.unwrap();
    let rport = free_port();
    let replica = start(tmp.path(), "replica", rport, Some(paddr), "", "");
    let raddr = replica.storage.unwrap();

    let load = Load::start(paddr, 500, 100, Duration::ZERO);
    let mono = Monotonic::start(raddr);
    std::thread::sleep(Duration::from_millis(1500));
    let before = status(raddr).unwrap().applied_lsn;
    assert!(before > 0, "the replica applies while writes continue");

    // kill -9 mid-stream, writes continue, then restart.
    let replica = replica.restart_after_kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let after = status(raddr).unwrap().applied_lsn;
    assert!(
        after >= before,
        "applied LSN went back across a restart: {before} -> {after}"
    );
    let acked = load.stop();
    let (lsn, records, hash) = wait_converged(paddr, raddr, Duration::from_secs(30));
    let seen = mono.finish();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "applied LSN went backwards: {seen:?}"
    );
    assert!(acked > 100, "load made progress: {acked}");
    assert!(records > 0);
    eprintln!("converged at LSN {lsn}: {records} records, {hash}; {acked} writes acknowledged");

    // Resumed from its own position: no snapshot was ever needed.
    let m = scrape(&primary);
    assert_eq!(
        metric(&m, "strata_replication_snapshots_sent_total"),
        0.0,
        "{m}"
    );
    assert!(
        metric(&m, "strata_replication_entries_shipped_total") > 0.0,
        "{m}"
    );
    let rm = scrape(&replica);
    assert_eq!(
        metric(&rm, "strata_replication_snapshots_installed_total"),
        0.0
    );

    // A replica refuses writes and names the primary.
    let mut r = Peer::connect(raddr).unwrap();
    let w = WireWrite {
        key: "c/x".into(),
        body: Some(b"{}".to_vec()),
        precondition: WirePrecondition::None,
    };
    match r.call(Request::Write { writes: vec![w] }) {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, protocol::ErrorKind::ReadOnly);
            assert!(e.message.contains(&paddr.to_string()), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
}

fn primary_lsn(addr: SocketAddr) -> u64 {
    status(addr).map_or(0, |s| s.applied_lsn)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn replica_cut_off_past_retention_heals_by_snapshot_while_writes_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = start(tmp.path(), "primary", 0, None, "log_retention = 200", "");
    let paddr = primary.storage.unwrap();
    let proxy = FaultProxy::start(paddr, 0);
    let replica = start(tmp.path(), "replica", 0, Some(proxy.addr), "", "");
    let raddr = replica.storage.unwrap();
    // Paced: a replica reconnecting after the torn frame below (50–75 ms of backoff)
    // must still find its position in a 200-entry log. Unpaced, one writer commits
    // thousands of entries a second now, and that reconnect needed a snapshot too.
    let load = Load::start(paddr, 300, 200, Duration::from_millis(1));
    let mono = Monotonic::start(raddr);
    wait_for("replica to apply", Duration::from_secs(20), || {
        primary_lsn(raddr) > 50
    });

    // A frame torn in the middle: the replica reconnects and resumes from the log.
    proxy.set(Fault::CutAfter(7));
    std::thread::sleep(Duration::from_millis(500));
    wait_for(
        "replica to resume after a torn frame",
        Duration::from_secs(20),
        || primary_lsn(raddr) + 150 > load.last_lsn.load(Ordering::Relaxed),
    );
    assert_eq!(
        metric(&scrape(&primary), "strata_replication_snapshots_sent_total"),
        0.0
    );

    // Partition until the primary's log no longer holds the replica's position.
    proxy.set(Fault::Drop);
    let cut_at = primary_lsn(raddr);
    wait_for(
        "the primary to write past its retention",
        Duration::from_secs(60),
        || load.last_lsn.load(Ordering::Relaxed) > cut_at + 1000,
    );
    proxy.set(Fault::Pass);
    wait_for(
        "replica to heal by snapshot",
        Duration::from_secs(60),
        || {
            metric(
                &scrape(&replica),
                "strata_replication_snapshots_installed_total",
            ) >= 1.0
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let acked = load.stop();
    let (lsn, records, _) = wait_converged(paddr, raddr, Duration::from_secs(30));
    let seen = mono.finish();
    eprintln!("healed and converged at LSN {lsn} with {records} records after {acked} writes");
    assert!(metric(&scrape(&primary), "strata_replication_snapshots_sent_total") >= 1.0);
    assert!(
        primary
            .logs()
            .contains("its position is no longer in the log"),
        "{}",
        primary.logs()
    );
    // Applied LSN only goes back through a snapshot install, and then to the snapshot's
    // tag, which is above where it was cut.
    for w in seen.windows(2) {
        assert!(
            w[1] >= w[0] || w[1] == 0 || w[1] > cut_at,
            "applied went back: {w:?}"
        );
    }
}

#[test]
fn late_replica_with_a_large_data_set_bootstraps_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = start(tmp.path(), "primary", 0, None, "log_retention = 50", "");
    let paddr = primary.storage.unwrap();
    // ~6 MB in 6k records (several snapshot pages), written in batches of 200; the load
    // then rolls the 50-entry log many times over while the snapshot is in flight.
    let mut p = Peer::connect(paddr).unwrap();
    let body = format!("{{\"pad\":\"{}\"}}", "y".repeat(1000));
    for b in 0..30 {
        let writes = (0..200)
            .map(|i| WireWrite {
                key: format!("big/r{b:03}-{i:03}"),
                body: Some(body.as_bytes().to_vec()),
                precondition: WirePrecondition::None,
            })
            .collect();
        assert!(matches!(
            p.call(Request::Write { writes }),
            Some(Response::Committed { .. })
        ));
    }
    let load = Load::start(paddr, 1000, 100, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let replica = start(tmp.path(), "replica", 0, Some(paddr), "", "");
    let raddr = replica.storage.unwrap();
    wait_for(
        "the late replica to be ready",
        Duration::from_secs(60),
        || status(raddr).is_some_and(|s| s.ready && s.applied_lsn > 100),
    );
    let took = started.elapsed();
    let acked = load.stop();
    let (lsn, records, _) = wait_converged(paddr, raddr, Duration::from_secs(60));
    assert!(records >= 6_000);
    let cuts = metric(
        &scrape(&primary),
        "strata_replication_cut_too_far_behind_total",
    );
    eprintln!(
        "late replica: ~{} MB bootstrapped in {took:?} ({:.1} MB/s) under {acked} concurrent writes ({cuts} cuts); converged at LSN {lsn}",
        records / 1000,
        records as f64 / 1000.0 / took.as_secs_f64()
    );
    assert!(
        metric(
            &scrape(&replica),
            "strata_replication_snapshots_installed_total"
        ) >= 1.0
    );
}

fn app_config(dir: &Path, primary: SocketAddr, replicas: &[SocketAddr]) -> String {
    let list = replicas
        .iter()
        .map(|r| format!("\"{r}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[node]\nname = \"app\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\ncluster_secret = \"{SECRET}\"\n\n[app]\nlisten = \"127.0.0.1:0\"\nstorage = {{ primary = \"{primary}\", replicas = [{list}], max_lag = \"30s\", token_wait = \"50ms\", request_timeout = \"5s\" }}\n",
        dir.join("data").display()
    )
}

async fn app_status(app: &Node) -> serde_json::Value {
    common::client()
        .get(format!("{}/admin/status", app.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_with_a_replica_held_back() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = start(tmp.path(), "primary", 0, None, "", "");
    let paddr = primary.storage.unwrap();
    let proxy = FaultProxy::start(paddr, 0);
    let replica = start(tmp.path(), "replica", 0, Some(proxy.addr), "", "");
    let raddr = replica.storage.unwrap();
    let adir = tmp.path().join("app");
    std::fs::create_dir_all(&adir).unwrap();
    let app = Node::start_with(&adir, &app_config(&adir, paddr, &[raddr]));
    let url = app.url();
    let c = common::client();

    let r = c
        .put(format!("{url}/api/v1/ryw/k"))
        .json(&serde_json::json!({"v": 0}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let lsn: u64 = r.headers()["strata-lsn"].to_str().unwrap().parse().unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with(&format!("strata-lsn=1.{lsn};")),
        "{cookie}"
    );

    // Caught up: plain reads are served by the replica.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = app_status(&app).await;
        let rep = &st["components"]["app"]["storage"]["replicas"][0];
        if rep["ready"] == true && rep["applied_lsn"].as_u64() >= Some(lsn) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica never became usable: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..20 {
        let r = c.get(format!("{url}/api/v1/ryw/k")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let st = app_status(&app).await;
    assert!(
        st["components"]["app"]["storage"]["reads"]["replica"].as_u64() >= Some(20),
        "{st}"
    );

    // Hold the replica back: nothing flows to it any more.
    proxy.set(Fault::Blackhole);
    let mut stale_plain = 0;
    for i in 1..=30u64 {
        let r = c
            .put(format!("{url}/api/v1/ryw/k"))
            .json(&serde_json::json!({"v": i}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let lsn = r.headers()["strata-lsn"].to_str().unwrap().to_owned();
        let cookie = r.headers()["set-cookie"].to_str().unwrap();
        let token = cookie.split(';').next().unwrap().to_owned();
        // Token in the cookie, then in the header: never older than the write.
        let v: serde_json::Value = c
            .get(format!("{url}/api/v1/ryw/k"))
            .header("cookie", &token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["v"], i,
            "read with cookie token {token} returned older data"
        );
        let v: serde_json::Value = c
            .get(format!("{url}/api/v1/ryw/k"))
            .header("strata-lsn", &lsn)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["v"], i,
            "read with header token {lsn} returned older data"
        );
        let v: serde_json::Value = c
            .get(format!("{url}/api/v1/ryw/k?consistency=strong"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["v"], i);
        // A listing with the token too.
        let l: serde_json::Value = c
            .get(format!("{url}/api/v1/ryw"))
            .header("cookie", &token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(l["items"][0]["value"]["v"], i, "{l}");
        let v: serde_json::Value = c
            .get(format!("{url}/api/v1/ryw/k"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["v"] != i {
            stale_plain += 1;
        }
    }
    let st = app_status(&app).await;
    let reads = &st["components"]["app"]["storage"]["reads"];
    assert!(reads["token_fallbacks"].as_u64() > Some(0), "{st}");
    eprintln!(
        "held-back replica: {stale_plain} of 30 token-less reads were stale (allowed); {reads}"
    );
    proxy.set(Fault::Pass);
    wait_converged(paddr, raddr, Duration::from_secs(30));
}

fn strata_cmd(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(common::bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn failover_promote_replica_then_old_primary_rejoins_and_discards_its_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let pport = free_port();
    let sync = "sync_replicas = 1\nsync_timeout = \"500ms\"\nsync_policy = \"fail\"\n";
    let primary = start(tmp.path(), "primary", pport, None, "", sync);
    let paddr = primary.storage.unwrap();
    let proxy = FaultProxy::start(paddr, 0);
    let replica = start(tmp.path(), "replica", 0, Some(proxy.addr), "", "");
    let raddr = replica.storage.unwrap();

    // Acknowledged writes, each to its own key, so a lost one is a missing key.
    let mut p = Peer::connect(paddr).unwrap();
    let mut acked = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let key = format!("acked/w{}", acked.len());
        if p.put(&key, "{\"ok\":true}").is_some() {
            acked.push(key);
        }
    }
    assert!(acked.len() > 20, "{} writes acknowledged", acked.len());

    // The replica is cut off; writes are durable on the primary alone and NOT
    // acknowledged (sync_policy = fail): the primary's diverging tail.
    proxy.set(Fault::Blackhole);
    let mut unacked = 0;
    for i in 0..3 {
        let w = WireWrite {
            key: format!("tail/t{i}"),
            body: Some(b"{}".to_vec()),
            precondition: WirePrecondition::None,
        };
        match p.call(Request::Write { writes: vec![w] }) {
            Some(Response::Error(e)) => {
                assert!(e.message.contains("only 0 of 1 replicas"), "{}", e.message);
                unacked += 1;
            }
            other => panic!("a write acknowledged without its replica: {other:?}"),
        }
    }
    let old_last = status(paddr).unwrap().applied_lsn;
    let mut primary = primary;
    primary.kill9();
    drop(proxy);

    // Promote the replica through the CLI and the admin API.
    let admin = replica.admin.to_string();
    let (ok, out) = strata_cmd(&["promote", "--admin", &admin]);
    assert!(ok, "{out}");
    // Epochs are `term << 32 | node tag`: term 1, stamped by this replica.
    let epoch2 = 1u64 << 32 | u64::from(strata::storage::replication::state::node_tag("replica"));
    assert!(out.contains(&format!("\"epoch\": {epoch2}")), "{out}");
    let (ok, out) = strata_cmd(&["promote", "--admin", &admin]);
    assert!(!ok && out.contains("already the primary"), "{out}");
    let st = status(raddr).unwrap();
    assert_eq!((st.role.as_str(), st.epoch), ("primary", epoch2));
    let promoted_at = st.applied_lsn;
    assert!(
        old_last > promoted_at,
        "the old primary has a tail: {old_last} > {promoted_at}"
    );

    // The new primary takes writes.
    let mut r = Peer::connect(raddr).unwrap();
    for i in 0..50 {
        assert!(r.put(&format!("after/a{i}"), "{}").is_some());
    }

    // The old primary comes back as a replica of the new one.
    let dir = tmp.path().join("primary");
    let text = storage_config(&dir, "primary", pport, Some(raddr), "");
    let old = Node::start_with(&dir, &text);
    let (lsn, records, _) = wait_converged(raddr, paddr, Duration::from_secs(30));
    let logs = replica.logs();
    assert!(
        logs.contains("its log diverged from this primary's history"),
        "{logs}"
    );
    let mut o = Peer::connect(paddr).unwrap();
    for i in 0..3 {
        match o.call(Request::Get {
            key: format!("tail/t{i}"),
        }) {
            Some(Response::Record(None)) => {}
            other => panic!("diverged write tail/t{i} survived: {other:?}"),
        }
    }
    let st = o.repl().unwrap();
    assert_eq!((st.role.as_str(), st.epoch), ("replica", epoch2));
    // Every acknowledged write survived the failover.
    let mut lost = 0;
    for key in &acked {
        match r.call(Request::Get { key: key.clone() }) {
            Some(Response::Record(Some(_))) => {}
            _ => lost += 1,
        }
    }
    eprintln!(
        "failover: {} acknowledged writes, {lost} lost (sync_replicas = 1); {unacked} unacknowledged \
         entries ({}..={old_last}) discarded from the old primary; converged at LSN {lsn}, {records} records",
        acked.len(),
        promoted_at + 1
    );
    assert_eq!(lost, 0);
    drop(old);
}

#[test]
fn sync_policy_degrade_acknowledges_without_replicas_and_counts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sync = "sync_replicas = 1\nsync_timeout = \"100ms\"\nsync_policy = \"degrade\"\n";
    let primary = start(tmp.path(), "primary", 0, None, "", sync);
    let mut p = Peer::connect(primary.storage.unwrap()).unwrap();
    for i in 0..3 {
        assert!(p.put(&format!("d/k{i}"), "{}").is_some());
    }
    let m = scrape(&primary);
    assert_eq!(
        metric(&m, "strata_replication_sync_degraded_total"),
        3.0,
        "{m}"
    );
    assert!(primary.logs().contains("sync_policy = degrade"));
}

/// One connection of a fake primary: the server half of the handshake with the real
/// secret, then the Subscribe.
fn fake_accept(s: &mut TcpStream, buf: &mut BytesMut) -> Option<(u64, Vec<(u64, u64)>)> {
    let mut p = Peer {
        s: s.try_clone().ok()?,
        buf: BytesMut::new(),
        next: 0,
    };
    let Some(Message::Hello { client_nonce, .. }) = p.recv() else {
        return None;
    };
    let sn = protocol::nonce();
    p.send(&Message::Challenge {
        version: protocol::VERSION,
        server_nonce: sn,
        server_proof: protocol::proof(SECRET.as_bytes(), "server", &client_nonce, &sn),
    })
    .ok()?;
    let Some(Message::Auth { .. }) = p.recv() else {
        return None;
    };
    p.send(&Message::Welcome {
        node: "fake".into(),
        epoch: 1,
        role: "primary".into(),
    })
    .ok()?;
    let Some(Message::Subscribe {
        history,
        applied_lsn,
        ..
    }) = p.recv()
    else {
        return None;
    };
    *buf = p.buf;
    Some((applied_lsn, history))
}

fn entry(lsn: u64, epoch: u64, key: &str) -> strata::storage::engine::LogEntry {
    use strata::storage::engine::{LogEntry, LoggedWrite};
    LogEntry {
        lsn,
        epoch,
        timestamp_ms: 1_700_000_000_000 + lsn,
        writes: vec![LoggedWrite {
            key: key.into(),
            value: Some(strata::storage::Record {
                body: bytes::Bytes::from(format!("{{\"lsn\":{lsn}}}")),
                lsn,
                created_ms: 1,
                updated_ms: 2,
            }),
        }],
    }
}

#[test]
fn garbage_and_out_of_order_entries_from_a_fake_primary_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = listener.local_addr().unwrap();
    let script = std::thread::spawn(move || {
        let mut results = Vec::new();
        for n in 0..6 {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = BytesMut::new();
            let Some((applied, _)) = fake_accept(&mut s, &mut buf) else {
                results.push(format!("conn {n}: no subscribe"));
                continue;
            };
            results.push(format!("conn {n}: applied {applied}"));
            let send = |s: &mut TcpStream, m: &Message| {
                let _ = s.write_all(&protocol::encode_frame(m));
            };
            let start = Message::StreamStart {
                history: vec![(1, 0)],
                from_lsn: applied + 1,
            };
            let entries = |es: Vec<strata::storage::engine::LogEntry>| Message::Entries {
                primary_lsn: 100,
                entries: es.iter().map(|e| e.encode()).collect(),
            };
            match n {
                // A valid stream: three entries.
                0 => {
                    send(&mut s, &start);
                    send(
                        &mut s,
                        &entries((1..=3).map(|l| entry(l, 1, &format!("f/k{l}"))).collect()),
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                // Out of order: skips LSNs.
                1 => {
                    send(&mut s, &start);
                    send(&mut s, &entries(vec![entry(applied + 5, 1, "f/gap")]));
                }
                // An older/unknown epoch for that LSN.
                2 => {
                    send(&mut s, &start);
                    send(&mut s, &entries(vec![entry(applied + 1, 7, "f/epoch")]));
                }
                // A corrupt entry (checksum).
                3 => {
                    send(&mut s, &start);
                    let mut bytes = entry(applied + 1, 1, "f/crc").encode();
                    let last = bytes.len() - 1;
                    bytes[last] ^= 0x20;
                    send(
                        &mut s,
                        &Message::Entries {
                            primary_lsn: 100,
                            entries: vec![bytes],
                        },
                    );
                }
                // Garbage bytes in a frame.
                4 => {
                    send(&mut s, &start);
                    let _ = s.write_all(&[0, 0, 0, 6, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff]);
                }
                // Entries before any stream start, then a snapshot chunk outside a snapshot.
                _ => {
                    send(&mut s, &entries(vec![entry(applied + 1, 1, "f/early")]));
                }
            }
            // Wait for the replica to hang up.
            let mut sink = [0u8; 1024];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
        results
    });
    let replica = start(tmp.path(), "replica", 0, Some(fake), "", "");
    let raddr = replica.storage.unwrap();
    let results = script.join().unwrap();
    eprintln!("{results:?}");
    let mut r = Peer::connect(raddr).unwrap();
    let st = r.repl().unwrap();
    assert_eq!(
        st.applied_lsn, 3,
        "only the valid entries were applied: {results:?}"
    );
    let (_, records, _) = r.hash().unwrap();
    assert_eq!(records, 3);
    for bad in ["f/gap", "f/epoch", "f/crc", "f/early"] {
        assert!(matches!(
            r.call(Request::Get { key: bad.into() }),
            Some(Response::Record(None))
        ));
    }
    let logs = replica.logs();
    for why in [
        "out of order",
        "epoch 7",
        "checksum mismatch",
        "malformed frame",
        "entries before the stream started",
    ] {
        assert!(logs.contains(why), "no log names {why:?}:\n{logs}");
    }
    assert!(
        results
            .iter()
            .all(|r| r.contains("applied 3") || r.contains("applied 0")),
        "{results:?}"
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Figures for BENCHMARKS-replication.md (run with --release --ignored --nocapture).
#[test]
#[ignore]
fn bench_replication() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = start(
        tmp.path(),
        "primary",
        0,
        None,
        "log_retention = 1000000",
        "",
    );
    let paddr = primary.storage.unwrap();
    let rport = free_port();
    let replica = start(tmp.path(), "replica", rport, Some(paddr), "", "");
    let raddr = replica.storage.unwrap();

    // 1. Lag under a steady load: 2000 writes at ~500/s; time from the primary's ack to
    // the replica answering a read gated on that write's LSN.
    let mut p = Peer::connect(paddr).unwrap();
    let mut r = Peer::connect(raddr).unwrap();
    let mut lags = Vec::new();
    for i in 0..2000u64 {
        let t0 = Instant::now();
        let lsn = p.put(&format!("lag/k{}", i % 100), "{\"x\":1}").unwrap();
        let acked = Instant::now();
        let resp = r.call(Request::AtLeast {
            min_epoch: 0,
            min_lsn: lsn,
            wait_ms: 5000,
            read: Box::new(Request::Get {
                key: "lag/k0".into(),
            }),
        });
        assert!(matches!(resp, Some(Response::Record(_))), "{resp:?}");
        lags.push(acked.elapsed());
        let spent = t0.elapsed();
        if spent < Duration::from_millis(2) {
            std::thread::sleep(Duration::from_millis(2) - spent);
        }
    }
    lags.sort();
    eprintln!(
        "BENCH lag: n={} p50={:?} p99={:?} max={:?}",
        lags.len(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1]
    );

    // 2. Catch-up: stop the replica, write 100k entries (8 writers), restart, time it.
    let mut replica = replica;
    replica.kill9();
    let before = Peer::connect(paddr).unwrap().repl().unwrap().applied_lsn;
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut p = Peer::connect(paddr).unwrap();
                for i in 0..12_500u64 {
                    p.put(
                        &format!("cu/t{t}-{}", i % 1000),
                        "{\"pad\":\"0123456789012345678901234567890123456789\"}",
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let target = Peer::connect(paddr).unwrap().repl().unwrap().applied_lsn;
    let started = Instant::now();
    let replica = Node::spawn(&replica.dir, &replica.config);
    // Two figures: (a) from the restart of the process (start, reconnect and apply), and
    // (b) the apply rate proper: between the first poll that sees the applied LSN past
    // its pre-kill value and the first that sees it at the target, counting only the
    // entries applied in between. One connection polled every 2 ms, so polling costs
    // the replica little and the timestamps are within ~2 ms of the changes.
    let mut poll = None;
    let mut first_moved: Option<(Instant, u64)> = None;
    let deadline = started + Duration::from_secs(120);
    let done = loop {
        assert!(Instant::now() < deadline, "timed out waiting for catch-up");
        if poll.is_none() {
            poll = Peer::connect(raddr).ok();
        }
        match poll.as_mut().and_then(|p| p.repl()) {
            Some(s) => {
                let now = Instant::now();
                if s.applied_lsn > before && first_moved.is_none() {
                    first_moved = Some((now, s.applied_lsn));
                }
                if s.applied_lsn >= target {
                    break now;
                }
            }
            None => poll = None,
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = done - started;
    eprintln!(
        "BENCH catch-up (a) from process restart: {} entries in {took:?} = {:.0} entries/s",
        target - before,
        (target - before) as f64 / took.as_secs_f64()
    );
    let (moved_at, moved_lsn) = first_moved.unwrap();
    let streaming = done - moved_at;
    eprintln!(
        "BENCH catch-up (b) while streaming: {} entries in {streaming:?} = {:.0} entries/s \
         (first {} entries applied {:?} after the restart)",
        target - moved_lsn,
        (target - moved_lsn) as f64 / streaming.as_secs_f64().max(1e-9),
        moved_lsn - before,
        moved_at - started
    );
    // Where the replica's time went: how many applies (one flush + fsync each) it made
    // and how long those flushes took in all.
    let metrics = scrape_metrics(replica.admin);
    let metric = |name: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(f64::NAN)
    };
    eprintln!(
        "BENCH catch-up: the replica made {} flushes (applies) taking {:.3}s in all",
        metric("strata_storage_flush_seconds_count"),
        metric("strata_storage_flush_seconds_sum"),
    );
    drop(replica);

    // 3. Snapshot bootstrap: a fresh replica of a primary whose log no longer covers
    // the start: ~64 MB in 64k records.
    let tmp2 = tempfile::tempdir().unwrap();
    let primary2 = start(tmp2.path(), "p2", 0, None, "log_retention = 10", "");
    let p2 = primary2.storage.unwrap();
    let mut p = Peer::connect(p2).unwrap();
    let body = format!("{{\"pad\":\"{}\"}}", "z".repeat(1000));
    for b in 0..320 {
        let writes = (0..200)
            .map(|i| WireWrite {
                key: format!("snap/r{b:04}-{i:03}"),
                body: Some(body.as_bytes().to_vec()),
                precondition: WirePrecondition::None,
            })
            .collect();
        assert!(matches!(
            p.call(Request::Write { writes }),
            Some(Response::Committed { .. })
        ));
    }
    let started = Instant::now();
    let r2 = start(tmp2.path(), "r2", 0, Some(p2), "", "");
    let r2addr = r2.storage.unwrap();
    wait_for("snapshot bootstrap", Duration::from_secs(300), || {
        status(r2addr).is_some_and(|s| s.ready && s.applied_lsn >= 320)
    });
    let took = started.elapsed();
    let mb = 64_000.0 * 1030.0 / 1e6;
    eprintln!(
        "BENCH snapshot: {mb:.0} MB in {took:?} = {:.1} MB/s (including process start)",
        mb / took.as_secs_f64()
    );
}

/// Read throughput through one app with 0, 1, 2 replicas (run with --release --ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_read_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = start(tmp.path(), "primary", 0, None, "", "");
    let paddr = primary.storage.unwrap();
    let r1 = start(tmp.path(), "r1", 0, Some(paddr), "", "");
    let r2 = start(tmp.path(), "r2", 0, Some(paddr), "", "");
    let reps = [r1.storage.unwrap(), r2.storage.unwrap()];
    {
        let mut p = Peer::connect(paddr).unwrap();
        for i in 0..1000 {
            p.put(&format!("rt/k{i}"), "{\"v\":1}").unwrap();
        }
    }
    for r in reps {
        wait_converged(paddr, r, Duration::from_secs(30));
    }
    for n in 0..=2 {
        let dir = tmp.path().join(format!("app{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let app = Node::start_with(&dir, &app_config(&dir, paddr, &reps[..n]));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let url = app.url();
        let count = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(5);
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let (url, count) = (url.clone(), count.clone());
                tokio::spawn(async move {
                    let c = common::client();
                    let mut i = t;
                    while Instant::now() < deadline {
                        let r = c
                            .get(format!("{url}/api/v1/rt/k{}", i % 1000))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 200);
                        let _ = r.bytes().await;
                        count.fetch_add(1, Ordering::Relaxed);
                        i += 7;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let st = app_status(&app).await;
        eprintln!(
            "BENCH reads with {n} replicas: {:.0} req/s; {}",
            count.load(Ordering::Relaxed) as f64 / 5.0,
            st["components"]["app"]["storage"]["reads"]
        );
    }
}

/// A storage-only node (no `[app]`) protects its admin endpoints with `[node]
/// admin_tokens`: no token or a wrong one is refused and the replica stays a replica;
/// `strata promote --token` with the right one promotes it.
#[test]
fn storage_only_admin_endpoints_need_the_node_admin_token() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = start(tmp.path(), "primary", 0, None, "", "");
    let paddr = primary.storage.unwrap();
    let tokens = "[[node.admin_tokens]]\nname = \"ops\"\nscopes = [\"admin\"]\nvalue = \"ops-token-0123456789\"\n";
    let replica = start(tmp.path(), "replica", 0, Some(paddr), tokens, "");
    let raddr = replica.storage.unwrap();
    let admin = replica.admin.to_string();
    for path in ["/admin/status", "/metrics"] {
        let r = common::raw(
            replica.admin,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        );
        assert_eq!(common::raw_status(&r), Some(401), "{path}: {r}");
    }
    let (ok, out) = strata_cmd(&["promote", "--admin", &admin]);
    assert!(!ok, "{out}");
    let (ok, out) = strata_cmd(&[
        "promote",
        "--admin",
        &admin,
        "--token",
        "wrong-token-0123456",
    ]);
    assert!(!ok, "{out}");
    let st = status(raddr).unwrap();
    assert_eq!(st.role, "replica", "refused promotions change nothing");
    let r = common::raw(
        replica.admin,
        b"GET /admin/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ops-token-0123456789\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(common::raw_status(&r), Some(200), "{r}");
    let (ok, out) = strata_cmd(&[
        "promote",
        "--admin",
        &admin,
        "--token",
        "ops-token-0123456789",
    ]);
    assert!(ok, "{out}");
    assert_eq!(status(raddr).unwrap().role, "primary");
}
