//! The operator's tools through the real binary: every shipped config passes `strata check`;
//! `strata fleet` brings up stage 6 (edge, balancer, three apps, a primary, two replicas)
//! from the shipped configs; a request crosses every role; 100 reloads under steady load
//! fail no request; a broken reload changes nothing and shows in /admin/status; the file
//! watcher reloads by itself; `strata status` and `strata reload` read the fleet.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every `*.toml` under `config/`, including ones added later.
fn shipped_configs(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            shipped_configs(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

#[test]
fn every_shipped_config_passes_check() {
    let mut files = Vec::new();
    shipped_configs(&common::shipped_config(""), &mut files);
    assert!(
        files.len() >= 8,
        "expected the stage configs, found {files:?}"
    );
    let passes = |f: &Path, secret| {
        let out = common::check_config(f, secret);
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for f in &files {
        passes(f, Some(common::EXAMPLE_SECRET));
    }
    // The one-process and balancer examples start without a cluster secret.
    for f in [
        "stage1.toml",
        "stage3/balancer.toml",
        "stage3/app1.toml",
        "stage3/app2.toml",
        "stage3/app3.toml",
    ] {
        passes(&common::shipped_config(f), None);
    }
    // A broken copy is refused, naming file and line.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    let text = std::fs::read_to_string(common::shipped_config("stage6/balancer.toml")).unwrap();
    std::fs::write(&bad, text.replace("algorithm", "algoritm")).unwrap();
    let out = common::check_config(&bad, None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:"));
}

/// A port offset that puts every stage 6 port (7600–9660) on free ports below the
/// kernel's ephemeral range, so other tests' port-0 listeners cannot take them.
fn free_offset() -> u16 {
    const PORTS: [u16; 16] = [
        7600, 7601, 7602, 8080, 8600, 8601, 8602, 8603, 9630, 9631, 9632, 9641, 9642, 9643, 9650,
        9660,
    ];
    for _ in 0..200 {
        let off = 10_000 + (rand_u16() % 220) * 100;
        let free = PORTS
            .iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p + off)).is_ok());
        if free {
            return off;
        }
    }
    panic!("no free port offset");
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (t ^ std::process::id().rotate_left(7)) as u16
}

/// A running `strata fleet`.
struct Fleet {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    offset: u16,
    dir: PathBuf,
}

impl Fleet {
    fn start(dir: &Path, cwd: &Path, offset: u16) -> Fleet {
        let mut child = Command::new(common::bin())
            .arg("fleet")
            .arg(dir)
            .args(["--port-offset", &offset.to_string(), "--data-root"])
            .arg(cwd.join("data"))
            .args(["--ready-timeout", "90s"])
            .current_dir(cwd)
            .env_remove("STRATA_CLUSTER_SECRET")
            .env("STRATA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx2.send(l);
            }
        });
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if std::env::var_os("STRATA_TEST_LOG").is_some() {
                    eprintln!("[fleet] {l}");
                }
                let _ = tx.send(format!("stderr: {l}"));
            }
        });
        Fleet {
            child,
            lines: rx,
            seen: Vec::new(),
            offset,
            dir: dir.to_path_buf(),
        }
    }

    /// Reads output until a line contains `what`; returns it.
    fn wait_line(&mut self, what: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        if let Some(l) = self.seen.iter().find(|l| l.contains(what)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(what) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "fleet never printed {what:?}; output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn port(&self, base: u16) -> u16 {
        base + self.offset
    }

    fn url(&self, base: u16) -> String {
        format!("http://127.0.0.1:{}", self.port(base))
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(common::bin())
            .args(args)
            .arg(&self.dir)
            .args(["--port-offset", &self.offset.to_string()])
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
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // SIGTERM lets the fleet stop its children (they are in their own process group).
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal("TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
    }
}

const EDGE: u16 = 8080;
const LB_ADMIN: u16 = 9650;
const EDGE_ADMIN: u16 = 9660;
const PRIMARY_ADMIN: u16 = 9630;
const REPLICA_ADMINS: [u16; 2] = [9631, 9632];
const APP_ADMINS: [u16; 3] = [9641, 9642, 9643];

async fn status(c: &reqwest::Client, fleet: &Fleet, admin: u16) -> Value {
    c.get(format!("{}/admin/status", fleet.url(admin)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn reload(c: &reqwest::Client, fleet: &Fleet, admin: u16) -> (u16, Value) {
    let r = c
        .post(format!("{}/admin/reload", fleet.url(admin)))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_stage6_and_reloads_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    // The shipped stage 6 files, copied so this test can edit them for reloads.
    let dir = tmp.path().join("stage6");
    copy_dir(&common::shipped_config("stage6"), &dir);
    // Static files for the apps (./public of the fleet's working directory).
    std::fs::create_dir_all(tmp.path().join("public/assets")).unwrap();
    std::fs::write(
        tmp.path().join("public/assets/app.css"),
        "body { margin: 0 }\n",
    )
    .unwrap();
    let mut fleet = Fleet::start(&dir, tmp.path(), free_offset());
    fleet.wait_line("generated one for this run", Duration::from_secs(30));
    fleet.wait_line("all 8 nodes ready", Duration::from_secs(90));
    let edge_line = fleet.wait_line("strata fleet: edge-1 ready", Duration::from_secs(1));
    assert!(
        edge_line.contains(&format!("edge http://127.0.0.1:{}", fleet.port(EDGE))),
        "{edge_line}"
    );
    for name in ["storage-primary", "storage-replica-2", "app-3", "lb-1"] {
        fleet.wait_line(
            &format!("strata fleet: {name} ready"),
            Duration::from_secs(1),
        );
    }
    // Children's logs carry their node name.
    fleet.wait_line(
        "storage-replica-1 | strata: storage listening",
        Duration::from_secs(1),
    );

    let c = common::client();
    let edge = fleet.url(EDGE);

    // A write: edge (passes it) → balancer → an app → the primary.
    let put = c
        .put(format!("{edge}/api/v1/users/alice"))
        .header("content-type", "application/json")
        .body(r#"{"name":"Alice"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let cs = put.headers()["cache-status"].to_str().unwrap().to_owned();
    assert!(cs.contains("fwd=method"), "{cs}");
    assert!(
        put.headers().contains_key("via"),
        "the balancer marks what it forwarded"
    );
    let lsn: u64 = put.headers()["strata-lsn"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Both replicas hold it.
    for admin in REPLICA_ADMINS {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = status(&c, &fleet, admin).await;
            let applied = s["components"]["storage"]["replication"]["applied_lsn"]
                .as_u64()
                .unwrap();
            if applied >= lsn {
                assert_eq!(s["components"]["storage"]["mode"], "replica");
                break;
            }
            assert!(Instant::now() < deadline, "replica at {applied}: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let p = status(&c, &fleet, PRIMARY_ADMIN).await;
    assert!(p["components"]["storage"]["last_lsn"].as_u64().unwrap() >= lsn);

    // Reads: an edge miss goes through the balancer to an app, which reads a replica.
    let replica_reads = |statuses: &[Value]| -> u64 {
        statuses
            .iter()
            .map(|s| {
                s["components"]["app"]["storage"]["reads"]["replica"]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    };
    let mut before = Vec::new();
    for a in APP_ADMINS {
        before.push(status(&c, &fleet, a).await);
    }
    let get = c
        .get(format!("{edge}/api/v1/users/alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    let cs = get.headers()["cache-status"].to_str().unwrap().to_owned();
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert_eq!(get.text().await.unwrap(), r#"{"name":"Alice"}"#);
    let mut after = Vec::new();
    for a in APP_ADMINS {
        after.push(status(&c, &fleet, a).await);
    }
    assert_eq!(
        replica_reads(&after),
        replica_reads(&before) + 1,
        "the read was served by a replica"
    );
    // Record reads through the balancer: each app reads storage once, then answers from
    // its record cache (kept coherent by the primary's change feed).
    let lb_url = fleet.url(8600);
    let mut app_hits = 0;
    for _ in 0..12 {
        let r = c
            .get(format!("{lb_url}/api/v1/users/alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if r.headers()["cache-status"] == "strata; hit" {
            app_hits += 1;
        }
        assert_eq!(r.text().await.unwrap(), r#"{"name":"Alice"}"#);
    }
    assert!(
        app_hits >= 1,
        "no app cache hit in 12 reads through the balancer"
    );
    // A cacheable static file: the second request is an edge hit.
    let first = c
        .get(format!("{edge}/assets/app.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("stored"));
    let second = c
        .get(format!("{edge}/assets/app.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(second.headers()["cache-status"], "strata; hit");
    assert_eq!(second.text().await.unwrap(), "body { margin: 0 }\n");
    let lb = status(&c, &fleet, LB_ADMIN).await;
    let served: u64 = lb["components"]["balancer"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_u64().unwrap())
        .sum();
    assert!(served >= 3, "{lb}");

    // `strata status` over the fleet directory: every node, ready.
    let (ok, table) = fleet.cli(&["status"]);
    assert!(ok, "{table}");
    for name in [
        "edge-1",
        "lb-1",
        "app-1",
        "app-2",
        "app-3",
        "storage-primary",
        "storage-replica-1",
        "storage-replica-2",
    ] {
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(row.contains(" yes "), "{row}");
    }
    assert!(table.contains("apps 3/3"), "{table}");
    assert!(table.contains("replicas 2/2"), "{table}");

    // Steady load through the edge while 100 reloads change backends, cache sizes,
    // replicas and replication settings.
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let (c, edge, failures, done, stop) = (
            c.clone(),
            edge.clone(),
            failures.clone(),
            done.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut last = None;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let r = if n % 3 == 0 {
                    let body = format!(r#"{{"w":{w},"n":{n}}}"#);
                    last = Some(body.clone());
                    c.put(format!("{edge}/api/v1/load/w{w}"))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                } else if n % 3 == 1 {
                    c.get(format!("{edge}/api/v1/users/alice")).send().await
                } else {
                    c.get(format!("{edge}/assets/app.css")).send().await
                };
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                    }
                    Ok(r) => {
                        eprintln!("failed request: {} {:?}", r.status(), r.text().await);
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("failed request: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            last
        }));
    }
    let lb_file = dir.join("balancer.toml");
    let edge_file = dir.join("edge.toml");
    let primary_file = dir.join("primary.toml");
    let all_backends = r#"backends = ["127.0.0.1:8601", "127.0.0.1:8602", "127.0.0.1:8603"]"#;
    let two_backends =
        r#"backends = ["127.0.0.1:8601", { address = "127.0.0.1:8602", weight = 2 }]"#;
    let both_replicas = r#"replicas = ["127.0.0.1:7601", "127.0.0.1:7602"]"#;
    let one_replica = r#"replicas = ["127.0.0.1:7602"]"#;
    let mut versions = std::collections::HashSet::new();
    for i in 0..100 {
        let odd = i % 2 == 1;
        let (bf, bt) = if odd {
            (all_backends, two_backends)
        } else {
            (two_backends, all_backends)
        };
        if i > 0 || odd {
            edit(&lb_file, bf, bt);
        }
        let (ef, et) = if odd {
            ("256MiB", "64MiB")
        } else {
            ("64MiB", "256MiB")
        };
        if i > 0 {
            edit(
                &edge_file,
                &format!("max_bytes = \"{ef}\""),
                &format!("max_bytes = \"{et}\""),
            );
            let (pf, pt) = if odd {
                ("sync_timeout = \"2s\"", "sync_timeout = \"3s\"")
            } else {
                ("sync_timeout = \"3s\"", "sync_timeout = \"2s\"")
            };
            edit(&primary_file, pf, pt);
            let app = dir.join(format!("app{}.toml", i % 3 + 1));
            let text = std::fs::read_to_string(&app).unwrap();
            let next = if text.contains(both_replicas) {
                text.replacen(both_replicas, one_replica, 1)
            } else {
                text.replacen(one_replica, both_replicas, 1)
            };
            std::fs::write(&app, next).unwrap();
            let (code, report) = reload(&c, &fleet, APP_ADMINS[i % 3]).await;
            assert_eq!(code, 200, "{report}");
            let (code, report) = reload(&c, &fleet, PRIMARY_ADMIN).await;
            assert_eq!(code, 200, "{report}");
            let (lf, lt) = if odd {
                ("\"30s\"", "\"20s\"")
            } else {
                ("\"20s\"", "\"30s\"")
            };
            edit(
                &dir.join("replica1.toml"),
                &format!("max_lag = {lf}"),
                &format!("max_lag = {lt}"),
            );
            let (code, report) = reload(&c, &fleet, REPLICA_ADMINS[0]).await;
            assert_eq!(code, 200, "{report}");
            assert_eq!(
                report["restart_required"],
                serde_json::json!([]),
                "{report}"
            );
        }
        for admin in [LB_ADMIN, EDGE_ADMIN] {
            let (code, report) = reload(&c, &fleet, admin).await;
            assert_eq!(code, 200, "{report}");
            assert_eq!(report["applied"], true);
            assert_eq!(
                report["restart_required"],
                serde_json::json!([]),
                "{report}"
            );
            versions.insert(report["version"].as_str().unwrap().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let requests that started on old settings finish, then stop the load.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut last_writes = Vec::new();
    for (w, h) in load.into_iter().enumerate() {
        last_writes.push((w, h.await.unwrap()));
    }
    let total = done.load(Ordering::Relaxed);
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {total} requests");
    assert!(total > 100, "only {total} requests ran during the reloads");
    assert!(
        versions.len() >= 4,
        "reloads changed the configs: {versions:?}"
    );
    // The settings really are in force.
    let e = status(&c, &fleet, EDGE_ADMIN).await;
    assert_eq!(
        e["components"]["edge"]["capacity_bytes"],
        64u64 << 20,
        "{e}"
    );
    let lb = status(&c, &fleet, LB_ADMIN).await;
    assert_eq!(
        lb["components"]["balancer"]["backends"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let p = status(&c, &fleet, PRIMARY_ADMIN).await;
    assert_eq!(
        p["components"]["storage"]["replication"]["sync_timeout_ms"],
        3000
    );
    let r1 = status(&c, &fleet, REPLICA_ADMINS[0]).await;
    assert_eq!(
        r1["components"]["storage"]["replication"]["max_lag_ms"],
        20_000
    );
    // app-2 was edited 33 times: it ends with one replica.
    let a2 = status(&c, &fleet, APP_ADMINS[1]).await;
    let reps = a2["components"]["app"]["storage"]["replicas"]
        .as_array()
        .unwrap();
    assert_eq!(reps.len(), 1, "{a2}");
    assert_eq!(reps[0]["addr"], format!("127.0.0.1:{}", fleet.port(7602)));
    // Every last write is intact.
    for (w, last) in last_writes {
        if let Some(body) = last {
            let r = c
                .get(format!("{edge}/api/v1/load/w{w}?consistency=strong"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.text().await.unwrap(), body);
        }
    }

    // A broken reload changes nothing and is visible in /admin/status.
    let before = status(&c, &fleet, LB_ADMIN).await;
    let good = std::fs::read_to_string(&lb_file).unwrap();
    std::fs::write(&lb_file, good.replace("algorithm", "algoritm")).unwrap();
    let (code, report) = reload(&c, &fleet, LB_ADMIN).await;
    assert_eq!(code, 422, "{report}");
    assert_eq!(report["applied"], false);
    let after = status(&c, &fleet, LB_ADMIN).await;
    assert_eq!(after["config"]["version"], before["config"]["version"]);
    assert_eq!(after["config"]["last_reload"]["applied"], false);
    let why = after["config"]["last_reload"]["message"].as_str().unwrap();
    assert!(
        why.contains("balancer.toml:") && why.contains("algoritm"),
        "{why}"
    );
    let addrs = |s: &Value| -> Vec<String> {
        s["components"]["balancer"]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| format!("{}/{}", b["address"], b["weight"]))
            .collect()
    };
    assert_eq!(addrs(&after), addrs(&before), "backends unchanged");
    let (ok, out) = fleet.cli(&["reload"]);
    assert!(!ok, "{out}");
    assert!(out.contains("lb-1: REFUSED"), "{out}");
    assert!(out.contains("edge-1: applied"), "{out}");
    let (ok, table) = fleet.cli(&["status"]);
    assert!(ok, "{table}");
    assert!(table.contains("(last reload refused)"), "{table}");
    let get = c
        .get(format!("{edge}/api/v1/users/alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200, "traffic still flows on the old config");
    std::fs::write(&lb_file, &good).unwrap();

    // The watcher: editing the edge's file alone reloads it within a few seconds.
    edit(&edge_file, "max_bytes = \"64MiB\"", "max_bytes = \"32MiB\"");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let e = status(&c, &fleet, EDGE_ADMIN).await;
        if e["components"]["edge"]["capacity_bytes"] == 32u64 << 20 {
            assert_eq!(e["config"]["last_reload"]["applied"], true);
            break;
        }
        assert!(Instant::now() < deadline, "file change not picked up: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A node that dies unexpectedly is reported; the rest keep serving.
    let app3 = status(&c, &fleet, APP_ADMINS[2]).await;
    let pid = app3["pid"].as_u64().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    fleet.wait_line("app-3 exited unexpectedly", Duration::from_secs(10));
    for _ in 0..10 {
        let r = c
            .get(format!("{edge}/api/v1/users/alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // SIGTERM stops every node; the fleet reports the earlier death in its exit status.
    fleet.signal("TERM");
    fleet.wait_line("stopping every node", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = fleet.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "fleet did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(1));
    for name in ["edge-1", "lb-1", "storage-primary", "storage-replica-1"] {
        fleet.wait_line(
            &format!("{name} exited (exit status: 0)"),
            Duration::from_secs(5),
        );
    }
}

/// One GET over a fresh TLS connection: the status and the certificate the server showed.
async fn tls_get(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("edge.test").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "edge.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, cert))
}

/// The edge's certificates (and cache size) change 100 times under steady HTTPS load:
/// no request fails, and new handshakes get the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_certificates_rotate_under_load() {
    let app = common::Node::start_app("");
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for _ in 0..2 {
        let ck = rcgen::generate_simple_self_signed(vec!["edge.test".to_owned()]).unwrap();
        pairs.push((
            ck.cert.pem(),
            ck.signing_key.serialize_pem(),
            ck.cert.der().to_vec(),
        ));
    }
    let (cert, key) = (tmp.path().join("edge.pem"), tmp.path().join("edge.key"));
    std::fs::write(&cert, &pairs[0].0).unwrap();
    std::fs::write(&key, &pairs[0].1).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = |max: &str| {
        format!(
            "[node]\nname = \"edge-tls\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\n\n[edge]\nlisten = \"127.0.0.1:{port}\"\nupstreams = [\"{}\"]\ncache = {{ max_bytes = \"{max}\" }}\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            tmp.path().join("data").display(),
            app.app.unwrap(),
            cert.display(),
            key.display()
        )
    };
    let edge = common::Node::start_with(tmp.path(), &config("64MiB"));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let tls = common::tls::client_config(None, &[b"http/1.1"]);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let (status, der) = tls_get(&connector, addr, "/api/v1/users/nobody")
        .await
        .unwrap();
    assert_eq!((status, der.as_slice()), (404, pairs[0].2.as_slice()));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (connector, stop) = (connector.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut certs) =
                (0u64, Vec::new(), std::collections::HashSet::new());
            while !stop.load(Ordering::Relaxed) {
                match tls_get(&connector, addr, "/api/v1/users/nobody").await {
                    Ok((404, der)) => {
                        ok += 1;
                        certs.insert(der);
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed, certs)
        }));
    }
    let c = common::client();
    for i in 1..=100 {
        let (pem, key_pem, _) = &pairs[i % 2];
        std::fs::write(&cert, pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        let max = if i % 2 == 0 { "64MiB" } else { "32MiB" };
        std::fs::write(tmp.path().join("strata.toml"), config(max)).unwrap();
        let r = c
            .post(format!("{}/admin/reload", edge.admin_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut seen) = (0, std::collections::HashSet::new());
    for h in load {
        let (n, failed, certs) = h.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        ok += n;
        seen.extend(certs);
    }
    assert!(ok > 50, "only {ok} requests during the reloads");
    assert_eq!(seen.len(), 2, "handshakes saw both certificates");
    // The last reload (i = 100) installed pair 0 and 64MiB.
    let (_, der) = tls_get(&connector, addr, "/").await.unwrap();
    assert_eq!(der, pairs[0].2);
    let s: Value = c
        .get(format!("{}/admin/status", edge.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["components"]["edge"]["capacity_bytes"], 64u64 << 20);
    // A key that does not match its certificate is refused; the running pair stays.
    std::fs::write(&key, &pairs[1].1).unwrap();
    let r = c
        .post(format!("{}/admin/reload", edge.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let (status, der) = tls_get(&connector, addr, "/api/v1/users/nobody")
        .await
        .unwrap();
    assert_eq!((status, der), (404, pairs[0].2.clone()));
}
