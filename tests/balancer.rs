//! The balancer role through the real binary: one balancer node in front of app nodes (each
//! a real `strata` process with its own storage) and, where a test needs a misbehaving
//! backend, a tiny server inside the test.
//!
//! To see which backend answered, every app stores `who/me = {"name": <its name>}` in its
//! own storage; a GET of `/api/v1/who/me` through the balancer names the backend.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tls::{pem_der, tls_connect};
use common::{client, raw, raw_status, read_response, Node};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port that was free a moment ago (bind :0, read it, let go).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// An app node on a fixed port, named so responses reveal it.
struct App {
    node: Node,
    name: String,
    addr: SocketAddr,
    _tmp: tempfile::TempDir,
}

impl App {
    async fn start(name: &str) -> App {
        let tmp = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let text = format!(
            "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\n[app]\nlisten = \"127.0.0.1:{port}\"\n",
            tmp.path().join("data").display()
        );
        let node = Node::start_with(tmp.path(), &text);
        let addr = node.app.expect("app address");
        let r = client()
            .put(format!("http://{addr}/api/v1/who/me"))
            .json(&json!({ "name": name }))
            .send()
            .await
            .expect("PUT who/me");
        assert!(r.status().is_success(), "{}", r.status());
        App {
            node,
            name: name.to_owned(),
            addr,
            _tmp: tmp,
        }
    }

    /// kill -9, then start again on the same port with the same data.
    fn restart(&mut self) {
        self.node.kill9();
        self.node = Node::spawn(&self.node.dir.clone(), &self.node.config.clone());
    }
}

/// A balancer node.
struct Lb {
    node: Node,
    addr: SocketAddr,
    _tmp: tempfile::TempDir,
}

fn lb_config(dir: &Path, backends: &[(SocketAddr, u32)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[node]\nname = \"lb\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\n\
         [balancer]\nlisten = \"127.0.0.1:0\"\nbackends = [{}]\n{extra}\n",
        dir.join("data").display(),
        list.join(", ")
    )
}

/// Health settings fast enough for tests.
const FAST_HEALTH: &str = "[balancer.health]\ninterval = \"200ms\"\ntimeout = \"300ms\"\nrise = 2\nfall = 2\nejection_time = \"2s\"\n";

impl Lb {
    async fn start(backends: &[(SocketAddr, u32)], extra: &str) -> Lb {
        let tmp = tempfile::tempdir().expect("tempdir");
        let node = Node::start_with(tmp.path(), &lb_config(tmp.path(), backends, extra));
        let status = node.status().await;
        let addr = status["components"]["balancer"]["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listen address in {status}"));
        Lb {
            node,
            addr,
            _tmp: tmp,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn status(&self) -> Value {
        self.node.status().await["components"]["balancer"].clone()
    }

    /// Rewrites the config and reloads through the admin API.
    async fn reconfigure(&self, backends: &[(SocketAddr, u32)], extra: &str) -> Value {
        let text = lb_config(self._tmp.path(), backends, extra);
        std::fs::write(&self.node.config, text).expect("write config");
        let r = client()
            .post(format!("{}/admin/reload", self.node.admin_url()))
            .send()
            .await
            .expect("reload");
        let report: Value = r.json().await.expect("report");
        assert_eq!(report["applied"], json!(true), "{report}");
        report
    }

    /// Waits until the backend at `addr` is in state `state`.
    async fn wait_state(&self, addr: SocketAddr, state: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status().await;
            let found = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["address"] == json!(addr.to_string()))
                .map(|b| b["state"].clone());
            if found == Some(json!(state)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} never became {state}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// GET who/me through the balancer: the answering backend's name.
async fn who(c: &reqwest::Client, lb: &Lb, headers: &[(&str, &str)]) -> String {
    let mut req = c.get(lb.url("/api/v1/who/me"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("GET who/me");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    v["name"].as_str().expect("name").to_owned()
}

fn tally(names: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n).or_default() += 1;
    }
    m
}

/// What the load saw: successes, failures, and which backends answered.
type Results = Arc<Mutex<(usize, Vec<String>, HashMap<String, usize>)>>;

/// Steady GET load from `workers` clients until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    /// Bumped by `reset_seen`: a request counts in `seen` only if it started after the
    /// latest reset, so one still in flight from before never does, however slow.
    generation: Arc<AtomicU64>,
    results: Results,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let results: Results = Arc::new(Mutex::new((0, Vec::new(), HashMap::new())));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, results, url) = (stop.clone(), results.clone(), url.clone());
                let generation = generation.clone();
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(Ordering::Relaxed) {
                        let started_in = generation.load(Ordering::SeqCst);
                        let outcome = match c.get(&url).send().await {
                            Ok(r) if r.status() == 200 => match r.json::<Value>().await {
                                Ok(v) => Ok(v["name"].as_str().unwrap_or("?").to_owned()),
                                Err(e) => Err(format!("body: {e}")),
                            },
                            Ok(r) => {
                                let s = r.status();
                                Err(format!("{s}: {}", r.text().await.unwrap_or_default()))
                            }
                            Err(e) => Err(format!("request: {e}")),
                        };
                        {
                            let mut g = results.lock().unwrap();
                            match outcome {
                                Ok(name) => {
                                    g.0 += 1;
                                    if started_in == generation.load(Ordering::SeqCst) {
                                        *g.2.entry(name).or_default() += 1;
                                    }
                                }
                                Err(e) => g.1.push(e),
                            }
                        }
                        // Bounded rate: a few hundred requests a second in all.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            generation,
            results,
            tasks,
        }
    }

    fn ok(&self) -> usize {
        self.results.lock().unwrap().0
    }

    fn seen(&self) -> HashMap<String, usize> {
        self.results.lock().unwrap().2.clone()
    }

    fn reset_seen(&self) {
        let mut g = self.results.lock().unwrap();
        self.generation.fetch_add(1, Ordering::SeqCst);
        g.2.clear();
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        let g = self.results.lock().unwrap();
        (g.0, g.1.clone())
    }
}

async fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_follows_each_algorithm() {
    let apps = [
        App::start("app1").await,
        App::start("app2").await,
        App::start("app3").await,
    ];
    let weighted: Vec<(SocketAddr, u32)> = apps
        .iter()
        .zip([1, 2, 3])
        .map(|(a, w)| (a.addr, w))
        .collect();
    let equal: Vec<(SocketAddr, u32)> = apps.iter().map(|a| (a.addr, 1)).collect();
    let lb = Lb::start(&weighted, "algorithm = \"round_robin\"").await;
    let c = client();

    // Weighted round robin is exact: 1:2:3.
    let mut names = Vec::new();
    for _ in 0..120 {
        names.push(who(&c, &lb, &[]).await);
    }
    let t = tally(names);
    assert_eq!(
        (t["app1"], t["app2"], t["app3"]),
        (20, 40, 60),
        "round robin {t:?}"
    );

    // p2c (the default) honours weights too: app3 at weight 8 of 10 takes most.
    let heavy = vec![(apps[0].addr, 1), (apps[1].addr, 1), (apps[2].addr, 8)];
    lb.reconfigure(&heavy, "").await;
    let mut names = Vec::new();
    for _ in 0..200 {
        names.push(who(&c, &lb, &[]).await);
    }
    let t = tally(names);
    assert!(t.get("app3").copied().unwrap_or(0) > 120, "p2c {t:?}");
    assert!(t.len() == 3, "every backend gets some: {t:?}");
    assert_eq!(lb.status().await["algorithm"], json!("p2c"));

    // Least connections with sequential requests spreads over everyone.
    lb.reconfigure(&equal, "algorithm = \"least_connections\"")
        .await;
    let mut names = Vec::new();
    for _ in 0..90 {
        names.push(who(&c, &lb, &[]).await);
    }
    let t = tally(names);
    assert_eq!(t.len(), 3, "least connections {t:?}");

    // Sticky hashing on a header: a user stays on one backend; users spread.
    lb.reconfigure(
        &equal,
        "algorithm = \"hash\"\nhash_key = { header = \"X-User\" }",
    )
    .await;
    let mut homes = HashMap::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        let first = who(&c, &lb, &[("x-user", &user)]).await;
        for _ in 0..3 {
            assert_eq!(who(&c, &lb, &[("x-user", &user)]).await, first, "{user}");
        }
        homes.insert(user, first);
    }
    assert_eq!(tally(homes.values().cloned()).len(), 3, "{homes:?}");

    // Adding a backend with hashing moves only the keys it takes over; here we remove
    // one and check the others' users did not move.
    lb.reconfigure(
        &equal[..2],
        "algorithm = \"hash\"\nhash_key = { header = \"X-User\" }",
    )
    .await;
    for (user, home) in &homes {
        let now = who(&c, &lb, &[("x-user", user)]).await;
        if home != "app3" {
            assert_eq!(&now, home, "{user} moved although its backend stayed");
        } else {
            assert_ne!(now, "app3");
        }
    }

    // And on a cookie.
    lb.reconfigure(
        &equal,
        "algorithm = \"hash\"\nhash_key = { cookie = \"session\" }",
    )
    .await;
    let first = who(&c, &lb, &[("cookie", "theme=dark; session=abc123")]).await;
    for _ in 0..5 {
        assert_eq!(
            who(&c, &lb, &[("cookie", "session=abc123; other=1")]).await,
            first
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_retried_marked_down_and_returns() {
    killed_backend("", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_with_pipelining_is_retried_marked_down_and_returns() {
    // More clients, so that requests arrive together and share pipelines.
    killed_backend("pipeline = 8\n", 16).await;
}

/// Kills one of three app servers under steady GET load through a balancer whose
/// `[balancer]` section gets `extra`: no client sees an error, health marks it down, and
/// once restarted it serves again. `clients` GET in a loop.
async fn killed_backend(extra: &str, clients: usize) {
    let mut apps = [
        App::start("app1").await,
        App::start("app2").await,
        App::start("app3").await,
    ];
    let backends: Vec<(SocketAddr, u32)> = apps.iter().map(|a| (a.addr, 1)).collect();
    let lb = Lb::start(&backends, &format!("{extra}{FAST_HEALTH}")).await;
    let load = Load::start(lb.url("/api/v1/who/me"), clients);
    wait_until("warm-up", Duration::from_secs(10), || load.ok() > 100).await;

    apps[1].node.kill9();
    let killed_at = load.ok();
    lb.wait_state(apps[1].addr, "down", Duration::from_secs(5))
        .await;
    wait_until("traffic after the kill", Duration::from_secs(10), || {
        load.ok() > killed_at + 200
    })
    .await;

    apps[1].restart();
    lb.wait_state(apps[1].addr, "healthy", Duration::from_secs(10))
        .await;
    load.reset_seen();
    let name = apps[1].name.clone();
    wait_until(
        "the restarted backend serving",
        Duration::from_secs(10),
        || load.seen().get(&name).copied().unwrap_or(0) > 10,
    )
    .await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 400, "{ok}");
    let metrics = lb.node.metrics_text().await;
    for needle in [
        "strata_balancer_backend_requests_total{backend=",
        "strata_balancer_backend_errors_total{backend=",
        "strata_balancer_backend_retries_total{backend=",
        "strata_balancer_backend_response_seconds_bucket",
        "strata_balancer_backend_healthy{backend=",
        "strata_balancer_backend_open_connections{backend=",
        "strata_balancer_backend_ejections_total",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

/// The balancer's wake-up nap count.
async fn naps(lb: &Lb) -> f64 {
    lb.node.metric("strata_balancer_wake_naps_total").await
}

/// `clients` clients each GET `/api/v1/who/me` `each` times, concurrently, on keep-alive
/// connections; every answer must be app1's.
async fn burst(lb: &Lb, clients: usize, each: usize) {
    let one = |_| async {
        let c = client();
        for _ in 0..each {
            assert_eq!(who(&c, lb, &[]).await, "app1");
        }
    };
    futures_util::future::join_all((0..clients).map(one)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_coalescing_naps_only_under_load_and_follows_reloads() {
    let app = App::start("app1").await;
    let backends = [(app.addr, 1)];
    let on = "pipeline = 8\ncoalesce_wakeups = \"500us\"\ncoalesce_min_in_flight = 4\n";
    let lb = Lb::start(&backends, on).await;

    // One client at a time never has 4 requests in flight: no naps, and every answer.
    burst(&lb, 1, 50).await;
    assert_eq!(naps(&lb).await, 0.0, "napped with one request in flight");

    // Many clients at once do, and are all answered.
    burst(&lb, 64, 20).await;
    let napped = naps(&lb).await;
    assert!(napped > 0.0, "no naps under concurrent load");

    // Switched off by a reload: the same load, no more naps.
    lb.reconfigure(&backends, "pipeline = 8\ncoalesce_wakeups = \"0s\"\n")
        .await;
    burst(&lb, 64, 20).await;
    assert_eq!(
        naps(&lb).await,
        napped,
        "napped after coalescing was turned off"
    );
}

/// A backend that accepts connections and never answers.
async fn hanging_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_backend_times_out_with_504_and_others_serve() {
    let app = App::start("app1").await;
    let (hang, _task) = hanging_backend().await;
    let extra = format!(
        "algorithm = \"round_robin\"\nresponse_timeout = \"300ms\"\n{}consecutive_failures = 2\n",
        FAST_HEALTH.replace("interval = \"200ms\"", "interval = \"5s\"")
    );
    let lb = Lb::start(&[(hang, 1), (app.addr, 1)], &extra).await;
    let c = client();
    let mut timeouts = 0;
    let mut ok = 0;
    for _ in 0..12 {
        let started = Instant::now();
        let r = c.get(lb.url("/api/v1/who/me")).send().await.unwrap();
        match r.status().as_u16() {
            200 => {
                // Under the 300 ms response timeout: it never waited on the hanging
                // backend (a retry after that timeout would take longer).
                assert!(started.elapsed() < Duration::from_millis(300));
                ok += 1;
            }
            504 => {
                let p: Value = r.json().await.unwrap();
                let detail = p["detail"].as_str().unwrap();
                assert!(
                    detail.contains("timeout") && detail.contains(&hang.to_string()),
                    "{p}"
                );
                timeouts += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(
        (1..=2).contains(&timeouts),
        "passive ejection stops the 504s: {timeouts}"
    );
    assert_eq!(ok + timeouts, 12);
    let s = lb.status().await;
    let hung = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == json!(hang.to_string()))
        .unwrap();
    assert_eq!(hung["state"], json!("ejected"), "{s}");
    assert_eq!(hung["ejections"], json!(1), "{s}");

    // With only the hanging backend left, every request gets a 504 within the timeout,
    // and the balancer stays responsive (active probes also time out: it goes down).
    lb.reconfigure(
        &[(hang, 1)],
        &format!("response_timeout = \"300ms\"\n{FAST_HEALTH}consecutive_failures = 0\n"),
    )
    .await;
    let r = c.get(lb.url("/api/v1/who/me")).send().await.unwrap();
    assert!(matches!(r.status().as_u16(), 504 | 503), "{}", r.status());
    lb.wait_state(hang, "down", Duration::from_secs(5)).await;
    let r = c.get(lb.url("/api/v1/who/me")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let p: Value = r.json().await.unwrap();
    assert!(
        p["detail"].as_str().unwrap().contains("no healthy backend"),
        "{p}"
    );
    let ready = c
        .get(format!("{}/readyz", lb.node.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready without a healthy backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_clients_do_not_disturb_others() {
    let app = App::start("app1").await;
    let extra = "idle_timeout = \"1s\"\n[balancer.http]\nheader_read_timeout = \"1s\"\nmax_header_bytes = \"16KiB\"\n";
    let lb = Lb::start(&[(app.addr, 1)], extra).await;
    let addr = lb.addr;

    // Slowloris: headers trickle in and never finish; the connection is closed.
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let _ = s.write_all(b"GET /api/v1/who/me HTTP/1.1\r\nHost: x\r\n");
        for _ in 0..20 {
            if s.write_all(b"X-Slow: 1\r\n").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        started.elapsed()
    });

    // Oversize headers: refused with 431.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let r = raw(addr, big.as_bytes(), Duration::from_secs(3));
    assert_eq!(raw_status(&r), Some(431), "{r}");

    // Malformed request line.
    let r = raw(addr, b"BLAH\x01 / HTTP/9\r\n\r\n", Duration::from_secs(3));
    assert_eq!(raw_status(&r), Some(400), "{r}");

    // A client that vanishes mid-body.
    {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(
            b"PUT /api/v1/x/vanish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"a\":\"",
        )
        .unwrap();
        s.write_all(&[b'z'; 1000]).unwrap();
    }

    // A client that stalls mid-body gets 408 after the idle limit; the backend is not
    // blamed for it.
    let stalled = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            b"PUT /api/v1/x/stall HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a\":",
        )
        .unwrap();
        let started = Instant::now();
        let mut out = vec![0u8; 4096];
        let n = s.read(&mut out).unwrap_or(0);
        (
            String::from_utf8_lossy(&out[..n]).into_owned(),
            started.elapsed(),
        )
    });

    // Meanwhile everyone else is served (each on a fresh connection: this listener closes
    // idle ones after 1 s, about as long as the waits below).
    let c = common::unpooled_client();
    for _ in 0..20 {
        assert_eq!(who(&c, &lb, &[]).await, "app1");
    }
    let elapsed = slow.join().unwrap();
    assert!(
        elapsed < Duration::from_millis(2500),
        "slowloris cut after {elapsed:?}"
    );
    let (answer, waited) = stalled.join().unwrap();
    assert_eq!(raw_status(&answer), Some(408), "{answer}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    let s = lb.status().await;
    assert_eq!(s["backends"][0]["errors"], json!(0), "{s}");
    assert_eq!(s["backends"][0]["state"], json!("healthy"), "{s}");

    // A body streams through (and Expect: 100-continue is answered).
    let body = format!("{{\"blob\":\"{}\"}}", "b".repeat(200_000));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "PUT /api/v1/x/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 100"), "{line}");
    reader.read_line(&mut line).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 201"), "{status}");
    let got: Value = c
        .get(lb.url("/api/v1/x/big"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["blob"].as_str().unwrap().len(), 200_000);
}

/// A keep-alive connection that goes quiet for longer than the balancer keeps its request
/// state (a second) is served again when it speaks, and is closed at its idle timeout
/// (the head timeout), counted from its last answer, not at the end of that second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_keep_alive_connection_is_served_again_then_closed_at_its_idle_timeout() {
    let app = App::start("app1").await;
    let extra = "[balancer.http]\nheader_read_timeout = \"4s\"\n";
    let lb = Lb::start(&[(app.addr, 1)], extra).await;
    let addr = lb.addr;
    let closed_after = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = Vec::new();
        for quiet in [0.0, 1.5, 2.5] {
            std::thread::sleep(Duration::from_secs_f64(quiet));
            s.write_all(b"GET /api/v1/who/me HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let (head, body) = read_response(&mut s, &mut buf, false);
            assert_eq!(
                raw_status(&head),
                Some(200),
                "after {quiet} s quiet: {head}"
            );
            assert!(body.contains("app1"), "after {quiet} s quiet: {body}");
        }
        let since = Instant::now();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("the balancer closes the connection");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        since.elapsed()
    })
    .await
    .expect("client");
    // ~4 s: not at the busy window's end (~1 s), nor 4 s after it (~5 s, a deadline
    // restarted when the connection let its request state go).
    assert!(
        closed_after >= Duration::from_millis(3500) && closed_after < Duration::from_millis(4800),
        "closed {closed_after:?} after the last answer, expected ~4 s"
    );
    // The balancer serves others as before.
    let c = client();
    assert_eq!(who(&c, &lb, &[]).await, "app1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_backends_under_load() {
    let apps = [
        App::start("app1").await,
        App::start("app2").await,
        App::start("app3").await,
    ];
    let (a1, a2, a3) = (apps[0].addr, apps[1].addr, apps[2].addr);
    let lb = Lb::start(&[(a1, 1), (a2, 1)], FAST_HEALTH).await;
    let load = Load::start(lb.url("/api/v1/who/me"), 4);
    wait_until("warm-up", Duration::from_secs(10), || load.ok() > 100).await;
    assert!(!load.seen().contains_key("app3"));

    // Add app3, drop app1.
    lb.reconfigure(&[(a2, 1), (a3, 1)], FAST_HEALTH).await;
    // Requests that started on the old pool finish there; count only newer ones.
    tokio::time::sleep(Duration::from_millis(200)).await;
    load.reset_seen();
    wait_until("app3 in rotation", Duration::from_secs(10), || {
        load.seen().get("app3").copied().unwrap_or(0) > 20
    })
    .await;
    assert!(!load.seen().contains_key("app1"), "{:?}", load.seen());

    // Back: app1 returns, app2 leaves; weights change too.
    lb.reconfigure(&[(a1, 3), (a3, 1)], FAST_HEALTH).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    load.reset_seen();
    wait_until("app1 back", Duration::from_secs(10), || {
        load.seen().get("app1").copied().unwrap_or(0) > 60
    })
    .await;
    let seen = load.seen();
    assert!(!seen.contains_key("app2"), "{seen:?}");
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 150, "{ok}");
    let s = lb.status().await;
    assert_eq!(s["backends"].as_array().unwrap().len(), 2, "{s}");
}

/// A request whose first bytes arrived before a reload and the rest after it is routed by
/// the new config: the balancer takes the pool when the request is whole, not when its
/// connection started waiting for it (a request after a reload once went to a removed
/// backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_completed_after_a_reload_uses_the_new_backends() {
    use std::io::{Read, Write};
    let apps = [App::start("app1").await, App::start("app2").await];
    let lb = Lb::start(&[(apps[0].addr, 1)], "").await;
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // One whole request and the start of the next, in one write.
    s.write_all(b"GET /api/v1/who/me HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/wh")
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("app1") {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    // app1 leaves, app2 comes; then the second request completes.
    lb.reconfigure(&[(apps[1].addr, 1)], "").await;
    s.write_all(b"o/me HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains("app2"), "routed by the old pool: {rest}");
}

/// A backend that answers plain requests with 200 and echoes bytes after an upgrade.
async fn upgrade_echo_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !text.contains("upgrade: websocket") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        )
                        .await;
                    return;
                }
                let via_ok = text.contains("via: 1.1 strata") && text.contains("x-forwarded-for:");
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                if !via_ok {
                    let _ = s.write_all(b"missing forwarding headers").await;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_spliced_through() {
    let echo = upgrade_echo_backend().await;
    let lb = Lb::start(&[(echo, 1)], "").await;
    let mut s = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
            .await
            .expect("101 in time")
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"second frame", &[0u8, 1, 2, 255]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(back, msg);
    }
    // A plain request through the same balancer still works.
    let r = client().get(lb.url("/plain")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
}

/// A backend answering with a chunked body and a trailer, after a delay.
async fn trailer_backend(delay: Duration) -> SocketAddr {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("x-checksum", "abc".parse().unwrap());
                    let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
                        Ok(Frame::data(bytes::Bytes::from_static(b"part1-"))),
                        Ok(Frame::data(bytes::Bytes::from_static(b"part2"))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
                    let resp = http::Response::builder()
                        .header("trailer", "x-checksum")
                        .body(body)
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_and_sigterm_drains_in_flight_requests() {
    let backend = trailer_backend(Duration::from_millis(800)).await;
    let mut lb = Lb::start(&[(backend, 1)], "").await;
    let addr = lb.addr;
    let req = b"GET /t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n";
    let first = std::thread::spawn(move || raw(addr, req, Duration::from_secs(5)));
    let r = first.join().unwrap();
    assert_eq!(raw_status(&r), Some(200), "{r}");
    assert!(r.contains("part1-") && r.contains("part2"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("x-checksum: abc"),
        "trailer lost: {r}"
    );

    // SIGTERM while a request is in flight: it completes, then the node exits cleanly.
    let in_flight = std::thread::spawn(move || raw(addr, req, Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(200));
    lb.node.signal("TERM");
    let r = in_flight.join().unwrap();
    assert_eq!(raw_status(&r), Some(200), "drained: {r}");
    assert_eq!(lb.node.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn bad_balancer_configs_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.toml");
    for (text, needle) in [
        ("[balancer]\n", "balancer.backends"),
        (
            "[balancer]\nbackends = [\"127.0.0.1:1\"]\nalgorithm = \"hash\"\n",
            "hash_key",
        ),
        (
            "[balancer]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
            "listed twice",
        ),
        (
            "[balancer]\nbackends = [{ address = \"127.0.0.1:1\", weight = 0 }]\n",
            "weight",
        ),
        ("[balancer]\nbackends = [\"localhost\"]\n", "ip:port"),
        (
            "[balancer]\nbackends = [\"127.0.0.1:1\"]\npipeline = 0\n",
            "balancer.pipeline",
        ),
        (
            "[balancer]\nbackends = [\"127.0.0.1:1\"]\ncoalesce_wakeups = \"5ms\"\n",
            "balancer.coalesce_wakeups",
        ),
        (
            "[balancer]\nbackends = [\"127.0.0.1:1\"]\ncoalesce_min_in_flight = 0\n",
            "balancer.coalesce_min_in_flight",
        ),
        (
            "[balancer]\nbackends = [\"127.0.0.1:1\"]\nalgoritm = \"p2c\"\n",
            "did you mean `algorithm`",
        ),
        (
            "[balancer]\nbackends = [\"127.0.0.1:1\"]\ntls = { cert = \"/nope.pem\", key = \"/nope.key\" }\n",
            "/nope.pem",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(common::bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {text}");
        assert!(err.contains(needle), "{text} → {err}");
    }
}

/// Makes a self-signed certificate for `name` with the openssl CLI; None when it is absent.
fn self_signed(
    dir: &Path,
    name: &str,
    file: &str,
) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let cert = dir.join(format!("{file}.pem"));
    let key = dir.join(format!("{file}.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .ok()?;
    out.status.success().then_some((cert, key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_with_sni_alpn_and_live_certificate_reload() {
    let certs = tempfile::tempdir().unwrap();
    let Some((a_cert, a_key)) = self_signed(certs.path(), "a.test", "a") else {
        eprintln!("openssl not available; skipping the TLS test");
        return;
    };
    let (b_cert, b_key) = self_signed(certs.path(), "b.test", "b").unwrap();
    let app = App::start("app1").await;
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", sni = [{{ names = [\"b.test\"], cert = \"{}\", key = \"{}\" }}] }}",
        a_cert.display(),
        a_key.display(),
        b_cert.display(),
        b_key.display()
    );
    let lb = Lb::start(&[(app.addr, 1)], &tls).await;
    assert_eq!(lb.status().await["tls"], json!(true));

    // HTTP/2 by ALPN, default certificate.
    let (stream, cert, proto) = tls_connect(lb.addr, None, "a.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(proto.as_deref(), Some(&b"h2"[..]));
    assert_eq!(cert, pem_der(&a_cert));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://a.test/api/v1/who/me")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["via"], "1.1 strata");
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("app1"));

    // HTTP/1.1 by ALPN, the SNI certificate.
    let (stream, cert, proto) = tls_connect(lb.addr, None, "b.test", &[b"http/1.1"]).await;
    assert_eq!(proto.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(cert, pem_der(&b_cert));
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/api/v1/who/me")
        .header("host", "b.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);

    // A renewed certificate applies on reload to new connections.
    let renewed = tempfile::tempdir().unwrap();
    let (new_cert, new_key) = self_signed(renewed.path(), "a.test", "a").unwrap();
    std::fs::copy(&new_cert, &a_cert).unwrap();
    std::fs::copy(&new_key, &a_key).unwrap();
    lb.reconfigure(&[(app.addr, 1)], &tls).await;
    let (_, cert, _) = tls_connect(lb.addr, None, "a.test", &[b"h2"]).await;
    assert_eq!(cert, pem_der(&new_cert));
    assert_ne!(cert, pem_der(&b_cert));

    // A plain-text client on the TLS port gets nowhere, and the port keeps serving.
    let r = raw(
        lb.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(raw_status(&r), None, "{r}");
    let (_, cert, _) = tls_connect(lb.addr, None, "b.test", &[b"h2"]).await;
    assert_eq!(cert, pem_der(&b_cert));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_and_request_ids() {
    let app = App::start("app1").await;
    let tmp = tempfile::tempdir().unwrap();
    let text = lb_config(tmp.path(), &[(app.addr, 1)], "")
        .replace("shutdown_grace", "access_log = true\nshutdown_grace");
    let node = Node::start_with(tmp.path(), &text);
    let status = node.status().await;
    let addr = status["components"]["balancer"]["listen"].as_str().unwrap();
    let c = client();
    let r = c
        .get(format!("http://{addr}/api/v1/who/me"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    let r = c
        .get(format!("http://{addr}/api/v1/who/me"))
        .send()
        .await
        .unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(!made.is_empty());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(node.logs().contains("trace-me-42") && node.logs().contains(&made)) {
        assert!(Instant::now() < deadline, "{}", node.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(node.logs().contains("/api/v1/who/me"));
}

/// A backend that answers `/hint` with a 103 Early Hints, then waits for `go` before the
/// final 200; any other path gets a 200 at once (health probes).
async fn early_hints_backend(go: Arc<tokio::sync::Notify>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let go = go.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 2048];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let hinted = buf.starts_with(b"GET /hint ");
                        buf.drain(..end + 4);
                        if hinted {
                            let hint =
                                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n";
                            if s.write_all(hint).await.is_err() {
                                return;
                            }
                            go.notified().await;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_are_relayed_as_they_arrive() {
    use std::io::{Read, Write};
    let go = Arc::new(tokio::sync::Notify::new());
    let backend = early_hints_backend(go.clone()).await;
    let lb = Lb::start(&[(backend, 1)], "").await;
    let addr = lb.addr;
    let read_until = |s: &mut std::net::TcpStream, buf: &mut Vec<u8>, needle: &[u8]| {
        while !buf.windows(needle.len()).any(|w| w == needle) {
            let mut chunk = [0u8; 2048];
            let n = s.read(&mut chunk).expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /hint HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    // The hint arrives while the backend still holds the final response back.
    read_until(&mut s, &mut buf, b"\r\n\r\n");
    let hint = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(hint.starts_with("http/1.1 103 early hints\r\n"), "{hint}");
    assert!(hint.contains("link: </a.css>; rel=preload"), "{hint}");
    go.notify_one();
    read_until(&mut s, &mut buf, b"final");
    let all = String::from_utf8_lossy(&buf).into_owned();
    assert!(all.contains("HTTP/1.1 200 OK"), "{all}");
    // The connection carries on.
    buf.clear();
    s.write_all(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    read_until(&mut s, &mut buf, b"final");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pipelined_response_holds_up_only_requests_that_joined_right_behind_it() {
    let (_, _, lb) = pipelining_lb("5s").await;
    let url = lb.url("/slow/1");
    let slow = tokio::spawn(async move {
        let r = client().get(url).send().await.unwrap();
        (r.status(), r.text().await.unwrap(), Instant::now())
    });
    // Well after the slow request became first on its connection, which has stopped
    // moving: the next request takes another connection instead of queueing behind it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = client().get(lb.url("/p/later")).send().await.unwrap();
    let later_answered = Instant::now();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "/p/later");
    let (status, body, slow_answered) = slow.await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "/slow/1"));
    assert!(
        later_answered < slow_answered,
        "the later request waited for the slow response"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_behind_a_connection_close_answer_go_elsewhere() {
    let (seen, _, lb) = pipelining_lb("5s").await;
    // Every answer ends its connection, so requests pipelined behind one are never
    // answered there: each goes to a fresh connection, as many times as it takes, and
    // none of that counts as the backend failing.
    let tasks: Vec<_> = (0..16)
        .map(|c| {
            let url = lb.url("");
            tokio::spawn(async move {
                let http = client();
                for i in 0..8 {
                    let path = format!("/close/{c}/{i}");
                    let r = http.get(format!("{url}{path}")).send().await.unwrap();
                    assert_eq!(r.status(), 200, "{path}");
                    assert_eq!(r.text().await.unwrap(), path);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        seen.most_at_once.load(Ordering::SeqCst) > 1,
        "nothing was pipelined"
    );
}

/// Ends a backend's connection the way RFC 9112 §9.6 asks of servers that may have unread
/// pipelined requests (nginx's `lingering_close`): the write side first, then reading
/// and dropping what still comes. Closed at once with requests unread, the connection
/// would be reset, and a reset can erase the end of a response not yet delivered.
async fn lingering_close(mut s: tokio::net::TcpStream) {
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// A balancer with `pipeline = 16` and this response timeout in front of one
/// [`pipelining_backend`] (no passive ejection, health probes rare): what the backend saw,
/// its address, and the balancer.
async fn pipelining_lb(response_timeout: &str) -> (Arc<PipelineSeen>, SocketAddr, Lb) {
    let seen = Arc::new(PipelineSeen::default());
    let backend = pipelining_backend(seen.clone()).await;
    let settings = format!(
        "pipeline = 16\nresponse_timeout = \"{response_timeout}\"\n[balancer.health]\ninterval = \"60s\"\nconsecutive_failures = 0\n"
    );
    let lb = Lb::start(&[(backend, 1)], &settings).await;
    (seen, backend, lb)
}

/// What the pipelining test backend saw.
#[derive(Default)]
struct PipelineSeen {
    /// Most requests found complete in the backend's buffer at once: above 1 means the
    /// balancer pipelined them.
    most_at_once: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
    /// Times a POST came in one read with other requests (it was pipelined).
    posts_batched: AtomicU64,
}

/// An HTTP/1.1 backend that answers pipelined requests in order, each with its own path
/// as the body (`/big/...`: 200 kB; `/chunked/...`: chunked; `/slow/...`: after 800 ms,
/// holding up that connection; `/close/...`: with `Connection: close`, then it closes;
/// `/hang/...`: never, and nothing after it on that connection). Like nginx's `keepalive_requests` it ends connections, with a lingering
/// close: an even-numbered one answers its 7th request with `Connection: close` and
/// closes, dropping whatever was pipelined behind it; an odd-numbered one closes without
/// a word after reading its 5th (unless that is a POST). POST bodies are read and
/// answered.
async fn pipelining_backend(seen: Arc<PipelineSeen>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let id = seen.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut served = 0u64;
                loop {
                    let mut chunk = [0u8; 8192];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    // Parse every complete request buffered now.
                    let mut requests = Vec::new();
                    loop {
                        let mut headers = [httparse::EMPTY_HEADER; 32];
                        let mut req = httparse::Request::new(&mut headers);
                        let Ok(httparse::Status::Complete(head)) = req.parse(&buf) else {
                            break;
                        };
                        let len: usize = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                            .unwrap_or(0);
                        if buf.len() < head + len {
                            break;
                        }
                        let method = req.method.unwrap_or("").to_owned();
                        let path = req.path.unwrap_or("").to_owned();
                        buf.drain(..head + len);
                        requests.push((method, path));
                    }
                    seen.most_at_once
                        .fetch_max(requests.len() as u64, Ordering::SeqCst);
                    if requests.len() > 1 && requests.iter().any(|(m, _)| m == "POST") {
                        seen.posts_batched.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut out = Vec::new();
                    for (method, path) in requests {
                        served += 1;
                        // (Not for a POST: the balancer rightly never resends one that
                        // may have been read, and the test's POST may land here.)
                        if id % 2 == 1 && served == 5 && method != "POST" {
                            let _ = s.write_all(&out).await;
                            return lingering_close(s).await;
                        }
                        if path.starts_with("/hang/") {
                            let _ = s.write_all(&out).await;
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        if path.starts_with("/slow/") {
                            let _ = s.write_all(&out).await;
                            out.clear();
                            tokio::time::sleep(Duration::from_millis(800)).await;
                        }
                        let last = (id % 2 == 0 && served == 7) || path.starts_with("/close/");
                        let conn = if last { "connection: close\r\n" } else { "" };
                        let body = if path.starts_with("/big/") {
                            path.as_bytes().repeat(200_000 / path.len())
                        } else {
                            path.clone().into_bytes()
                        };
                        if path.starts_with("/chunked/") && method != "HEAD" {
                            out.extend_from_slice(
                                format!("HTTP/1.1 200 OK\r\n{conn}transfer-encoding: chunked\r\n\r\n{:x}\r\n", body.len()).as_bytes(),
                            );
                            out.extend_from_slice(&body);
                            out.extend_from_slice(b"\r\n0\r\n\r\n");
                        } else {
                            out.extend_from_slice(
                                format!(
                                    "HTTP/1.1 200 OK\r\n{conn}content-length: {}\r\n\r\n",
                                    body.len()
                                )
                                .as_bytes(),
                            );
                            if method != "HEAD" {
                                out.extend_from_slice(&body);
                            }
                        }
                        if last {
                            let _ = s.write_all(&out).await;
                            return lingering_close(s).await;
                        }
                    }
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_upstream_answers_every_request_with_its_own_response() {
    let (seen, backend, lb) = pipelining_lb("1s").await;
    // 48 clients, each with its own keep-alive connection, 60 requests each; every answer
    // must be the one for its own request, though the backend ends a connection every
    // 5 to 7 requests, half the time dropping pipelined requests without a word.
    let failures = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..48)
        .map(|c| {
            let (url, failures) = (lb.url(""), failures.clone());
            tokio::spawn(async move {
                let http = client();
                for i in 0..60 {
                    let kind = match (c + i) % 10 {
                        0 => "big",
                        1 => "chunked",
                        _ => "p",
                    };
                    let path = format!("/{kind}/{c}/{i}");
                    let head = i % 13 == 0;
                    let r = if head {
                        http.head(format!("{url}{path}")).send().await
                    } else {
                        http.get(format!("{url}{path}")).send().await
                    };
                    let outcome = match r {
                        Ok(r) if r.status() == 200 => {
                            let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                            let want = if head {
                                Vec::new()
                            } else if kind == "big" {
                                path.as_bytes().repeat(200_000 / path.len())
                            } else {
                                path.clone().into_bytes()
                            };
                            (body == want).then_some(()).ok_or(format!(
                                "{path}: a body of {} bytes that is not its own",
                                body.len()
                            ))
                        }
                        Ok(r) => Err(format!(
                            "{path}: {} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        )),
                        Err(e) => Err(format!("{path}: {e}")),
                    };
                    if let Err(e) = outcome {
                        failures.lock().unwrap().push(e);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        seen.most_at_once.load(Ordering::SeqCst) > 1,
        "the backend never saw two requests at once: nothing was pipelined"
    );
    // Every one of those requests left in a batch (some twice: resent after a drop), and
    // some batches held more than one.
    let name = |part: &str| {
        format!("strata_balancer_backend_pipeline_batch_requests_{part}{{backend=\"{backend}\"}}")
    };
    let batches = lb.node.metric(&name("count")).await;
    let batched = lb.node.metric(&name("sum")).await;
    assert!(
        batched >= (48 * 60) as f64 && batches < batched,
        "{batches} batches of {batched} requests in all"
    );
    assert!(
        seen.connections.load(Ordering::SeqCst) > 10,
        "the backend ended connections"
    );

    // Requests with a body are never pipelined: POSTs among GETs from many clients at
    // once each reach the backend alone on their connection, and are answered.
    let tasks: Vec<_> = (0..16)
        .map(|c| {
            let url = lb.url("");
            tokio::spawn(async move {
                let http = client();
                for i in 0..10 {
                    for post in [false, true, false] {
                        let path = format!("/p/mixed/{c}/{i}/{post}");
                        let r = if post {
                            http.post(format!("{url}{path}")).body("0123456789")
                        } else {
                            http.get(format!("{url}{path}"))
                        };
                        let r = r.send().await.unwrap();
                        assert_eq!(r.status(), 200, "{path}");
                        assert_eq!(r.text().await.unwrap(), path);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        seen.posts_batched.load(Ordering::SeqCst),
        0,
        "a POST was pipelined"
    );

    // A response that never comes: that request gets a 504 in time, and the requests
    // after it are answered.
    let c = client();
    let started = Instant::now();
    let r = c.get(lb.url("/hang/1")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    for i in 0..20 {
        let r = c
            .get(lb.url(&format!("/p/after/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), format!("/p/after/{i}"));
    }
}
