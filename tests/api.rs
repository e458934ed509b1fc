//! The data API suite against stage 1: one process, embedded storage.

mod common;

use common::Node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_suite_embedded() {
    let node = Node::start_app("max_body = \"64KiB\"");
    common::suite::all(&node.url(), 64 << 10).await;
}

/// `strata_app_fast_path_reads_total` from the node's metrics.
async fn fast_reads(node: &Node) -> u64 {
    let text = common::client()
        .get(format!("{}/metrics", node.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("strata_app_fast_path_reads_total "))
        .unwrap_or_else(|| panic!("no fast path counter in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Reads one HTTP/1.1 response (head and Content-Length body) from `s`; `head_only` for
/// answers to HEAD. Returns the head without its `date` line, and the body.
fn read_response(
    s: &mut std::net::TcpStream,
    buf: &mut Vec<u8>,
    head_only: bool,
) -> (String, String) {
    use std::io::Read;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            let body_len = if head_only || head.starts_with("HTTP/1.1 304") {
                0
            } else {
                len
            };
            if buf.len() >= end + 4 + body_len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + body_len]).into_owned();
                buf.drain(..end + 4 + body_len);
                let head = head
                    .lines()
                    .filter(|l| !l.starts_with("date: "))
                    .collect::<Vec<_>>()
                    .join("\n");
                return (head, body);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read");
        assert!(
            n > 0,
            "closed early; have {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
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

    // A write on the same connection hands it to hyper; later reads are hyper's, and they
    // answer exactly as the fast path did.
    s.write_all(
        b"PUT /api/v1/notes/b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    )
    .unwrap();
    let put = read_response(&mut s, &mut buf, false);
    assert!(put.0.starts_with("HTTP/1.1 201"), "{}", put.0);
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
        "hyper served the connection after the PUT"
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
