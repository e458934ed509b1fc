//! The edge role through the real binary, in front of an in-process origin whose replies
//! each test scripts per path (headers, body, delay, failures) and which counts requests.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::tls::{make_certs, pem_der, tls_connect};
use common::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Default)]
enum Kind {
    #[default]
    Normal,
    /// Promise the whole body, send half, close.
    ResetMidBody,
    /// A response head hyper refuses.
    Malformed,
}

#[derive(Clone, Default)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    delay: Duration,
    kind: Kind,
    /// Answer 304 (with `headers`) when If-None-Match carries this.
    etag_304: Option<String>,
    /// Body = the value of this request header.
    echo: Option<String>,
    /// Raw 1xx interim responses sent first; the final response waits for the notify.
    interim: Option<(String, Arc<tokio::sync::Notify>)>,
}

fn reply(cc: &str, body: &str) -> Reply {
    Reply {
        status: 200,
        headers: vec![
            ("cache-control".into(), cc.into()),
            ("content-type".into(), "text/plain".into()),
        ],
        body: body.as_bytes().to_vec(),
        ..Reply::default()
    }
}

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Reply>>,
    hits: Mutex<HashMap<String, usize>>,
    last: Mutex<HashMap<String, HashMap<String, String>>>,
    down: AtomicBool,
}

struct Origin {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, s.clone()));
            }
        });
        Origin { addr, state }
    }

    fn route(&self, path: &str, r: Reply) {
        self.state.routes.lock().unwrap().insert(path.into(), r);
    }

    fn hits(&self, path: &str) -> usize {
        *self.state.hits.lock().unwrap().get(path).unwrap_or(&0)
    }

    fn last_header(&self, path: &str, name: &str) -> Option<String> {
        self.state
            .last
            .lock()
            .unwrap()
            .get(path)
            .and_then(|h| h.get(name).cloned())
    }

    fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }
}

async fn serve(mut sock: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut rl = lines.next().unwrap_or("").split(' ');
        let method = rl.next().unwrap_or("").to_owned();
        let path = rl.next().unwrap_or("/").to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + len);
        if state.down.load(Ordering::SeqCst) {
            return; // close without answering
        }
        *state.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
        state
            .last
            .lock()
            .unwrap()
            .insert(path.clone(), headers.clone());
        let r = state
            .routes
            .lock()
            .unwrap()
            .get(&path)
            .cloned()
            .unwrap_or_else(|| Reply {
                status: 404,
                body: b"no route".to_vec(),
                ..Reply::default()
            });
        if !r.delay.is_zero() {
            tokio::time::sleep(r.delay).await;
        }
        if let Some((raw, go_on)) = &r.interim {
            if sock.write_all(raw.as_bytes()).await.is_err() {
                return;
            }
            go_on.notified().await;
        }
        let mut status = r.status;
        let mut body = r.body.clone();
        if let Some(h) = &r.echo {
            body = headers.get(h).cloned().unwrap_or_default().into_bytes();
        }
        if let (Some(e), Some(inm)) = (&r.etag_304, headers.get("if-none-match")) {
            if inm == e {
                status = 304;
                body.clear();
            }
        }
        let mut out = format!("HTTP/1.1 {status} X\r\n");
        for (k, v) in &r.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        match r.kind {
            Kind::Malformed => {
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nxx")
                    .await;
                return;
            }
            Kind::ResetMidBody => {
                out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.write_all(&body[..body.len() / 2]).await;
                let _ = sock.flush().await;
                return;
            }
            Kind::Normal => {}
        }
        if status != 304 {
            out.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if status != 304 && method != "HEAD" {
            bytes.extend_from_slice(&body);
        }
        if sock.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

fn start_edge(origin: &Origin, extra: &str) -> (Node, String, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[node]\nname = \"edge-test\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n[edge]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"{}\"]\nupstream_down_for = \"50ms\"\nupstream_timeout = \"5s\"\n{extra}\n",
        tmp.path().join("data").display(),
        origin.addr
    );
    let node = Node::start_with(tmp.path(), &text);
    let url = format!("http://{}", node.listening["edge"]);
    (node, url, tmp)
}

fn cache_status(r: &reqwest::Response) -> String {
    r.headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String, reqwest::header::HeaderMap) {
    let mut rb = common::client().get(url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let body = r.text().await.unwrap_or_default();
    (status, body, h)
}

fn cs(h: &reqwest::header::HeaderMap) -> String {
    h.get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_misses_make_one_origin_request() {
    let origin = Origin::start().await;
    let mut r = reply("max-age=60", "shared body");
    r.delay = Duration::from_millis(400);
    origin.route("/slow", r);
    let (_node, url, _t) = start_edge(&origin, "");
    let client = common::client();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let c = client.clone();
            let u = format!("{url}/slow");
            tokio::spawn(async move {
                let r = c.get(u).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    for t in tasks {
        let (s, b) = t.await.unwrap();
        assert_eq!((s, b.as_str()), (200, "shared body"));
    }
    assert_eq!(origin.hits("/slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_is_stored_then_hit() {
    let origin = Origin::start().await;
    origin.route("/a", reply("max-age=60", "hello"));
    let (_node, url, _t) = start_edge(&origin, "");
    let (s, b, h) = get(&format!("{url}/a"), &[]).await;
    assert_eq!((s, b.as_str()), (200, "hello"));
    assert!(
        cs(&h).contains("fwd=uri-miss") && cs(&h).contains("stored"),
        "{h:?}"
    );
    let (_, b, h) = get(&format!("{url}/a"), &[]).await;
    assert_eq!(b, "hello");
    assert_eq!(cs(&h), "strata; hit");
    assert_eq!(origin.hits("/a"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_stale_while_the_origin_is_down() {
    let origin = Origin::start().await;
    origin.route(
        "/sie",
        reply("max-age=1, stale-if-error=60", "old but good"),
    );
    origin.route("/nosie", reply("max-age=1, must-revalidate", "gone"));
    origin.route("/plain", reply("max-age=1", "plain old"));
    let (_node, url, _t) = start_edge(&origin, "");
    for p in ["/sie", "/nosie", "/plain"] {
        get(&format!("{url}{p}"), &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    origin.set_down(true);
    let (s, b, h) = get(&format!("{url}/sie"), &[]).await;
    assert_eq!((s, b.as_str()), (200, "old but good"));
    assert!(cs(&h).contains("stale-if-error"), "{h:?}");
    let (s, _, _) = get(&format!("{url}/nosie"), &[]).await;
    assert_eq!(
        s, 502,
        "must-revalidate forbids stale even with the origin down"
    );
    // Without any directive, an unreachable origin may be covered by stale content
    // (§4.2.4, `stale_if_unreachable`; cache-tests stale-close).
    let (s, b, h) = get(&format!("{url}/plain"), &[]).await;
    assert_eq!((s, b.as_str()), (200, "plain old"));
    assert!(cs(&h).contains("detail=origin-unreachable"), "{h:?}");
    // 5xx from a live origin also falls back to stale.
    origin.set_down(false);
    let mut r = reply("no-store", "boom");
    r.status = 503;
    origin.route("/sie", r);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, b, h) = get(&format!("{url}/sie"), &[]).await;
    assert_eq!((s, b.as_str()), (200, "old but good"), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_updates_the_stored_headers() {
    let origin = Origin::start().await;
    let mut r = reply("max-age=1", "body v1");
    r.headers.push(("etag".into(), "\"v1\"".into()));
    r.headers.push(("x-version".into(), "a".into()));
    origin.route("/r", r);
    let (_node, url, _t) = start_edge(&origin, "");
    get(&format!("{url}/r"), &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut r = reply("max-age=100", "SHOULD NOT BE SENT");
    r.headers.push(("etag".into(), "\"v1\"".into()));
    r.headers.push(("x-version".into(), "b".into()));
    r.etag_304 = Some("\"v1\"".into());
    origin.route("/r", r);
    let (s, b, h) = get(&format!("{url}/r"), &[]).await;
    assert_eq!((s, b.as_str()), (200, "body v1"));
    assert_eq!(h["x-version"], "b");
    assert!(cs(&h).contains("fwd=stale; fwd-status=304"), "{h:?}");
    assert_eq!(
        origin.last_header("/r", "if-none-match").as_deref(),
        Some("\"v1\"")
    );
    let (_, b, h) = get(&format!("{url}/r"), &[]).await;
    assert_eq!(b, "body v1");
    assert_eq!(h["x-version"], "b");
    assert_eq!(
        cs(&h),
        "strata; hit",
        "refreshed freshness (max-age=100) applies"
    );
    assert_eq!(origin.hits("/r"), 2);
    // A client's own conditional request is answered 304 from the cache.
    let (s, _, _) = get(&format!("{url}/r"), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(s, 304);
    assert_eq!(origin.hits("/r"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_keeps_variants_apart() {
    let origin = Origin::start().await;
    let mut r = reply("max-age=60", "");
    r.headers.push(("vary".into(), "Accept-Language".into()));
    r.echo = Some("accept-language".into());
    origin.route("/v", r);
    let (_node, url, _t) = start_edge(&origin, "");
    let u = format!("{url}/v");
    assert_eq!(get(&u, &[("accept-language", "en")]).await.1, "en");
    assert_eq!(get(&u, &[("accept-language", "de")]).await.1, "de");
    let (_, b, h) = get(&u, &[("accept-language", "en")]).await;
    assert_eq!(b, "en");
    assert_eq!(cs(&h), "strata; hit");
    let (_, b, h) = get(&u, &[("accept-language", "de")]).await;
    assert_eq!(b, "de");
    assert_eq!(cs(&h), "strata; hit");
    assert_eq!(origin.hits("/v"), 2);
    // Vary: * is never reused.
    let mut r = reply("max-age=60", "star");
    r.headers.push(("vary".into(), "*".into()));
    origin.route("/star", r);
    get(&format!("{url}/star"), &[]).await;
    get(&format!("{url}/star"), &[]).await;
    assert_eq!(origin.hits("/star"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_no_store_and_cookies_are_never_served_to_another_client() {
    let origin = Origin::start().await;
    origin.route("/p", reply("private, max-age=60", "alice's"));
    origin.route("/ns", reply("no-store", "alice's too"));
    let mut c = reply("max-age=60", "with cookie");
    c.headers
        .push(("set-cookie".into(), "session=alice".into()));
    origin.route("/c", c);
    let (_node, url, _t) = start_edge(&origin, "");
    for p in ["/p", "/ns", "/c"] {
        let (_, _, h1) = get(&format!("{url}{p}"), &[("cookie", "alice")]).await;
        let (_, _, h2) = get(&format!("{url}{p}"), &[("cookie", "bob")]).await;
        assert!(!cs(&h2).contains("hit"), "{p}: {h2:?}");
        assert_eq!(origin.hits(p), 2, "{p}");
        if p == "/c" {
            assert_eq!(h1["set-cookie"], "session=alice");
        }
    }
    // Authorization: not shared unless the origin says public.
    origin.route("/auth", reply("max-age=60", "alice's account"));
    get(&format!("{url}/auth"), &[("authorization", "Bearer alice")]).await;
    get(&format!("{url}/auth"), &[("authorization", "Bearer bob")]).await;
    assert_eq!(origin.hits("/auth"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_invalidate_the_url_and_location() {
    let origin = Origin::start().await;
    origin.route("/doc", reply("max-age=60", "v1"));
    origin.route("/items/1", reply("max-age=60", "item"));
    let mut created = reply("no-store", "created");
    created.status = 201;
    created.headers.push(("location".into(), "/items/1".into()));
    origin.route("/items", created);
    let mut posted = reply("no-store", "ok");
    posted.status = 200;
    origin.route("/doc", reply("max-age=60", "v1"));
    let (_node, url, _t) = start_edge(&origin, "");
    get(&format!("{url}/doc"), &[]).await;
    get(&format!("{url}/items/1"), &[]).await;
    assert_eq!(origin.hits("/doc"), 1);
    let r = common::client()
        .post(format!("{url}/doc"))
        .body("x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(cache_status(&r).contains("fwd=method"));
    assert_eq!(origin.hits("/doc"), 2, "POST went through");
    get(&format!("{url}/doc"), &[]).await;
    assert_eq!(origin.hits("/doc"), 3, "the stored GET was invalidated");
    let r = common::client()
        .post(format!("{url}/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    get(&format!("{url}/items/1"), &[]).await;
    assert_eq!(origin.hits("/items/1"), 2, "Location was invalidated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_is_corrected_and_grows() {
    let origin = Origin::start().await;
    let mut r = reply("max-age=100", "aged");
    r.headers.push(("age".into(), "10".into()));
    origin.route("/age", r);
    let (_node, url, _t) = start_edge(&origin, "");
    let (_, _, h) = get(&format!("{url}/age"), &[]).await;
    let a0: u64 = h["age"].to_str().unwrap().parse().unwrap();
    assert!((10..=11).contains(&a0), "{a0}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (_, _, h) = get(&format!("{url}/age"), &[]).await;
    let a1: u64 = h["age"].to_str().unwrap().parse().unwrap();
    assert!((12..=13).contains(&a1), "{a1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdn_cache_control_is_honoured_and_stripped() {
    let origin = Origin::start().await;
    let mut r = reply("no-store", "for the cdn");
    r.headers
        .push(("cdn-cache-control".into(), "max-age=60".into()));
    origin.route("/cdn", r);
    let (_node, url, _t) = start_edge(&origin, "");
    let (_, _, h) = get(&format!("{url}/cdn"), &[]).await;
    assert!(h.get("cdn-cache-control").is_none());
    assert_eq!(
        h["cache-control"], "no-store",
        "Cache-Control goes downstream as is"
    );
    let (_, b, h) = get(&format!("{url}/cdn"), &[]).await;
    assert_eq!(b, "for the cdn");
    assert_eq!(cs(&h), "strata; hit");
    assert!(h.get("cdn-cache-control").is_none());
    assert_eq!(origin.hits("/cdn"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_and_head_are_served_from_cache() {
    let origin = Origin::start().await;
    let body: String = (0..100)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut r = reply("max-age=60", &body);
    r.headers[1] = ("content-type".into(), "application/octet-stream".into());
    origin.route("/bin", r);
    let (_node, url, _t) = start_edge(&origin, "");
    let u = format!("{url}/bin");
    let (s, b, h) = get(&u, &[("range", "bytes=10-19")]).await;
    assert_eq!(s, 206);
    assert_eq!(b, &body[10..20]);
    assert_eq!(h["content-range"], "bytes 10-19/100");
    let (s, b, _) = get(&u, &[("range", "bytes=-5")]).await;
    assert_eq!((s, b.as_str()), (206, &body[95..]));
    let (s, _, h) = get(&u, &[("range", "bytes=200-")]).await;
    assert_eq!(s, 416);
    assert_eq!(h["content-range"], "bytes */100");
    let r = common::client().head(&u).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "100");
    assert_eq!(cache_status(&r), "strata; hit");
    assert_eq!(origin.hits("/bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_and_prefix_needs_the_admin_token() {
    let origin = Origin::start().await;
    for p in ["/a/1", "/a/2", "/b/1"] {
        origin.route(p, reply("max-age=60", p));
    }
    let (node, url, _t) = start_edge(
        &origin,
        "[[edge.tokens]]\nname = \"ops\"\nscopes = [\"admin\"]\nvalue = \"purge-secret-123\"\n",
    );
    for p in ["/a/1", "/a/2", "/b/1"] {
        get(&format!("{url}{p}"), &[]).await;
    }
    let purge = |body: serde_json::Value, token: Option<&'static str>| {
        let mut rb = common::client()
            .post(format!("{}/admin/purge", node.admin_url()))
            .json(&body);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    let r = purge(serde_json::json!({"url": format!("{url}/a/1")}), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = purge(
        serde_json::json!({"url": format!("{url}/a/1")}),
        Some("purge-secret-123"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    get(&format!("{url}/a/1"), &[]).await;
    assert_eq!(origin.hits("/a/1"), 2);
    let (_, _, h) = get(&format!("{url}/a/2"), &[]).await;
    assert_eq!(cs(&h), "strata; hit");
    let r = purge(
        serde_json::json!({"prefix": format!("{url}/a/")}),
        Some("purge-secret-123"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    get(&format!("{url}/a/2"), &[]).await;
    assert_eq!(origin.hits("/a/2"), 2);
    let (_, _, h) = get(&format!("{url}/b/1"), &[]).await;
    assert_eq!(cs(&h), "strata; hit", "other prefixes stay");
    // The PURGE method is off by default.
    let r = common::client()
        .request(
            reqwest::Method::from_bytes(b"PURGE").unwrap(),
            format!("{url}/b/1"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let (_, _, h) = get(&format!("{url}/b/1"), &[]).await;
    assert_eq!(cs(&h), "strata; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upstream_responses_are_never_stored() {
    let origin = Origin::start().await;
    let mut bad = reply("max-age=60", "x");
    bad.kind = Kind::Malformed;
    origin.route("/bad", bad);
    let mut reset = reply("max-age=60", &"r".repeat(10_000));
    reset.kind = Kind::ResetMidBody;
    origin.route("/reset", reset);
    let (_node, url, _t) = start_edge(&origin, "");
    let (s, _, _) = get(&format!("{url}/bad"), &[]).await;
    assert_eq!(s, 502);
    let (s, _, _) = get(&format!("{url}/bad"), &[]).await;
    assert_eq!(s, 502);
    assert_eq!(origin.hits("/bad"), 2);
    let r = common::client()
        .get(format!("{url}/reset"))
        .send()
        .await
        .unwrap();
    let complete = match r.text().await {
        Ok(b) => b.len() == 10_000,
        Err(_) => false,
    };
    assert!(
        !complete,
        "a truncated body is never passed off as complete"
    );
    origin.route("/reset", reply("max-age=60", "now whole"));
    let (s, b, _) = get(&format!("{url}/reset"), &[]).await;
    assert_eq!((s, b.as_str()), (200, "now whole"));
    assert_eq!(
        origin.hits("/reset"),
        2,
        "the truncated response was not stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_response_leaves_the_edge_healthy() {
    let origin = Origin::start().await;
    let big = "z".repeat(2 << 20);
    let mut r = reply("max-age=60", &big);
    r.delay = Duration::from_millis(600);
    origin.route("/big", r);
    let (node, url, _t) = start_edge(&origin, "");
    let addr = node.listening["edge"];
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut b = [0u8; 100];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    } // dropped mid-body
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: y\r\n\r\n")
            .await
            .unwrap();
        // Let the edge read the request (a socket closed before that is never dispatched),
        // then hang up while the origin is still thinking (it answers after 600 ms).
        tokio::time::sleep(Duration::from_millis(200)).await;
    } // dropped before the origin even answered
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = common::client()
        .get(format!("{url}/big"))
        .header("host", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(cache_status(&r), "strata; hit");
    assert_eq!(r.text().await.unwrap().len(), big.len());
    let r = common::client()
        .get(format!("{url}/big"))
        .header("host", "y")
        .send()
        .await
        .unwrap();
    assert_eq!(
        cache_status(&r),
        "strata; hit",
        "the fill finished although its client left (hits {})",
        origin.hits("/big")
    );
    assert_eq!(origin.hits("/big"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_is_negotiated_and_stored_per_coding() {
    use std::io::Read;
    let origin = Origin::start().await;
    let text = "hello compressible world. ".repeat(200);
    origin.route("/t", reply("max-age=60", &text));
    let (_node, url, _t) = start_edge(&origin, "");
    let u = format!("{url}/t");
    let fetch = |ae: &'static str| {
        let u = u.clone();
        async move {
            let r = common::client()
                .get(&u)
                .header("accept-encoding", ae)
                .send()
                .await
                .unwrap();
            let h = r.headers().clone();
            (h, r.bytes().await.unwrap())
        }
    };
    let (h, gz) = fetch("gzip, deflate").await;
    assert_eq!(h["content-encoding"], "gzip");
    assert!(h["vary"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("accept-encoding"));
    assert_eq!(
        origin.last_header("/t", "accept-encoding").as_deref(),
        Some("gzip")
    );
    let mut out = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, text);
    assert!(gz.len() < text.len() / 5);
    let (h, br) = fetch("br, gzip").await;
    assert_eq!(h["content-encoding"], "br");
    let mut out = String::new();
    brotli::Decompressor::new(&br[..], 4096)
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, text);
    let (h, plain) = fetch("identity").await;
    assert!(h.get("content-encoding").is_none());
    assert_eq!(plain.len(), text.len());
    let (h, _) = fetch("deflate, gzip").await;
    assert_eq!(h["cache-status"], "strata; hit", "gzip variant reused");
    assert_eq!(origin.hits("/t"), 3);

    // A body too small to compress is one object for every client, without
    // `Vary: Accept-Encoding` (cache-tests vary-match expects the origin's Vary as is).
    let mut small = reply("max-age=60", "tiny");
    small.headers.push(("vary".into(), "Foo".into()));
    origin.route("/small", small);
    let get_small = |ae: &'static str| {
        let u = format!("{url}/small");
        async move {
            let r = common::client()
                .get(&u)
                .header("accept-encoding", ae)
                .header("foo", "1")
                .send()
                .await
                .unwrap();
            let h = r.headers().clone();
            (h, r.text().await.unwrap())
        }
    };
    let (h, b) = get_small("gzip").await;
    assert_eq!((h["vary"].to_str().unwrap(), b.as_str()), ("Foo", "tiny"));
    assert!(h.get("content-encoding").is_none());
    let (h, b) = get_small("identity").await;
    assert_eq!(
        (h["cache-status"].to_str().unwrap(), b.as_str()),
        ("strata; hit", "tiny")
    );
    assert_eq!(origin.hits("/small"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let origin = Origin::start().await;
    origin.route("/swr", reply("max-age=1, stale-while-revalidate=30", "old"));
    let (_node, url, _t) = start_edge(&origin, "");
    get(&format!("{url}/swr"), &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut r = reply("max-age=60", "new");
    r.delay = Duration::from_millis(300);
    origin.route("/swr", r);
    for _ in 0..5 {
        let (_, b, h) = get(&format!("{url}/swr"), &[]).await;
        assert_eq!(b, "old");
        assert!(cs(&h).contains("stale-while-revalidate"), "{h:?}");
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, b, h) = get(&format!("{url}/swr"), &[]).await;
    assert_eq!((b.as_str(), cs(&h).as_str()), ("new", "strata; hit"));
    assert_eq!(origin.hits("/swr"), 2, "one background refresh");
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

async fn h2_get(send: &mut H2Sender, uri: &str) -> (u16, String, String) {
    use http_body_util::BodyExt;
    let req = http::Request::get(uri)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let cs = resp.headers()["cache-status"].to_str().unwrap().to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), cs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_h2_and_sni_through_the_edge_with_live_certificate_reload() {
    let origin = Origin::start().await;
    origin.route("/tls", reply("max-age=60", "over tls"));
    let certs = tempfile::tempdir().unwrap();
    let ca = make_certs(
        certs.path(),
        &[("a", "a.test"), ("b", "b.test"), ("a2", "a.test")],
    );
    let p = |f: &str| certs.path().join(f).display().to_string();
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", sni = [{{ names = [\"b.test\"], cert = \"{}\", key = \"{}\" }}] }}",
        p("a.pem"),
        p("a.key"),
        p("b.pem"),
        p("b.key")
    );
    let (node, _, _t) = start_edge(&origin, &tls);
    let addr = node.listening["edge"];

    // HTTP/2 by ALPN, the default certificate; the second request is a cache hit.
    let (stream, cert, proto) = tls_connect(addr, Some(&ca), "a.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(proto.as_deref(), Some(&b"h2"[..]));
    assert_eq!(cert, pem_der(&certs.path().join("a.pem")));
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (s, b, cs1) = h2_get(&mut h2, "https://a.test/tls").await;
    assert_eq!((s, b.as_str()), (200, "over tls"), "{cs1}");
    assert!(cs1.contains("stored"), "{cs1}");
    let (_, b, cs2) = h2_get(&mut h2, "https://a.test/tls").await;
    assert_eq!((b.as_str(), cs2.as_str()), ("over tls", "strata; hit"));

    // SNI b.test gets b's certificate; HTTP/1.1 by ALPN shares the same cache entry.
    let (stream, cert, proto) = tls_connect(addr, Some(&ca), "b.test", &[b"http/1.1"]).await;
    assert_eq!(proto.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(cert, pem_der(&certs.path().join("b.pem")));
    let (mut h1, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/tls")
        .header("host", "a.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = h1.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["cache-status"], "strata; hit");
    assert_eq!(origin.hits("/tls"), 1);

    // Certificates reload live: new handshakes get the new one, open connections go on.
    let text = std::fs::read_to_string(&node.config).unwrap();
    let text = text
        .replace(&p("a.pem"), &p("a2.pem"))
        .replace(&p("a.key"), &p("a2.key"));
    std::fs::write(&node.config, text).unwrap();
    let report: serde_json::Value = common::client()
        .post(format!("{}/admin/reload", node.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["applied"], true, "{report}");
    let (_, cert, _) = tls_connect(addr, Some(&ca), "a.test", &[b"h2"]).await;
    assert_eq!(cert, pem_der(&certs.path().join("a2.pem")));
    let (s, _, _) = h2_get(&mut h2, "https://a.test/tls").await;
    assert_eq!(
        s, 200,
        "the connection opened before the reload still serves"
    );

    // A reload with a broken certificate is refused and changes nothing.
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(certs.path().join("bad.pem"), "not a certificate").unwrap();
    std::fs::write(&node.config, text.replace(&p("a2.pem"), &p("bad.pem"))).unwrap();
    let report: serde_json::Value = common::client()
        .post(format!("{}/admin/reload", node.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["applied"], false, "{report}");
    let (_, cert, _) = tls_connect(addr, Some(&ca), "a.test", &[b"h2"]).await;
    assert_eq!(cert, pem_der(&certs.path().join("a2.pem")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_admin_listener_on_an_edge_only_node_needs_the_admin_token() {
    let origin = Origin::start().await;
    origin.route("/k", reply("max-age=60", "kept"));
    let tmp = tempfile::tempdir().unwrap();
    let base = format!(
        "[node]\nname = \"edge-exposed\"\ndata_dir = \"{}\"\nadmin = \"0.0.0.0:0\"\n\n[edge]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"{}\"]\n",
        tmp.path().join("data").display(),
        origin.addr
    );
    // Without an admin token the node refuses to start.
    let path = tmp.path().join("open.toml");
    std::fs::write(&path, &base).unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("node.admin"), "{err}");

    let text = format!(
        "{base}\n[[edge.tokens]]\nname = \"ops\"\nscopes = [\"admin\"]\nvalue = \"edge-admin-secret-1\"\n"
    );
    let node = Node::start_with(tmp.path(), &text);
    let url = format!("http://{}", node.listening["edge"]);
    let (_, b, _) = get(&format!("{url}/k"), &[]).await;
    assert_eq!(b, "kept");
    let admin = node.admin_url();
    let c = common::client();
    for (method, path) in [
        (reqwest::Method::GET, "/admin/status"),
        (reqwest::Method::GET, "/metrics"),
        (reqwest::Method::POST, "/admin/reload"),
        (reqwest::Method::POST, "/admin/purge"),
    ] {
        let r = c
            .request(method.clone(), format!("{admin}{path}"))
            .json(&serde_json::json!({"prefix": "/"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path} without a token");
        let r = c
            .request(method.clone(), format!("{admin}{path}"))
            .bearer_auth("wrong-token-000000")
            .json(&serde_json::json!({"prefix": "/"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path} with a wrong token");
    }
    // Nothing was purged; the cached object is still served.
    let (_, b, h) = get(&format!("{url}/k"), &[]).await;
    assert_eq!((b.as_str(), cs(&h).as_str()), ("kept", "strata; hit"));
    let r = c
        .get(format!("{admin}/admin/status"))
        .bearer_auth("edge-admin-secret-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let status: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status["components"]["edge"]["hits"], 1, "{status}");
    // Health checks stay open for load balancers.
    let r = c.get(format!("{admin}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

async fn reload(node: &Node) -> serde_json::Value {
    common::client()
        .post(format!("{}/admin/reload", node.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rules_and_sizes_reload_under_load_without_failed_requests() {
    let origin = Origin::start().await;
    let body = "x".repeat(1000);
    for i in 0..40 {
        origin.route(&format!("/r/{i}"), reply("max-age=60", &body));
    }
    let big = "y".repeat(3000);
    origin.route("/big1", reply("max-age=60", &big));
    origin.route("/big2", reply("max-age=60", &big));
    let sizes = |max: &str, obj: &str| {
        format!("cache = {{ max_bytes = \"{max}\", max_object_size = \"{obj}\" }}\n")
    };
    let (node, url, _t) = start_edge(&origin, &sizes("1MiB", "64KiB"));
    let (_, _, h) = get(&format!("{url}/big1"), &[]).await;
    assert!(cs(&h).contains("stored"), "{h:?}");

    for i in 0..40 {
        get(&format!("{url}/r/{i}"), &[]).await;
    }
    // Steady load from four clients over 40 URLs, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (url, stop, done) = (url.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let c = common::client();
                let mut failed = Vec::new();
                let mut i = w;
                while !stop.load(Ordering::SeqCst) {
                    match c.get(format!("{url}/r/{}", i % 40)).send().await {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(b) if b.len() == 1000 => {
                                done.fetch_add(1, Ordering::SeqCst);
                            }
                            other => failed.push(format!("body {other:?}")),
                        },
                        other => failed.push(format!("{other:?}")),
                    }
                    i += 1;
                }
                failed
            })
        })
        .collect();
    // Lets the load make `n` more successful requests (bounded wait).
    let more = |n: usize| {
        let done = done.clone();
        async move {
            let target = done.load(Ordering::SeqCst) + n;
            for _ in 0..400 {
                if done.load(Ordering::SeqCst) >= target {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("the load stalled");
        }
    };
    more(20).await;
    let before = node.status().await["components"]["edge"].clone();
    assert!(before["bytes"].as_u64().unwrap() > 30_000, "{before}");

    // Shrink the cache and tighten the object size limit, live.
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(
        &node.config,
        text.replace(&sizes("1MiB", "64KiB"), &sizes("16KiB", "2KiB")),
    )
    .unwrap();
    let report = reload(&node).await;
    assert_eq!(report["applied"], true, "{report}");
    let after = node.status().await["components"]["edge"].clone();
    assert_eq!(after["capacity_bytes"], 16 * 1024, "{after}");
    assert!(after["bytes"].as_u64().unwrap() <= 16 * 1024, "{after}");
    assert!(
        after["evictions"].as_u64().unwrap() > before["evictions"].as_u64().unwrap(),
        "shrinking evicted: {before} → {after}"
    );
    // The new object size rule applies to the next fill.
    let (s, b, h) = get(&format!("{url}/big2"), &[]).await;
    assert_eq!((s, b.len()), (200, 3000));
    assert!(cs(&h).contains("detail=too-large"), "{h:?}");
    more(20).await;

    // And back up again.
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(
        &node.config,
        text.replace(&sizes("16KiB", "2KiB"), &sizes("1MiB", "64KiB")),
    )
    .unwrap();
    assert_eq!(reload(&node).await["applied"], true);
    more(20).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        let failed = t.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests across reloads: {failed:?}"
        );
    }
    for i in 0..40 {
        get(&format!("{url}/r/{i}"), &[]).await;
    }
    let end = node.status().await["components"]["edge"].clone();
    assert_eq!(end["capacity_bytes"], 1024 * 1024, "{end}");
    assert!(end["bytes"].as_u64().unwrap() > 30_000, "refilled: {end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_is_skipped_and_counters_are_reported() {
    let origin = Origin::start().await;
    for i in 0..6 {
        origin.route(&format!("/u/{i}"), reply("private", "fine"));
    }
    origin.route("/c", reply("max-age=60", "counted"));
    // A port nothing listens on: bind, note it, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[node]\nname = \"edge-two\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\n\n[edge]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"{dead}\", \"{}\"]\nupstream_down_for = \"30s\"\npurge_method = true\n",
        tmp.path().join("data").display(),
        origin.addr
    );
    let node = Node::start_with(tmp.path(), &text);
    let url = format!("http://{}", node.listening["edge"]);
    for i in 0..6 {
        let (s, b, _) = get(&format!("{url}/u/{i}"), &[]).await;
        assert_eq!((s, b.as_str()), (200, "fine"), "request {i}");
    }
    let st = node.status().await["components"]["edge"].clone();
    let ups = st["upstreams"].as_array().unwrap();
    let healthy = |a: SocketAddr| {
        ups.iter()
            .find(|u| u.to_string().contains(&a.to_string()))
            .map(|u| u["healthy"].clone())
    };
    assert_eq!(healthy(dead), Some(serde_json::json!(false)), "{st}");
    assert_eq!(healthy(origin.addr), Some(serde_json::json!(true)), "{st}");

    get(&format!("{url}/c"), &[]).await;
    get(&format!("{url}/c"), &[]).await;
    let st = node.status().await["components"]["edge"].clone();
    assert_eq!(
        (st["hits"].as_u64(), st["stored"].as_u64()),
        (Some(1), Some(1)),
        "{st}"
    );
    assert!(st["hit_ratio"].as_f64().unwrap() > 0.0, "{st}");
    assert_eq!(st["bytes_from_cache"], 7, "{st}");
    let metrics = node.metrics_text().await;
    for name in [
        "strata_edge_hits 1",
        "strata_edge_misses",
        "strata_edge_stale_served",
        "strata_edge_revalidations",
        "strata_edge_coalesced_waits",
        "strata_edge_bytes_from_cache 7",
        "strata_edge_entries",
        "strata_edge_bytes",
        "strata_edge_evictions",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    // With purge_method on, PURGE drops the URL.
    let r = common::client()
        .request(
            reqwest::Method::from_bytes(b"PURGE").unwrap(),
            format!("{url}/c"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, b, h) = get(&format!("{url}/c"), &[]).await;
    assert_eq!(b, "counted");
    assert!(cs(&h).contains("fwd=uri-miss"), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_for_an_uncacheable_response_each_go_upstream() {
    let origin = Origin::start().await;
    let mut r = reply("private", "for you only");
    r.delay = Duration::from_millis(200);
    origin.route("/p", r);
    let (_node, url, _t) = start_edge(&origin, "");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let u = format!("{url}/p");
            tokio::spawn(async move { get(&u, &[]).await })
        })
        .collect();
    for t in tasks {
        let (s, b, h) = t.await.unwrap();
        assert_eq!((s, b.as_str()), (200, "for you only"));
        assert!(!cs(&h).contains("hit"), "{h:?}");
    }
    assert_eq!(
        origin.hits("/p"),
        10,
        "nobody got another client's private answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_probes_take_a_failing_upstream_out_and_bring_it_back() {
    let (a, b) = (Origin::start().await, Origin::start().await);
    a.route("/health", reply("no-store", "ok"));
    let mut sick = reply("no-store", "sick");
    sick.status = 503;
    b.route("/health", sick);
    for o in [&a, &b] {
        for i in 0..8 {
            o.route(&format!("/h/{i}"), reply("private", "fine"));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "[node]\nname = \"edge-probes\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\n\n[edge]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"{}\", \"{}\"]\nhealth = {{ path = \"/health\", interval = \"50ms\", timeout = \"1s\", rise = 1, fall = 1 }}\n",
        tmp.path().join("data").display(),
        a.addr,
        b.addr
    );
    let node = Node::start_with(tmp.path(), &text);
    let url = format!("http://{}", node.listening["edge"]);
    let wait_probed = |want_b: bool| {
        let node = &node;
        let b_addr = b.addr.to_string();
        async move {
            for _ in 0..100 {
                let st = node.status().await["components"]["edge"].clone();
                let b_up = st["upstreams"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|u| u["upstream"] == b_addr.as_str())
                    .map(|u| u["probes_pass"] == true);
                if b_up == Some(want_b) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("upstream b never became probes_pass={want_b}");
        }
    };
    wait_probed(false).await;
    for i in 0..8 {
        let (s, _, _) = get(&format!("{url}/h/{i}"), &[]).await;
        assert_eq!(s, 200);
    }
    let on_b: usize = (0..8).map(|i| b.hits(&format!("/h/{i}"))).sum();
    assert_eq!(on_b, 0, "a probed-down upstream takes no requests");
    b.route("/health", reply("no-store", "ok"));
    wait_probed(true).await;
    for i in 0..8 {
        get(&format!("{url}/h/{i}"), &[]).await;
    }
    let on_b: usize = (0..8).map(|i| b.hits(&format!("/h/{i}"))).sum();
    assert!(on_b >= 3, "back in rotation: {on_b} of 8 on b");
}

/// Reads from `sock` until `buf` holds `needle`, or gives up after 10 s.
async fn read_until(sock: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, sock.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn early_hints_are_relayed_before_the_final_response_and_never_cached() {
    let origin = Origin::start().await;
    let go_on = Arc::new(tokio::sync::Notify::new());
    let hint = "HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload; as=style\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n";
    let mut r = reply("max-age=600", "final body");
    r.interim = Some((hint.into(), go_on.clone()));
    origin.route("/hinted", r);
    let (node, url, _tmp) = start_edge(&origin, "");
    let edge: SocketAddr = node.listening["edge"];

    let mut sock = TcpStream::connect(edge).await.unwrap();
    sock.write_all(b"GET /hinted HTTP/1.1\r\nHost: site\r\n\r\n")
        .await
        .unwrap();
    // The hint arrives while the origin still holds the final response back.
    let mut buf = Vec::new();
    assert!(read_until(&mut sock, &mut buf, b"\r\n\r\n").await, "no 103");
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 103 early hints\r\n"), "{head}");
    assert!(
        head.contains("link: </s.css>; rel=preload; as=style"),
        "{head}"
    );
    assert!(
        !head.contains("x-hop"),
        "hop-by-hop fields are not relayed: {head}"
    );
    go_on.notify_one();
    assert!(read_until(&mut sock, &mut buf, b"final body").await);
    let all = String::from_utf8_lossy(&buf).into_owned();
    let final_at = all.find("HTTP/1.1 200").expect("final response");
    assert!(all[final_at..].contains("strata; fwd=uri-miss"), "{all}");

    // The same connection goes on cleanly; the stored response is the final one alone.
    buf.clear();
    sock.write_all(b"GET /hinted HTTP/1.1\r\nHost: site\r\n\r\n")
        .await
        .unwrap();
    assert!(read_until(&mut sock, &mut buf, b"final body").await);
    let again = String::from_utf8_lossy(&buf).into_owned();
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert!(again.contains("strata; hit"), "{again}");
    assert!(!again.contains("103"), "{again}");
    assert_eq!(origin.hits("/hinted"), 1);

    // HTTP/1.0 clients must not get 1xx responses; they get the final one.
    let mut r = reply("no-store", "old client");
    r.interim = Some((hint.into(), go_on.clone()));
    origin.route("/hinted10", r);
    let mut sock10 = TcpStream::connect(edge).await.unwrap();
    sock10
        .write_all(b"GET /hinted10 HTTP/1.0\r\nHost: site\r\n\r\n")
        .await
        .unwrap();
    // Wait until the origin has sent its hint, then let it finish.
    while origin.hits("/hinted10") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    go_on.notify_one();
    let mut buf10 = Vec::new();
    assert!(read_until(&mut sock10, &mut buf10, b"old client").await);
    let text = String::from_utf8_lossy(&buf10).into_owned();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(!text.contains(" 103 "), "{text}");

    // An ordinary client (reqwest skips 1xx) sees just the final response.
    go_on.notify_one();
    let (status, body, h) = get(&format!("{url}/hinted10"), &[]).await;
    assert_eq!((status, body.as_str()), (200, "old client"));
    assert!(cs(&h).contains("fwd=uri-miss"), "{}", cs(&h));
}
