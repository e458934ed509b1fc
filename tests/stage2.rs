//! Stage 2: an app node whose storage is another process, reached over TCP (and TLS).
//! The data API suite, storage crash and restart under load, raw-TCP attacks on the storage
//! port, TLS and mutual TLS, and the shipped stage 2 configs.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{client, wait_until, Node};
use reqwest::StatusCode;
use serde_json::{json, Value};
use strata::storage::protocol::{self, Message, Purpose, Request, Response, MAGIC, VERSION};

const SECRET: &str = "stage2-test-secret-0123456789";

/// Config of a storage-only node; `port` 0 picks one.
fn storage_config(dir: &Path, port: u16, extra: &str) -> String {
    format!(
        "[node]\nname = \"storage-1\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\ncluster_secret = \"{SECRET}\"\n\n[storage]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n",
        dir.join("data").display()
    )
}

/// Config of an app node whose storage is `storage` (the inline table's extra keys in
/// `link`, e.g. `, tls = { ... }`).
fn app_config(dir: &Path, storage: SocketAddr, link: &str) -> String {
    format!(
        "[node]\nname = \"app-1\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\ncluster_secret = \"{SECRET}\"\n\n[app]\nlisten = \"127.0.0.1:0\"\nmax_body = \"64KiB\"\nstorage = {{ primary = \"{storage}\", request_timeout = \"5s\"{link} }}\n",
        dir.join("data").display()
    )
}

fn start_node(root: &Path, name: &str, text: &str) -> Node {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    Node::start_with(&dir, text)
}

/// A port that was free a moment ago, so a restarted storage node can take it again.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn readyz(node: &Node) -> StatusCode {
    client()
        .get(format!("{}/readyz", node.admin_url()))
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(StatusCode::IM_A_TEAPOT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_suite_remote_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = start_node(
        tmp.path(),
        "storage",
        &storage_config(tmp.path().join("storage").as_path(), 0, ""),
    );
    let addr = storage.storage.expect("storage address");
    let app = start_node(
        tmp.path(),
        "app",
        &app_config(&tmp.path().join("app"), addr, ""),
    );
    assert_eq!(readyz(&app).await, StatusCode::OK);

    common::suite::all(&app.url(), 64 << 10).await;

    let status: Value = client()
        .get(format!("{}/admin/status", app.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let storage_status = &status["components"]["app"]["storage"];
    assert_eq!(storage_status["kind"], "remote", "{status}");
    assert_eq!(storage_status["server_node"], "storage-1", "{status}");
    assert!(
        !app.dir.join("data").exists(),
        "an app with remote storage opens no engine of its own"
    );
    let metrics = storage.metrics_text().await;
    assert!(metrics.contains("strata_storage_connections"), "{metrics}");
    assert!(metrics.contains("strata_storage_records"), "{metrics}");
    let app_metrics = app.metrics_text().await;
    assert!(
        app_metrics.contains("strata_storage_client_connections_up 4"),
        "{app_metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_kill9_and_restart_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let sdir = tmp.path().join("storage");
    let mut storage = start_node(tmp.path(), "storage", &storage_config(&sdir, port, ""));
    let addr = storage.storage.expect("storage address");
    assert_eq!(addr.port(), port);
    let app = start_node(
        tmp.path(),
        "app",
        &app_config(&tmp.path().join("app"), addr, ""),
    );
    let url = app.url();

    // Each writer overwrites its own key with increasing sequence numbers and remembers
    // the last one acknowledged; every failure must be a 503 or a 504.
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let unavailable = Arc::new(AtomicUsize::new(0));
    let unknown = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (acked, unavailable, unknown, stop, url) = (
            acked.clone(),
            unavailable.clone(),
            unknown.clone(),
            stop.clone(),
            url.clone(),
        );
        writers.push(tokio::spawn(async move {
            let c = client();
            let key = format!("w{w}");
            for seq in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = c
                    .put(format!("{url}/api/v1/load/{key}"))
                    .json(&json!({"seq": seq}))
                    .send()
                    .await
                    .expect("the app itself stays up");
                match r.status() {
                    s if s.is_success() => {
                        acked.lock().unwrap().insert(key.clone(), seq);
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert!(r.headers().contains_key("retry-after"));
                        assert_eq!(r.headers()["content-type"], "application/problem+json");
                        unavailable.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    StatusCode::GATEWAY_TIMEOUT => {
                        let p: Value = r.json().await.unwrap();
                        assert!(
                            p["detail"].as_str().unwrap().contains("may or may not"),
                            "{p}"
                        );
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unexpected status {other} during the outage"),
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = acked.lock().unwrap().len();
    assert!(before > 0, "writes succeed before the crash");
    storage.kill9();
    wait_until(
        "the app to report not ready",
        Duration::from_secs(10),
        || async { readyz(&app).await == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = client()
        .get(format!("{url}/api/v1/load/w0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));

    let storage = tokio::task::spawn_blocking(move || {
        let dir = storage.dir.clone();
        let config = storage.config.clone();
        drop(storage);
        Node::spawn(&dir, &config)
    })
    .await
    .unwrap();
    assert_eq!(storage.storage, Some(addr));
    wait_until(
        "the app to recover by itself",
        Duration::from_secs(20),
        || async { readyz(&app).await == StatusCode::OK },
    )
    .await;
    let met_outage = unavailable.load(Ordering::Relaxed) + unknown.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(met_outage > 0, "some requests met the outage");

    // Every acknowledged write is there (a later write of unknown outcome may have landed
    // too, so the stored sequence is at least the acknowledged one).
    let c = client();
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 8);
    for (key, seq) in acked {
        let r = c
            .get(format!("{url}/api/v1/load/{key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{key}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["seq"].as_u64().unwrap() >= seq,
            "{key}: {v} < acknowledged {seq}"
        );
    }
    let logs = app.logs();
    assert!(logs.contains("storage connection lost"), "{logs}");
    assert!(logs.contains("storage connection restored"), "{logs}");
}

/// Log text without terminal colour codes.
fn plain(logs: &str) -> String {
    let mut out = String::with_capacity(logs.len());
    let mut chars = logs.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Opens a raw connection to the storage port.
fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads until the server closes; returns what it sent and how long that took.
fn read_to_close(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (out, started.elapsed())
}

fn send(s: &mut TcpStream, msg: &Message) {
    s.write_all(&protocol::encode_frame(msg)).unwrap();
}

fn recv(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Message> {
    loop {
        if let Ok(Some(m)) = protocol::decode_frame(buf, 1 << 20) {
            return Some(m);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn hello(version: u16) -> (Message, [u8; protocol::NONCE_LEN]) {
    let nonce = protocol::nonce();
    let msg = Message::Hello {
        magic: MAGIC,
        version,
        client_nonce: nonce,
        purpose: Purpose::Client,
    };
    (msg, nonce)
}

/// Runs the handshake with `secret`; returns the stream, buffer and the server's last
/// answer (Welcome or Refused).
fn handshake(addr: SocketAddr, secret: &[u8]) -> (TcpStream, BytesMut, Option<Message>) {
    let mut s = raw(addr);
    let mut buf = BytesMut::new();
    let (h, cn) = hello(VERSION);
    send(&mut s, &h);
    let Some(Message::Challenge { server_nonce, .. }) = recv(&mut s, &mut buf) else {
        panic!("no challenge")
    };
    let client_proof = if secret.is_empty() {
        Vec::new()
    } else {
        protocol::proof(secret, "client", &server_nonce, &cn)
    };
    send(&mut s, &Message::Auth { client_proof });
    let answer = recv(&mut s, &mut buf);
    (s, buf, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_attacks_are_rejected_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "max_frame = \"64KiB\"\nframe_timeout = \"1s\"\nhandshake_timeout = \"2s\"\n";
    let storage = start_node(
        tmp.path(),
        "storage",
        &storage_config(&tmp.path().join("storage"), 0, extra),
    );
    let addr = storage.storage.expect("storage address");
    let app = start_node(
        tmp.path(),
        "app",
        &app_config(&tmp.path().join("app"), addr, ""),
    );
    let url = app.url();
    let c = client();
    let seed = c
        .put(format!("{url}/api/v1/safe/seed"))
        .json(&json!({"keep": "me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(seed.status(), StatusCode::CREATED);

    // A legitimate app keeps working throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let legit = {
        let (stop, url) = (stop.clone(), url.clone());
        tokio::spawn(async move {
            let c = client();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .put(format!("{url}/api/v1/legit/k{}", n % 16))
                    .json(&json!({"n": n}))
                    .send()
                    .await
                    .unwrap();
                assert!(
                    r.status().is_success(),
                    "legit write failed: {}",
                    r.status()
                );
                let r = c
                    .get(format!("{url}/api/v1/safe/seed"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                n += 1;
            }
            n
        })
    };

    let attacks = tokio::task::spawn_blocking(move || {
        // Wrong secret: refused after the proof.
        let (mut s, _, answer) = handshake(addr, b"not-the-cluster-secret");
        assert!(
            matches!(answer, Some(Message::Refused { .. })),
            "{answer:?}"
        );
        assert!(read_to_close(&mut s).0.is_empty());

        // No secret at all: an empty proof.
        let (mut s, _, answer) = handshake(addr, b"");
        assert!(
            matches!(answer, Some(Message::Refused { .. })),
            "{answer:?}"
        );
        read_to_close(&mut s);

        // Skipping authentication: a request right after Hello.
        let mut s = raw(addr);
        let mut buf = BytesMut::new();
        send(&mut s, &hello(VERSION).0);
        assert!(matches!(
            recv(&mut s, &mut buf),
            Some(Message::Challenge { .. })
        ));
        let get = Message::Request {
            id: 1,
            body: Request::Get {
                key: "safe/seed".into(),
            },
        };
        send(&mut s, &get);
        let answer = recv(&mut s, &mut buf);
        assert!(
            !matches!(answer, Some(Message::Response { .. })),
            "no data without authentication: {answer:?}"
        );

        // Garbage: an HTTP request (its first bytes read as a huge length).
        let mut s = raw(addr);
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let (out, _) = read_to_close(&mut s);
        assert!(out.is_empty(), "nothing is sent to garbage");

        // Garbage inside a well-sized frame.
        let mut s = raw(addr);
        s.write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef])
            .unwrap();
        assert!(read_to_close(&mut s).0.is_empty());

        // Oversize frame: 1 MiB announced against a 64 KiB limit.
        let mut s = raw(addr);
        s.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
        s.write_all(&[0u8; 1024]).unwrap();
        assert!(read_to_close(&mut s).0.is_empty());

        // Truncated frame: the peer closes half-way.
        let mut s = raw(addr);
        s.write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(read_to_close(&mut s).0.is_empty());

        // Stall mid-frame: disconnected after the frame timeout (1s here).
        let mut s = raw(addr);
        s.write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
        let (out, took) = read_to_close(&mut s);
        assert!(out.is_empty());
        assert!(
            took < Duration::from_secs(8),
            "stalled peer held for {took:?}"
        );

        // Unknown version, and a wrong magic.
        let mut s = raw(addr);
        let mut buf = BytesMut::new();
        send(&mut s, &hello(0).0);
        let answer = recv(&mut s, &mut buf);
        assert!(
            matches!(&answer, Some(Message::Refused { reason }) if reason.contains("version")),
            "{answer:?}"
        );
        let mut s = raw(addr);
        send(
            &mut s,
            &Message::Hello {
                magic: *b"NOTSTRAT",
                version: VERSION,
                client_nonce: [0; protocol::NONCE_LEN],
                purpose: Purpose::Client,
            },
        );
        assert!(read_to_close(&mut s).0.is_empty());

        // Authenticated, then garbage: the connection is dropped, others unaffected.
        let (mut s, _, answer) = handshake(addr, SECRET.as_bytes());
        assert!(
            matches!(answer, Some(Message::Welcome { .. })),
            "{answer:?}"
        );
        s.write_all(&[0, 0, 0, 2, 0xff, 0xff]).unwrap();
        read_to_close(&mut s);

        // And a well-behaved raw client is served.
        let (mut s, mut buf, answer) = handshake(addr, SECRET.as_bytes());
        assert!(
            matches!(answer, Some(Message::Welcome { .. })),
            "{answer:?}"
        );
        send(&mut s, &get);
        match recv(&mut s, &mut buf) {
            Some(Message::Response {
                id: 1,
                body: Response::Record(Some(r)),
            }) => assert_eq!(r.body, br#"{"keep":"me"}"#),
            other => panic!("{other:?}"),
        }
    });
    attacks.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let served = legit.await.unwrap();
    assert!(served > 0);

    let r = c
        .get(format!("{url}/api/v1/safe/seed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"keep": "me"}));
    let r = c.get(format!("{url}/api/v1/safe")).send().await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let logs = plain(&storage.logs());
    for reason in [
        "authentication failed",
        "expected Auth",
        "exceeds the limit",
        "malformed frame",
        "in the middle of a frame",
        "stalled mid-frame",
        "version 0",
        "bad magic",
    ] {
        assert!(
            logs.lines()
                .any(|l| l.contains("storage connection closed") && l.contains(reason)),
            "no log line names {reason:?}:\n{logs}"
        );
    }
    assert!(logs.contains("peer=127.0.0.1:"), "{logs}");
}

/// A private CA with a server certificate for localhost/127.0.0.1 and a client
/// certificate, written as PEM files into `dir`.
fn make_certs(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "strata test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();

    let leaf = |names: Vec<String>, usage, file: &str| {
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    };
    leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    leaf(
        vec!["app-1".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        "client",
    );
}

async fn put_get(url: &str) -> StatusCode {
    let c = client();
    let r = c
        .put(format!("{url}/api/v1/tls/rec"))
        .json(&json!({"over": "tls"}))
        .send()
        .await
        .unwrap();
    if !r.status().is_success() {
        return r.status();
    }
    c.get(format!("{url}/api/v1/tls/rec"))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let p = |f: &str| certs.join(f).display().to_string();

    // TLS: the server proves itself; the app verifies it against the private CA.
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}\n",
        p("server.pem"),
        p("server.key")
    );
    let storage = start_node(
        tmp.path(),
        "s1",
        &storage_config(&tmp.path().join("s1"), 0, &tls),
    );
    let addr = storage.storage.unwrap();
    let link = format!(
        ", tls = {{ ca = \"{}\", server_name = \"localhost\" }}",
        p("ca.pem")
    );
    let app = start_node(
        tmp.path(),
        "a1",
        &app_config(&tmp.path().join("a1"), addr, &link),
    );
    assert_eq!(put_get(&app.url()).await, StatusCode::OK);
    // A plain-TCP peer on the TLS port gets nowhere.
    let mut s = raw(addr);
    send(&mut s, &hello(VERSION).0);
    let (out, _) = read_to_close(&mut s);
    assert!(!out.windows(6).any(|w| w == b"STRATA"));
    drop((app, storage));

    // Mutual TLS: the server also demands a client certificate from the CA.
    let mtls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    );
    let storage = start_node(
        tmp.path(),
        "s2",
        &storage_config(&tmp.path().join("s2"), 0, &mtls),
    );
    let addr = storage.storage.unwrap();
    let link = format!(
        ", tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    // server_name defaults to the host of `primary`: 127.0.0.1, which the cert names.
    let app = start_node(
        tmp.path(),
        "a2",
        &app_config(&tmp.path().join("a2"), addr, &link),
    );
    assert_eq!(put_get(&app.url()).await, StatusCode::OK);
    let status: Value = client()
        .get(format!("{}/admin/status", storage.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["components"]["storage"]["tls"], true, "{status}");

    // Without a client certificate the app never gets a connection: 503, not ready.
    let link = format!(", tls = {{ ca = \"{}\" }}", p("ca.pem"));
    let anonymous = start_node(
        tmp.path(),
        "a3",
        &app_config(&tmp.path().join("a3"), addr, &link),
    );
    assert_eq!(
        put_get(&anonymous.url()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(readyz(&anonymous).await, StatusCode::SERVICE_UNAVAILABLE);
    let logs = plain(&storage.logs());
    assert!(
        logs.lines()
            .any(|l| l.contains("storage connection closed") && l.contains("TLS handshake failed")),
        "{logs}"
    );
    // The authorised app is unaffected.
    assert_eq!(put_get(&app.url()).await, StatusCode::OK);
}

#[test]
fn shipped_stage2_configs_need_a_cluster_secret() {
    // (fleet.rs checks every shipped config with one.) Without, they are refused with a
    // clear reason.
    for file in ["stage2/storage.toml", "stage2/app.toml"] {
        let out = common::check_config(&common::shipped_config(file), None);
        assert!(!out.status.success(), "{file} accepted without a secret");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("needs a cluster secret"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_with_another_secret_gets_503_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = start_node(
        tmp.path(),
        "storage",
        &storage_config(&tmp.path().join("storage"), 0, ""),
    );
    let addr = storage.storage.unwrap();
    let text = app_config(&tmp.path().join("app"), addr, "")
        .replace(SECRET, "some-other-secret-0123456789");
    let app = start_node(tmp.path(), "app", &text);
    let r = client()
        .put(format!("{}/api/v1/x/y", app.url()))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let p: Value = r.json().await.unwrap();
    assert!(
        p["detail"].as_str().unwrap().contains("cluster secret"),
        "{p}"
    );
    let r = client()
        .get(format!("{}/readyz", app.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("unreachable"));
    let logs = plain(&storage.logs());
    assert!(
        logs.contains("hung up after the challenge"),
        "the storage node names the likely cause: {logs}"
    );
}
