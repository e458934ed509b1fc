//! Operations through the real binary: config errors, reload, admin endpoints, auth,
//! HTTP-level abuse, graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{client, raw, raw_status, Node};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[test]
fn check_reports_file_line_column_and_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[node]\nname = \"x\"\n\n[app]\nlisten = \"127.0.0.1:0\"\nmax_bdy = \"1MiB\"\n",
    )
    .unwrap();
    let out = Command::new(common::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:6:1", path.display())), "{err}");
    assert!(
        err.contains("unknown field `max_bdy`") && err.contains("did you mean `max_body`?"),
        "{err}"
    );

    std::fs::write(&path, "[app]\nmax_body = \"2MiB\"\n").unwrap();
    let out = Command::new(common::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(effective.contains("max_body = \"2MiB\""), "{effective}");
    assert!(
        effective.contains("data_dir = \"strata-data\""),
        "defaults filled in: {effective}"
    );
    assert!(effective.contains("list_max_limit = 1000"), "{effective}");

    std::fs::write(&path, "[app]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    let out = Command::new(common::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("allow_anonymous"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_valid_config_and_keeps_old_on_broken_file() {
    let node = Node::start_app("max_body = \"64KiB\"");
    let c = client();
    let url = format!("{}/api/v1/r/one", node.url());
    let body = format!("{{\"x\":\"{}\"}}", "a".repeat(2000));
    let send = |b: String| {
        c.put(&url)
            .header("content-type", "application/json")
            .body(b)
            .send()
    };
    assert_eq!(
        send(body.clone()).await.unwrap().status(),
        StatusCode::CREATED
    );

    // A broken file is refused; the running config stays.
    let good_text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(
        &node.config,
        good_text.replace("max_body = \"64KiB\"", "max_body = \"1KiB\"\nbogus_key = 1"),
    )
    .unwrap();
    node.signal("HUP");
    let status = wait_reload(&node, 1).await;
    assert_eq!(status["config"]["last_reload"]["applied"], json!(false));
    let why = status["config"]["last_reload"]["message"].as_str().unwrap();
    assert!(
        why.contains("bogus_key") && why.contains("strata.toml:10:1"),
        "{why}"
    );
    assert_eq!(
        send(body.clone()).await.unwrap().status(),
        StatusCode::OK,
        "old limit still in force"
    );

    // A good file applies live.
    std::fs::write(
        &node.config,
        good_text.replace("max_body = \"64KiB\"", "max_body = \"1KiB\""),
    )
    .unwrap();
    node.signal("HUP");
    let status = wait_reload(&node, 2).await;
    assert_eq!(
        status["config"]["last_reload"]["applied"],
        json!(true),
        "{status}"
    );
    assert_eq!(
        send(body.clone()).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let got: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["x"].as_str().unwrap().len(), 2000, "data intact");

    // A change that needs a restart is reported, not half-applied.
    std::fs::write(
        &node.config,
        good_text.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
    )
    .unwrap();
    let r = c
        .post(format!("{}/admin/reload", node.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let report: Value = r.json().await.unwrap();
    assert!(
        report["restart_required"]
            .as_array()
            .unwrap()
            .contains(&json!("app.listen")),
        "{report}"
    );
    assert_eq!(c.get(&url).send().await.unwrap().status(), StatusCode::OK);
}

/// Waits until the node has logged its `n`-th reload outcome, then returns /admin/status.
async fn wait_reload(node: &Node, n: usize) -> Value {
    for _ in 0..400 {
        let logs = node.logs();
        let count =
            logs.matches("config reload refused").count() + logs.matches("config reloaded").count();
        if count >= n {
            let url = format!("{}/admin/status", node.admin_url());
            return client()
                .get(url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("reload {n} not seen in the log:\n{}", node.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_metrics_and_status() {
    let node = Node::start_app("");
    let c = client();
    c.put(format!("{}/api/v1/m/a", node.url()))
        .json(&json!({"a": 1}))
        .send()
        .await
        .unwrap();
    c.get(format!("{}/api/v1/m/a", node.url()))
        .send()
        .await
        .unwrap();
    let admin = node.admin_url();
    assert_eq!(
        c.get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let metrics = node.metrics_text().await;
    for needle in [
        "strata_http_requests_total{role=\"app\",route=\"record\",status=\"201\"} 1",
        "strata_http_request_duration_seconds_bucket",
        "strata_storage_records",
        "strata_storage_disk_bytes",
        "strata_storage_group_commit_size",
        "strata_storage_flush_seconds",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let status: Value = c
        .get(format!("{admin}/admin/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["node"], "test");
    assert_eq!(status["roles"], json!(["app"]));
    assert_eq!(status["ready"], json!(true));
    assert!(
        status["components"]["app"]["storage"]["last_lsn"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert_eq!(
        c.get(format!("{admin}/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.post(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_and_scopes() {
    let tmp = tempfile::tempdir().unwrap();
    let text = common::app_config(
        tmp.path(),
        "[[app.tokens]]\nname = \"reader\"\nscopes = [\"read\"]\nvalue = \"reader-token-1\"\n\n\
         [[app.tokens]]\nname = \"writer\"\nscopes = [\"read\", \"write\"]\nvalue = \"writer-token-1\"\n\n\
         [[app.tokens]]\nname = \"ops\"\nscopes = [\"admin\"]\nvalue = \"admin-token-1\"\n",
    );
    let node = Node::start_with(tmp.path(), &text);
    let c = client();
    let url = format!("{}/api/v1/sec/a", node.url());
    let r = c.put(&url).json(&json!({"a": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .put(&url)
        .bearer_auth("reader-token-1")
        .json(&json!({"a": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c
        .put(&url)
        .bearer_auth("writer-token-1")
        .json(&json!({"a": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        c.get(&url)
            .bearer_auth("wrong-token-x")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        c.get(&url)
            .bearer_auth("reader-token-1")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let admin = node.admin_url();
    assert_eq!(
        c.get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(format!("{admin}/admin/status"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        c.get(format!("{admin}/admin/status"))
            .bearer_auth("reader-token-1")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        c.get(format!("{admin}/admin/status"))
            .bearer_auth("admin-token-1")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[test]
fn token_env_var_missing_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, "[app]\n[[app.tokens]]\nname = \"w\"\nscopes = [\"write\"]\nvalue_env = \"STRATA_TEST_UNSET_VAR\"\n").unwrap();
    let out = Command::new(common::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("STRATA_TEST_UNSET_VAR"));
    let out = Command::new(common::bin())
        .args(["check", "--config"])
        .arg(&path)
        .env("STRATA_TEST_UNSET_VAR", "from-the-env-123")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_abuse_is_contained_and_data_survives() {
    let node =
        Node::start_app("http = { header_read_timeout = \"1s\", max_header_bytes = \"16KiB\" }");
    let addr = node.app.unwrap();
    // Fresh connections: this node closes idle ones after 1 s, about as long as the raw
    // exchanges below take.
    let c = common::unpooled_client();
    let url = format!("{}/api/v1/keep/me", node.url());
    c.put(&url).json(&json!({"ok": true})).send().await.unwrap();

    // Garbage instead of HTTP.
    let out = tokio::task::spawn_blocking(move || {
        raw(
            addr,
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
            Duration::from_secs(3),
        )
    })
    .await
    .unwrap();
    assert!(out.is_empty() || raw_status(&out) == Some(400), "{out:?}");
    // Oversize headers.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let out =
        tokio::task::spawn_blocking(move || raw(addr, big.as_bytes(), Duration::from_secs(3)))
            .await
            .unwrap();
    assert!(out.is_empty() || raw_status(&out) == Some(431), "{out:?}");
    // Slowloris: headers never finish; the connection is closed after the deadline while
    // other clients are served.
    let slow = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /api/v1/keep/me HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        (
            started.elapsed(),
            String::from_utf8_lossy(&buf).into_owned(),
        )
    });
    for _ in 0..5 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), StatusCode::OK);
    }
    let (elapsed, out) = slow.await.unwrap();
    assert!(
        elapsed < Duration::from_secs(5),
        "slow client cut after the deadline, took {elapsed:?}"
    );
    assert!(out.is_empty() || raw_status(&out) == Some(408), "{out:?}");
    // A client that vanishes mid-body: nothing is written.
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"PUT /api/v1/keep/me HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ok\":").unwrap();
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, json!({"ok": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_on_the_same_port() {
    let node = Node::start_app("");
    let c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!("{}/api/v1/h2/a", node.url());
    let r = c.put(&url).json(&json!({"h2": true})).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), StatusCode::CREATED);
    let got: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, json!({"h2": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut node = Node::start_app("");
    let addr = node.app.unwrap();
    // Start a request whose body arrives slowly, so it is in flight at SIGTERM.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let body = b"{\"drained\":true}";
        s.write_all(format!("PUT /api/v1/d/x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes()).unwrap();
        s.write_all(&body[..5]).unwrap();
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(&body[5..]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    std::thread::sleep(Duration::from_millis(200));
    node.signal("TERM");
    tx.send(()).unwrap();
    let answer = slow.join().unwrap();
    assert_eq!(raw_status(&answer), Some(201), "{answer:?}");
    assert_eq!(
        node.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        node.logs()
    );
    // The drained write is durable.
    let node = Node::spawn(&node.dir.clone(), &node.config.clone());
    let got: Value = client()
        .get(format!("{}/api/v1/d/x", node.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got, json!({"drained": true}));
}

#[test]
fn serve_without_config_runs_the_embedded_default() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("public")).unwrap();
    std::fs::write(dir.path().join("public/hello.txt"), "hi").unwrap();
    let mut child = Command::new(common::bin())
        .arg("serve")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    while !printed.contains("strata: data in") {
        match lines.next() {
            Some(Ok(l)) => printed.push_str(&(l + "\n")),
            _ => break,
        }
    }
    assert!(
        printed.contains("app listening on http://127.0.0.1:8080"),
        "{printed}"
    );
    assert!(
        printed.contains("admin listening on http://127.0.0.1:9900"),
        "{printed}"
    );
    assert!(printed.contains("static files from public"), "{printed}");
    assert!(printed.contains("data in strata-data"), "{printed}");
    let got = raw(
        "127.0.0.1:8080".parse().unwrap(),
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(got.ends_with("hi"), "{got}");
    let health = raw(
        "127.0.0.1:9900".parse().unwrap(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(raw_status(&health), Some(200));
    assert!(dir.path().join("strata-data").is_dir());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}
