//! The app's HTTP/1.1 fast path for single records: `GET`/`HEAD` and `PUT` of
//! `/api/v1/{collection}/{id}` from plain-HTTP/1.1 clients are parsed, answered and
//! written here, without hyper's server machinery — the same work a cache hit otherwise
//! spends a third of its time on, and a durable PUT a third of its instructions.
//!
//! Only the request *framing* is ours. The answer comes from the same code as on the hyper
//! path ([`App::read_record`]: token check, record cache, storage, conditional requests;
//! [`App::put_record`]: token check, preconditions, JSON checks, the write), and it is
//! counted and logged the same way. A PUT is taken only with one plain `Content-Length`
//! within the app's body limit and [`MAX_FAST_BODY`], and its whole body must arrive within
//! the head timeout. Anything this path does not take (other methods and routes, chunked or
//! larger bodies, a body on a read, `Expect`, `Upgrade`, unusual `Connection` tokens,
//! HTTP/1.0, targets with bytes outside RFC 3986, malformed or oversized heads, h2c) hands
//! the connection to hyper for the rest of its life, with the bytes read so far: hyper then
//! answers exactly as it always did.
//!
//! [`parse_request`] and [`encode_response`] are pure; the connection loop is the I/O edge.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::api::{RecordRead, Written, RECORD_READ_FIELDS, RECORD_WRITE_FIELDS};
use super::cache::CachedRecord;
use super::router::{self, Endpoint};
use super::App;
use crate::config::HttpLimits;
use crate::http::fastio::{self, bufs, push_field, timed, timed_at, HeadLimits};
use crate::http::server::{FastPath, Handoff, Shutdown};

/// Most header fields a fast-path request may have; more go to hyper.
const MAX_FIELDS: usize = 32;

/// Largest PUT body this path takes (and buffers); larger ones stream through hyper.
pub const MAX_FAST_BODY: usize = 16 << 10;

/// A record request this path answers, located in the input buffer.
#[derive(Debug)]
pub struct FastHead {
    /// GET, HEAD or PUT.
    pub method: Method,
    /// The path, within the input.
    pub path: Range<usize>,
    /// The record's collection and id (path segments), within the input.
    pub collection: Range<usize>,
    /// See `collection`.
    pub id: Range<usize>,
    /// The query (after `?`), within the input.
    pub query: Option<Range<usize>>,
    /// The request's fields its handler looks at ([`RECORD_READ_FIELDS`] or
    /// [`RECORD_WRITE_FIELDS`]); the rest are framing (checked here) or ignored, as the
    /// hyper path ignores them.
    pub headers: HeaderMap,
    /// The body (a PUT's; empty for reads), within the input.
    pub body: Range<usize>,
    /// The client asked to close after this response.
    pub close: bool,
}

/// What [`parse_request`] made of the input.
// Lives on the stack for one request; boxing the large variant would allocate per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// A complete record request (head and body).
    Request(FastHead),
    /// The head is not complete yet.
    Partial,
    /// The head of a PUT is complete, its body is not: the request is in flight.
    Body,
    /// Not for this path: hyper serves the connection from here on.
    Fallback,
}

/// Parses the request at the start of `input`; a PUT's body may be at most `max_body`.
pub fn parse_request(input: &[u8], max_body: usize) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Fallback,
    };
    let (method, wanted): (Method, &[HeaderName]) = match req.method {
        Some("GET") => (Method::GET, &RECORD_READ_FIELDS),
        Some("HEAD") => (Method::HEAD, &RECORD_READ_FIELDS),
        Some("PUT") => (Method::PUT, &RECORD_WRITE_FIELDS),
        _ => return Parsed::Fallback,
    };
    let (Some(1), Some(target)) = (req.version, req.path) else {
        return Parsed::Fallback;
    };
    if !target.bytes().all(uri_byte) {
        return Parsed::Fallback;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let Endpoint::Record { collection, id } = router::route(path) else {
        return Parsed::Fallback;
    };
    let mut close = false;
    let mut body_len = None;
    // Usually none of the fields a read looks at is present: `new` allocates nothing.
    let mut headers = HeaderMap::new();
    for f in req.headers.iter() {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            // One plain decimal length, as RFC 9112 § 6.3 allows; anything else (a list,
            // a repeat, a sign) is hyper's to judge.
            let Some(n) = decimal(f.value.trim_ascii()) else {
                return Parsed::Fallback;
            };
            if body_len.replace(n).is_some() {
                return Parsed::Fallback;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parsed::Fallback;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in f.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Parsed::Fallback;
                }
            }
        }
        let Some(field) = wanted
            .iter()
            .find(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        else {
            continue;
        };
        let Ok(value) = HeaderValue::from_bytes(f.value) else {
            return Parsed::Fallback;
        };
        headers.append(field.clone(), value);
    }
    let body_len = match (method == Method::PUT, body_len) {
        (false, None | Some(0)) => 0,
        (true, Some(n)) if n <= max_body => n,
        // A read with a body, a PUT without a length or over the limit.
        _ => return Parsed::Fallback,
    };
    if input.len() - head_len < body_len {
        return Parsed::Body;
    }
    // Path, query, collection and id are subslices of `input`: their addresses give the
    // offsets.
    let at = |s: &str| {
        let start = s.as_ptr() as usize - input.as_ptr() as usize;
        start..start + s.len()
    };
    Parsed::Request(FastHead {
        method,
        path: at(path),
        collection: at(collection),
        id: at(id),
        query: query.map(at),
        headers,
        body: head_len..head_len + body_len,
        close,
    })
}

/// A `Content-Length` value of ASCII digits only, that fits a `usize`.
fn decimal(v: &[u8]) -> Option<usize> {
    if v.is_empty() || v.len() > 15 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// Bytes of an origin-form target this path takes (RFC 3986 pchar, `/`, `?`); hyper judges
/// anything else.
fn uri_byte(b: u8) -> bool {
    const TABLE: [bool; 256] = {
        let mut t = [false; 256];
        let mut i = 0;
        while i < 256 {
            let b = i as u8;
            t[i] = b.is_ascii_alphanumeric();
            i += 1;
        }
        let extra = b"-._~!$&'()*+,;=:@/?%";
        let mut j = 0;
        while j < extra.len() {
            t[extra[j] as usize] = true;
            j += 1;
        }
        t
    };
    TABLE[b as usize]
}

/// Writes the 200 answer to a record read straight from the cached record's pre-made
/// fields: the same bytes [`encode_response`] makes of the hyper path's response.
pub fn encode_hit(
    cached: &CachedRecord,
    cache_status: Option<&HeaderValue>,
    head_only: bool,
    close: bool,
    date: &[u8; 29],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    out.extend_from_slice(&cached.head);
    if let Some(v) = cache_status {
        push_field(out, b"cache-status", v.as_bytes());
    }
    end_head(out, date, close);
    if !head_only {
        out.extend_from_slice(&cached.record.body);
    }
}

/// Writes a response: status line, the response's fields, `Date`, a `Content-Length`
/// unless the status forbids one or the handler set it (a HEAD answer keeps its GET length),
/// `Connection: close` when closing, and the body unless `head_only`.
pub fn encode_response(
    parts: &http::response::Parts,
    body: &[u8],
    head_only: bool,
    close: bool,
    date: &[u8; 29],
    out: &mut Vec<u8>,
) {
    status_line(parts.status, out);
    for (name, value) in &parts.headers {
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let has_length = parts.headers.contains_key(http::header::CONTENT_LENGTH);
    finish(parts.status, has_length, body, head_only, close, date, out);
}

/// Writes the answer to a record write straight from its fields: the same bytes
/// [`encode_response`] makes of [`Written::into_response`], without building a response.
pub fn encode_written(written: &Written<'_>, close: bool, date: &[u8; 29], out: &mut Vec<u8>) {
    status_line(written.status, out);
    written.fields(|name, value| push_field(out, name.as_str().as_bytes(), value));
    let body = written.record.map_or(&b""[..], |r| &r.body[..]);
    finish(written.status, false, body, false, close, date, out);
}

fn status_line(status: StatusCode, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The end of a head after its fields (`Content-Length` unless present or forbidden,
/// `Date`, `Connection: close`), then the body unless `head_only` or forbidden.
fn finish(
    status: StatusCode,
    has_length: bool,
    body: &[u8],
    head_only: bool,
    close: bool,
    date: &[u8; 29],
    out: &mut Vec<u8>,
) {
    let bodiless = status == StatusCode::NOT_MODIFIED || status == StatusCode::NO_CONTENT;
    if !bodiless && !has_length {
        let mut digits = itoa::Buffer::new();
        push_field(out, b"content-length", digits.format(body.len()).as_bytes());
    }
    end_head(out, date, close);
    if !head_only && !bodiless {
        out.extend_from_slice(body);
    }
}

/// Collects a handler's response and writes it with [`encode_response`]; its status, or
/// `None` when its body failed.
async fn encode_general(
    resp: http::Response<crate::http::body::Body>,
    head_only: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Option<u16> {
    let (parts, body) = resp.into_parts();
    let body: Bytes = body.collect().await.ok()?.to_bytes();
    encode_response(&parts, &body, head_only, close, &date_now(), out);
    Some(parts.status.as_u16())
}

/// Appends `Date`, `Connection: close` when closing, and the blank line.
fn end_head(out: &mut Vec<u8>, date: &[u8; 29], close: bool) {
    push_field(out, b"date", date);
    if close {
        push_field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

/// The `Date` value for now, formatted once per second per thread.
fn date_now() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static LAST: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.with(|last| {
        let (at, text) = last.get();
        if at == secs {
            return text;
        }
        let text = crate::http::date::imf_fixdate(secs);
        last.set((secs, text));
        text
    })
}

impl App {
    /// The fast path for this app's plain-HTTP listener with `limits`.
    pub fn fast_path(self: &Arc<Self>, limits: &HttpLimits) -> FastPath {
        fastio::fast_path(self, limits, Self::serve_conn)
    }

    async fn serve_conn(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        shutdown: Shutdown,
        head: HeadLimits,
    ) -> Option<Handoff> {
        let (head_timeout, max_head) = (head.timeout, head.max_bytes);
        // Buffers are taken per request and given back while the connection idles.
        let mut input: Vec<u8> = Vec::new();
        let mut waits = fastio::Waits::new(&shutdown);
        loop {
            if *shutdown.borrow() {
                // Requests may be pipelined behind the last one answered.
                fastio::close_gracefully(client).await;
                return None;
            }
            // The request (a PUT's body too) must be complete by the deadline; an idle
            // connection gets as long.
            let deadline = Instant::now() + head_timeout;
            let mut in_flight = false;
            let head = loop {
                if !input.is_empty() {
                    // The limit as of this request (a reload may change it while idle).
                    let max_body = self.settings.load().max_body.min(MAX_FAST_BODY);
                    match parse_request(&input, max_body) {
                        Parsed::Request(head) => break head,
                        Parsed::Partial if input.len() < max_head => {}
                        Parsed::Body => in_flight = true,
                        Parsed::Partial | Parsed::Fallback => {
                            return Some(Handoff {
                                stream: client,
                                read: input,
                            })
                        }
                    }
                }
                if input.is_empty() {
                    // Wait for the next request without holding a buffer.
                    bufs::give(std::mem::take(&mut input));
                    if waits.request(&client, deadline).await != fastio::Waited::Request {
                        return None;
                    }
                    input = bufs::take();
                }
                input.reserve(1024);
                // Shutting down drops a connection between requests, but a PUT whose body
                // is arriving is in flight: it gets until its deadline, as on hyper's path.
                let read = tokio::select! {
                    biased;
                    r = timed_at(deadline, fastio::read_into(&client, &mut input)) => r,
                    _ = waits.stopping(), if !in_flight => {
                        // A request was on its way: its sender reads the end, not a reset.
                        fastio::close_gracefully(client).await;
                        return None;
                    }
                };
                match read {
                    Some(Ok(n)) if n > 0 => {}
                    // Closed, broken, or too slow with its head or body (slowloris).
                    _ => return None,
                }
            };
            let mut out = bufs::take();
            let written = self.answer(&input, &head, peer, &mut out).await;
            let sent = written
                && matches!(
                    timed(head_timeout, fastio::write_from(&client, &out)).await,
                    Some(Ok(()))
                );
            bufs::give(out);
            if !sent {
                return None;
            }
            if head.close {
                fastio::close_gracefully(client).await;
                return None;
            }
            input.drain(..head.body.end);
            if input.is_empty() {
                bufs::give(std::mem::take(&mut input));
            }
        }
    }

    /// Answers one request into `out`; false when the response could not be produced (its
    /// body failed), so the connection must close.
    async fn answer(
        &self,
        input: &[u8],
        head: &FastHead,
        peer: SocketAddr,
        out: &mut Vec<u8>,
    ) -> bool {
        let started = std::time::Instant::now();
        let (status, counter) = if head.method == Method::PUT {
            (self.answer_put(input, head, out).await, &self.fast_writes)
        } else {
            (self.answer_read(input, head, out).await, &self.fast_reads)
        };
        let Some(status) = status else {
            return false;
        };
        let log_path = self
            .settings
            .load()
            .access_log
            .then(|| text(input, &head.path));
        self.account("record", &head.method, log_path, status, started, peer);
        counter.inc();
        true
    }

    /// A record PUT: written, or refused; its status.
    async fn answer_put(&self, input: &[u8], head: &FastHead, out: &mut Vec<u8>) -> Option<u16> {
        let body = Bytes::copy_from_slice(&input[head.body.clone()]);
        let (collection, id) = (text(input, &head.collection), text(input, &head.id));
        match self.put_record(&head.headers, collection, id, body).await {
            Ok((committed, key)) => {
                let written = Written::new(&committed, &key, StatusCode::CREATED);
                encode_written(&written, head.close, &date_now(), out);
                Some(written.status.as_u16())
            }
            Err(problem) => encode_general(problem.into_response(), false, head.close, out).await,
        }
    }

    /// A record GET or HEAD; its status, or `None` when the answer's body failed.
    async fn answer_read(&self, input: &[u8], head: &FastHead, out: &mut Vec<u8>) -> Option<u16> {
        let read = self
            .read_record(
                &head.headers,
                head.query.as_ref().map(|q| text(input, q)),
                text(input, &head.collection),
                text(input, &head.id),
            )
            .await;
        let head_only = head.method == Method::HEAD;
        match read {
            Ok(RecordRead {
                found: Some(cached),
                not_modified: false,
                cache_status,
                ..
            }) => {
                let date = date_now();
                encode_hit(
                    &cached,
                    cache_status.as_ref(),
                    head_only,
                    head.close,
                    &date,
                    out,
                );
                Some(200)
            }
            other => {
                let resp = match other {
                    Ok(read) => read.into_response(&head.method),
                    Err(problem) => problem.into_response(),
                };
                encode_general(resp, head_only, head.close, out).await
            }
        }
    }
}

/// The part of the input at `r` (parsed as UTF-8 by httparse and the router already).
fn text<'a>(input: &'a [u8], r: &Range<usize>) -> &'a str {
    std::str::from_utf8(&input[r.clone()]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &[u8]) -> FastHead {
        match parse_request(input, 1024) {
            Parsed::Request(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn takes_plain_record_reads() {
        let input =
            b"GET /api/v1/users/42?consistency=strong HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"7\"\r\n\r\nGET";
        let h = read(input);
        assert_eq!(h.method, Method::GET);
        assert_eq!(&input[h.path.clone()], b"/api/v1/users/42");
        assert_eq!(&input[h.query.clone().unwrap()], b"consistency=strong");
        assert_eq!(h.headers["if-none-match"], "\"7\"");
        assert_eq!(h.body, input.len() - 3..input.len() - 3);
        assert!(!h.close);
        let h = read(b"HEAD /api/v1/c/id HTTP/1.1\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.method, Method::HEAD);
        assert!(h.close);
        assert!(h.query.is_none());
    }

    #[test]
    fn takes_puts_with_one_plain_length_within_the_limit() {
        let input = b"PUT /api/v1/c/id HTTP/1.1\r\nContent-Type: application/json\r\nIf-Match: \"4\"\r\nX-Other: 1\r\nContent-Length: 7\r\n\r\n{\"a\":1}GET";
        let h = read(input);
        assert_eq!(h.method, Method::PUT);
        assert_eq!(&input[h.body.clone()], b"{\"a\":1}");
        assert_eq!(h.body.end, input.len() - 3);
        assert_eq!(h.headers["content-type"], "application/json");
        assert_eq!(h.headers["if-match"], "\"4\"");
        assert_eq!(
            h.headers.len(),
            2,
            "only the fields a PUT looks at are kept"
        );
        // The body is still arriving: the request is in flight.
        assert!(matches!(
            parse_request(&input[..input.len() - 6], 1024),
            Parsed::Body
        ));
        // At the limit is fine; one byte over goes to hyper (which answers 413).
        assert!(matches!(parse_request(input, 7), Parsed::Request(_)));
        assert!(matches!(parse_request(input, 6), Parsed::Fallback));
    }

    #[test]
    fn leaves_everything_else_to_hyper() {
        for input in [
            &b"PUT /api/v1/c/id HTTP/1.1\r\n\r\n"[..],
            b"PUT /api/v1/c/id HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"PUT /api/v1/c/id HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            b"PUT /api/v1/c/id HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}",
            b"PUT /api/v1/c/id HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            b"PUT /api/v1/c/id HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"PUT /api/v1/c/id HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
            b"PUT /api/v1/c HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"POST /api/v1/c HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"PATCH /api/v1/c/id HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /api/v1/c HTTP/1.1\r\n\r\n",
            b"GET /index.html HTTP/1.1\r\n\r\n",
            b"GET /api/v1/c/id HTTP/1.0\r\n\r\n",
            b"GET /api/v1/c/id HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /api/v1/c/id HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /api/v1/c/id HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /api/v1/c/id HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET /api/v1/c/{id} HTTP/1.1\r\n\r\n",
            b"GET /api/v1/c/\"x HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /api/v1/c/id HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"\x16\x03\x01garbage",
        ] {
            assert!(
                matches!(parse_request(input, 1024), Parsed::Fallback),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert!(matches!(
            parse_request(b"GET /api/v1/c/id HTTP/1.1\r\nHost: a", 1024),
            Parsed::Partial
        ));
    }

    #[test]
    fn too_many_fields_go_to_hyper() {
        let mut input = b"GET /api/v1/c/id HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_FIELDS {
            input.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        assert!(matches!(parse_request(&input, 1024), Parsed::Fallback));
    }

    fn parts(status: StatusCode, fields: &[(&str, &str)]) -> http::response::Parts {
        let mut b = http::Response::builder().status(status);
        for (k, v) in fields {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn encodes_responses_like_a_server_must() {
        let date = *b"Sat, 28 Nov 2026 17:00:00 GMT";
        let mut out = Vec::new();
        let p = parts(
            StatusCode::OK,
            &[("etag", "\"3\""), ("content-length", "2")],
        );
        encode_response(&p, b"{}", false, false, &date, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\netag: \"3\"\r\ncontent-length: 2\r\ndate: Sat, 28 Nov 2026 17:00:00 GMT\r\n\r\n{}"
        );
        // HEAD keeps the length of the GET, sends no body; a problem gets its length added.
        out.clear();
        let p = parts(
            StatusCode::NOT_FOUND,
            &[("content-type", "application/problem+json")],
        );
        encode_response(&p, b"{\"x\":1}", true, true, &date, &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("content-length: 7\r\n"), "{text}");
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
        // 304: neither a length nor a body.
        out.clear();
        let p = parts(StatusCode::NOT_MODIFIED, &[("etag", "\"3\"")]);
        encode_response(&p, b"", false, false, &date, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[tokio::test]
    async fn a_hit_is_written_as_the_hyper_path_would_answer() {
        let cached = CachedRecord::new(crate::storage::Record {
            body: Bytes::from_static(b"{\"v\":1}"),
            lsn: 17,
            created_ms: 1_700_000_000_000,
            updated_ms: 1_700_000_123_456,
        });
        let date = *b"Sat, 28 Nov 2026 17:00:00 GMT";
        for (status, method, close) in [
            (
                Some(HeaderValue::from_static("strata; hit")),
                Method::GET,
                false,
            ),
            (None, Method::HEAD, true),
        ] {
            let head_only = method == Method::HEAD;
            let mut fast = Vec::new();
            encode_hit(&cached, status.as_ref(), head_only, close, &date, &mut fast);
            let resp = RecordRead::found(cached.clone(), status).into_response(&method);
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let mut general = Vec::new();
            encode_response(&parts, &body, head_only, close, &date, &mut general);
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&general)
            );
        }
    }

    #[tokio::test]
    async fn a_write_is_written_as_the_hyper_path_would_answer() {
        use crate::storage::{Committed, Key, WriteResult};
        let record = crate::storage::Record {
            body: Bytes::from_static(b"{\"v\":2}"),
            lsn: 41,
            created_ms: 1_700_000_000_000,
            updated_ms: 1_700_000_123_456,
        };
        let key = Key::new("notes", "a-1").unwrap();
        let date = *b"Sat, 28 Nov 2026 17:00:00 GMT";
        for (stored, created, close) in [
            (Some(record.clone()), true, false),
            (Some(record), false, true),
            (None, false, false),
        ] {
            let committed = Committed {
                lsn: 41,
                epoch: 3,
                results: vec![WriteResult {
                    record: stored,
                    created,
                }],
            };
            let written = Written::new(&committed, &key, StatusCode::CREATED);
            let mut fast = Vec::new();
            encode_written(&written, close, &date, &mut fast);
            let (parts, body) = written.into_response().into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let mut general = Vec::new();
            encode_response(&parts, &body, false, close, &date, &mut general);
            let fast = String::from_utf8_lossy(&fast);
            assert_eq!(fast, String::from_utf8_lossy(&general));
            let expect = match (created, body.is_empty()) {
                (true, _) => "HTTP/1.1 201 Created\r\n",
                (false, false) => "HTTP/1.1 200 OK\r\n",
                (false, true) => "HTTP/1.1 204 No Content\r\n",
            };
            assert!(fast.starts_with(expect), "{fast}");
            assert_eq!(
                fast.contains("location: /api/v1/notes/a-1\r\n"),
                created,
                "{fast}"
            );
            assert!(fast.contains("strata-lsn: 41\r\n"), "{fast}");
            assert!(
                fast.contains("set-cookie: strata-lsn=3.41; Path=/"),
                "{fast}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = parse_request(&bytes, 1024);
        }

        #[test]
        fn ranges_locate_the_parts(
            collection in "[a-z][a-z0-9]{0,8}",
            id in "[a-zA-Z0-9_~-]{1,12}",
            query in proptest::option::of("[a-z0-9=&]{0,10}"),
        ) {
            let path = format!("/api/v1/{collection}/{id}");
            let target = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let input = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            let h = read(input.as_bytes());
            let text = |r: Range<usize>| input[r].to_owned();
            proptest::prop_assert_eq!(text(h.path), path);
            proptest::prop_assert_eq!(text(h.collection), collection);
            proptest::prop_assert_eq!(text(h.id), id);
            proptest::prop_assert_eq!(h.query.map(text), query);
            proptest::prop_assert_eq!(h.body, input.len()..input.len());
        }
    }
}
