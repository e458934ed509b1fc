//! The data API suite against stage 1: one process, embedded storage.

mod common;

use common::{read_response, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_suite_embedded() {
    let node = Node::start_app("max_body = \"64KiB\"");
    common::suite::all(&node.url(), 64 << 10).await;
}

/// Reads answered by the app's fast path, from the node's metrics.
async fn fast_reads(node: &Node) -> u64 {
    node.metric("strata_app_fast_path_reads_total").await as u64
}

/// PUTs answered by the app's fast path, from the node's metrics.
async fn fast_writes(node: &Node) -> u64 {
    node.metric("strata_app_fast_path_writes_total").await as u64
}

/// Record reads from plain HTTP/1.1 clients take the app's fast path; everything else goes
/// to hyper, on the same connection from then on. Both must answer alike, byte for byte
/// (bar `Date`), and bad input after fast-path requests is answered by hyper as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_reads_answer_alike_on_the_fast_and_general_paths() {
    use std::io::Write;
    let node = Node::start_app("[app.cache]\nmax_bytes = \"1MiB\"");
    let c = common::client();
    let url = node.url();
    let r = c
        .put(format!("{url}/api/v1/notes/a"))
        .header("content-type", "application/json")
        .body(r#"{"text":"hello"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let addr = node.listening["app"];

    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    // Pipelined in one write: a miss that fills the cache, a hit, a HEAD, a 304, a 404.
    let reads = format!(
        "GET /api/v1/notes/a HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /api/v1/notes/a HTTP/1.1\r\nHost: x\r\n\r\n\
         HEAD /api/v1/notes/a HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /api/v1/notes/a HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n\
         GET /api/v1/notes/missing?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    s.write_all(reads.as_bytes()).unwrap();
    let fill = read_response(&mut s, &mut buf, false);
    let hit = read_response(&mut s, &mut buf, false);
    let head = read_response(&mut s, &mut buf, true);
    let not_modified = read_response(&mut s, &mut buf, false);
    let missing = read_response(&mut s, &mut buf, false);
    assert!(
        fill.0.contains("cache-status: strata; fwd=miss; stored"),
        "{}",
        fill.0
    );
    assert_eq!(fill.1, r#"{"text":"hello"}"#);
    assert!(hit.0.starts_with("HTTP/1.1 200 OK"), "{}", hit.0);
    assert!(hit.0.contains("cache-status: strata; hit"), "{}", hit.0);
    assert_eq!(hit.1, fill.1);
    assert_eq!(head.0, hit.0, "HEAD answers with the GET's fields");
    assert_eq!(head.1, "");
    assert!(
        not_modified.0.starts_with("HTTP/1.1 304"),
        "{}",
        not_modified.0
    );
    assert!(missing.0.starts_with("HTTP/1.1 404"), "{}", missing.0);
    assert!(missing.1.contains("no record"), "{}", missing.1);
    assert_eq!(fast_reads(&node).await, 5, "all five took the fast path");

    // A request the fast path does not take (a POST) hands the connection to hyper; later
    // reads are hyper's, and they answer exactly as the fast path did.
    s.write_all(
        b"POST /api/v1/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    )
    .unwrap();
    let post = read_response(&mut s, &mut buf, false);
    assert!(post.0.starts_with("HTTP/1.1 201"), "{}", post.0);
    s.write_all(
        format!(
            "GET /api/v1/notes/a HTTP/1.1\r\nHost: x\r\n\r\n\
             HEAD /api/v1/notes/a HTTP/1.1\r\nHost: x\r\n\r\n\
             GET /api/v1/notes/a HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n\
             GET /api/v1/notes/missing?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false), hit);
    assert_eq!(read_response(&mut s, &mut buf, true), head);
    assert_eq!(read_response(&mut s, &mut buf, false), not_modified);
    // The miss was remembered (a negative entry): a hit now, the same answer otherwise.
    let missing_again = read_response(&mut s, &mut buf, false);
    assert_eq!(
        missing_again.0,
        missing.0.replace("strata; fwd=miss; stored", "strata; hit")
    );
    assert_eq!(missing_again.1, missing.1);
    assert_eq!(
        fast_reads(&node).await,
        5,
        "hyper served the connection after the POST"
    );

    // Garbage after a fast-path read: hyper answers 400; the data is intact for others.
    let answer = common::raw(
        addr,
        b"GET /api/v1/notes/a HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/notes/a HTTP/1.1\r\nBad Header\r\n\r\n",
        std::time::Duration::from_secs(2),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    assert_eq!(fast_reads(&node).await, 6);
    // `Connection: close` is honoured.
    let answer = common::raw(
        addr,
        b"GET /api/v1/notes/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(5),
    );
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with(r#"{"text":"hello"}"#), "{answer}");
    let r = c.get(format!("{url}/api/v1/notes/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"text":"hello"}"#);
}

/// The PUTs of [`record_puts_answer_alike_on_the_fast_and_general_paths`], on collection
/// `c`: create, replace, a failed If-Match, create-only twice, bad JSON, a wrong type.
fn put_script(c: &str) -> String {
    let put = |id: &str, extra: &str, body: &str| {
        format!(
            "PUT /api/v1/{c}/{id} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let json = "Content-Type: application/json\r\n";
    [
        put("a", json, r#"{"n":1}"#),
        put("a", json, r#"{"n":2}"#),
        put("a", &format!("{json}If-Match: \"1\"\r\n"), r#"{"n":3}"#),
        put("b", &format!("{json}If-None-Match: *\r\n"), r#"{"b":1}"#),
        put("b", &format!("{json}If-None-Match: *\r\n"), r#"{"b":2}"#),
        put("c", json, r#"{"n":"#),
        put("c", "Content-Type: text/plain\r\n", r#"{"n":4}"#),
    ]
    .concat()
}

/// A response reduced to what must match between the paths: the status line, the field
/// names (values carry per-write LSNs), and a problem body with the collection name and
/// numbers (versions) neutral.
fn shape((head, body): (String, String), c: &str) -> (String, Vec<String>, String) {
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("").to_owned();
    let mut names: Vec<String> = lines
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_owned()))
        .collect();
    names.sort();
    let body = if status.starts_with("HTTP/1.1 2") {
        String::new()
    } else {
        body.replace(&format!("{c}/"), "C/")
            .chars()
            .map(|ch| if ch.is_ascii_digit() { '#' } else { ch })
            .collect()
    };
    (status, names, body)
}

/// Record PUTs from plain HTTP/1.1 clients take the app's fast path and answer as hyper's
/// path does; bodies that split, stall, vanish or exceed the fast path's limit are handled
/// without losing or half-writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_puts_answer_alike_on_the_fast_and_general_paths() {
    use std::io::Write;
    use std::time::Duration;
    let node = Node::start_app("max_body = \"64KiB\"\nhttp = { header_read_timeout = \"1s\" }");
    let addr = node.listening["app"];
    let connect = || {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };

    // The script pipelined in one write on the fast path.
    let (mut s, mut buf) = (connect(), Vec::new());
    s.write_all(put_script("fast").as_bytes()).unwrap();
    let fast: Vec<_> = (0..7)
        .map(|_| shape(read_response(&mut s, &mut buf, false), "fast"))
        .collect();
    assert_eq!(fast_writes(&node).await, 7, "all seven took the fast path");
    let statuses: Vec<&str> = fast.iter().map(|r| &r.0[9..12]).collect();
    assert_eq!(statuses, ["201", "200", "412", "201", "412", "400", "415"]);
    assert!(fast[0].1.contains(&"location".to_owned()), "{:?}", fast[0]);
    assert!(fast[5].2.contains("malformed JSON"), "{:?}", fast[5]);

    // The same script through hyper: a chunked PUT (not the fast path's) hands it over.
    let (mut s, mut buf) = (connect(), Vec::new());
    s.write_all(
        b"PUT /api/v1/slow/x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .unwrap();
    let handed = read_response(&mut s, &mut buf, false);
    assert!(handed.0.starts_with("HTTP/1.1 201"), "{}", handed.0);
    s.write_all(put_script("general").as_bytes()).unwrap();
    let general: Vec<_> = (0..7)
        .map(|_| shape(read_response(&mut s, &mut buf, false), "general"))
        .collect();
    assert_eq!(fast, general, "both paths answer alike");
    assert_eq!(
        fast_writes(&node).await,
        7,
        "hyper served the second connection"
    );

    // This node closes idle keep-alive connections after 1 s, about what the raw
    // exchanges below take.
    let c = common::unpooled_client();
    let url = node.url();
    let get = |path: &str| c.get(format!("{url}/api/v1/{path}")).send();
    for coll in ["fast", "general"] {
        let a = get(&format!("{coll}/a")).await.unwrap();
        assert_eq!(a.text().await.unwrap(), r#"{"n":2}"#);
        let b = get(&format!("{coll}/b")).await.unwrap();
        assert_eq!(b.text().await.unwrap(), r#"{"b":1}"#);
        assert_eq!(get(&format!("{coll}/c")).await.unwrap().status(), 404);
    }

    let head = |id: &str, len: usize| {
        format!("PUT /api/v1/edge/{id} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n")
    };
    // A body that arrives in two parts is waited for.
    let (mut s, mut buf) = (connect(), Vec::new());
    s.write_all(format!("{}{{\"sp", head("split", 11)).as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"lit\":1}").unwrap();
    let split = read_response(&mut s, &mut buf, false);
    assert!(split.0.starts_with("HTTP/1.1 201"), "{}", split.0);
    assert_eq!(fast_writes(&node).await, 8);

    // A client that vanishes mid-body writes nothing.
    let mut s = connect();
    s.write_all(format!("{}{{\"gone", head("gone", 12)).as_bytes())
        .unwrap();
    drop(s);
    // One that stalls mid-body past the head timeout is dropped unanswered.
    let mut s = connect();
    s.write_all(format!("{}{{\"sta", head("stalled", 13)).as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = s.write_all(b"lled\":1}");
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    for id in ["gone", "stalled"] {
        assert_eq!(
            get(&format!("edge/{id}")).await.unwrap().status(),
            404,
            "{id}"
        );
    }

    // Larger than the fast path takes, within the app's limit: hyper writes it. Over the
    // app's limit: 413 from hyper, nothing written.
    let big = format!(r#"{{"v":"{}"}}"#, "x".repeat(20 << 10));
    let huge = format!(r#"{{"v":"{}"}}"#, "x".repeat(70 << 10));
    for (id, body, status) in [("big", &big, "201"), ("huge", &huge, "413")] {
        let answer = common::raw(
            addr,
            format!("{}{body}", head(id, body.len())).as_bytes(),
            Duration::from_secs(2),
        );
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{id}: {answer}"
        );
    }
    // A good PUT then garbage on one connection: 201, then hyper's 400.
    let answer = common::raw(
        addr,
        format!(
            "{}{{}}GARBAGE / HTTP/1.1\r\nBad Header\r\n\r\n",
            head("then", 2)
        )
        .as_bytes(),
        Duration::from_secs(2),
    );
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    assert_eq!(fast_writes(&node).await, 9);
    assert_eq!(get("edge/big").await.unwrap().text().await.unwrap(), big);
    assert_eq!(get("edge/huge").await.unwrap().status(), 404);
    assert_eq!(
        get("edge/split").await.unwrap().text().await.unwrap(),
        r#"{"split":1}"#
    );
    assert_eq!(get("edge/then").await.unwrap().text().await.unwrap(), "{}");
}
