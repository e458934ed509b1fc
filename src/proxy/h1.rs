//! HTTP/1.1 heads for the proxy's fast path, as bytes: parse a client's request head and
//! write the upstream head with the same header hygiene as [`super::headers::to_upstream`];
//! parse an upstream response head and write the downstream head with the hygiene of
//! [`super::headers::to_downstream`]; find where a chunked body ends. Pure: no I/O.
//!
//! The fast path covers the common exchange (an HTTP/1.1 request in origin form whose body,
//! if any, has a `Content-Length` and already arrived with the head). Anything else —
//! upgrades, `Expect`, chunked request bodies, HTTP/1.0, absolute-form targets, heads that
//! do not parse — is [`RequestPrep::Fallback`]: the caller hands the connection to the
//! general (hyper) path, which answers it and every later request on that connection.

use http::Method;

use super::headers::{self, Forwarding};

/// Most header fields the fast path parses; a head with more goes the general way.
pub const MAX_HEADERS: usize = 64;
/// Largest request body the fast path forwards from its read buffer.
pub const MAX_FAST_BODY: usize = 64 << 10;
/// Largest response head accepted from an upstream.
pub const MAX_RESPONSE_HEAD: usize = 64 << 10;

/// What [`prepare_request`] made of the bytes read so far.
#[derive(Debug)]
pub enum RequestPrep {
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path: hand the connection and its bytes to the general path.
    Fallback,
    /// The upstream head (and body) are written to `out`.
    Ready(RequestInfo),
}

/// A request the fast path forwards.
#[derive(Debug)]
pub struct RequestInfo {
    /// Bytes of the client's head; the body follows.
    pub head_len: usize,
    /// Bytes of the body (already in the buffer, and appended to `out`).
    pub body_len: usize,
    /// The method.
    pub method: Method,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
    /// Where the request id sits in `out` (sent upstream, echoed downstream).
    pub request_id: std::ops::Range<usize>,
    /// Where the request target sits in the input (for the access log).
    pub target: std::ops::Range<usize>,
    /// The hash of the sticky-session key, when the caller's key function found one.
    pub key: Option<u64>,
}

/// Parses the request head at the start of `input`; when the fast path can take it,
/// writes the upstream request (head plus body) to `out`. `key` hashes the sticky-session
/// key from the fields.
pub fn prepare_request(
    input: &[u8],
    fwd: &Forwarding,
    key: impl FnOnce(&[httparse::Header<'_>]) -> Option<u64>,
    out: &mut Vec<u8>,
) -> RequestPrep {
    // Uninitialised field slots: initialising 64 of them per head costs more than parsing.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(input, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return RequestPrep::Partial,
        Err(_) => return RequestPrep::Fallback,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return RequestPrep::Fallback;
    };
    if !path.starts_with('/') {
        return RequestPrep::Fallback;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return RequestPrep::Fallback;
    };
    if method == Method::CONNECT {
        return RequestPrep::Fallback;
    }
    let fields: &[httparse::Header] = req.headers;

    // First pass: what the head asks for, and which fields `Connection` names.
    let mut close = false;
    let mut named: [&[u8]; 8] = [b""; 8];
    let mut n_named = 0;
    let mut body_len: Option<usize> = None;
    let mut host: Option<&[u8]> = None;
    let mut te_kept: Option<bool> = None;
    let mut id: Option<&[u8]> = None;
    let mut folded = [false; 3]; // x-forwarded-for, forwarded, via: the client sent some
    for f in fields {
        let name = f.name.as_bytes();
        match classify(name) {
            Field::Connection => {
                for t in list_tokens(f.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        return RequestPrep::Fallback;
                    } else if !t.eq_ignore_ascii_case(b"keep-alive") {
                        if n_named == named.len() {
                            return RequestPrep::Fallback;
                        }
                        named[n_named] = t;
                        n_named += 1;
                    }
                }
            }
            Field::TransferEncoding | Field::Upgrade | Field::Expect => {
                return RequestPrep::Fallback
            }
            Field::ContentLength => {
                let Some(n) = parse_length(f.value) else {
                    return RequestPrep::Fallback;
                };
                if body_len.is_some_and(|b| b != n) {
                    return RequestPrep::Fallback;
                }
                body_len = Some(n);
            }
            Field::Host => {
                if host.is_some() {
                    return RequestPrep::Fallback;
                }
                host = Some(f.value);
            }
            Field::Te => {
                te_kept.get_or_insert(f.value.eq_ignore_ascii_case(b"trailers"));
            }
            Field::RequestId => {
                id.get_or_insert(f.value);
            }
            Field::ForwardedFor => folded[0] = true,
            Field::Forwarded => folded[1] = true,
            Field::Via => folded[2] = true,
            _ => {}
        }
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > MAX_FAST_BODY || input.len() - head_len < body_len {
        return RequestPrep::Fallback;
    }
    let id_valid = id.is_some_and(valid_request_id);
    let te_kept = te_kept.unwrap_or(false);

    out.reserve(head_len + body_len + 256);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut request_id = 0..0;
    for f in fields {
        let name = f.name.as_bytes();
        let keep = match classify(name) {
            Field::HopByHop
            | Field::Connection
            | Field::TransferEncoding
            | Field::Upgrade
            | Field::Expect
            | Field::ForwardedFor
            | Field::Forwarded
            | Field::Via
            | Field::ForwardedProto => false,
            Field::ForwardedHost => host.is_none(),
            Field::Te => te_kept,
            Field::RequestId => id_valid,
            _ => !named[..n_named]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name)),
        };
        if keep {
            if request_id.is_empty() && id_valid && name.eq_ignore_ascii_case(b"x-request-id") {
                let start = out.len() + name.len() + 2;
                request_id = start..start + f.value.len();
            }
            push_field(out, name, f.value);
        }
    }
    let fold = |out: &mut Vec<u8>, name: &[u8], ours: &[u8], any: bool| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        if any {
            for f in fields {
                if f.name.as_bytes().eq_ignore_ascii_case(name) && is_visible(f.value) {
                    out.extend_from_slice(f.value);
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(ours);
    };
    fold(out, b"x-forwarded-for", fwd.xff().as_bytes(), folded[0]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b"x-forwarded-proto: ");
    out.extend_from_slice(fwd.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(h) = host {
        push_field(out, b"x-forwarded-host", h);
    }
    fold(out, b"forwarded", fwd.element().as_bytes(), folded[1]);
    if let Some(h) = host.filter(|h| is_visible(h)) {
        out.extend_from_slice(b";host=");
        headers::push_token_or_quoted_bytes(out, h);
    }
    out.extend_from_slice(b"\r\n");
    fold(out, b"via", b"1.1 strata", folded[2]);
    out.extend_from_slice(b"\r\n");
    if !id_valid {
        out.extend_from_slice(b"x-request-id: ");
        let start = out.len();
        headers::write_request_id(out);
        request_id = start..out.len();
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&input[head_len..head_len + body_len]);

    let key = key(fields);
    RequestPrep::Ready(RequestInfo {
        head_len,
        body_len,
        method,
        close,
        request_id,
        target: offset_in(input, path.as_bytes()),
        key,
    })
}

/// How an upstream response's body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, passed through as it is.
    Chunked,
    /// Everything until the upstream closes; the client's connection closes after it.
    UntilClose,
}

/// What [`prepare_response`] made of the upstream bytes read so far.
#[derive(Debug)]
pub enum ResponsePrep {
    /// The head is not complete yet.
    Partial,
    /// The upstream spoke something a proxy must not pass on.
    Invalid(&'static str),
    /// The downstream head is written to `out`.
    Ready(ResponseInfo),
}

/// An upstream response head, understood.
#[derive(Debug)]
pub struct ResponseInfo {
    /// Bytes of the upstream head.
    pub head_len: usize,
    /// The status code.
    pub status: u16,
    /// How the body is delimited.
    pub framing: Framing,
    /// The upstream connection cannot carry another request.
    pub upstream_close: bool,
    /// A 1xx head: forward it and read the next head.
    pub informational: bool,
}

/// Parses the response head at the start of `input` and writes the downstream head to
/// `out`. `head_request` says the request was HEAD (no body follows whatever the fields
/// say); `close` adds `Connection: close` (the client's connection ends after this).
pub fn prepare_response(
    input: &[u8],
    head_request: bool,
    request_id: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) -> ResponsePrep {
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let head_len = match config.parse_response_with_uninit_headers(&mut resp, input, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() > MAX_RESPONSE_HEAD => {
            return ResponsePrep::Invalid("the backend's response head is too large")
        }
        Ok(httparse::Status::Partial) => return ResponsePrep::Partial,
        Err(_) => return ResponsePrep::Invalid("the backend sent a malformed response head"),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return ResponsePrep::Invalid("the backend sent a malformed response head");
    };
    if status == 101 {
        return ResponsePrep::Invalid("the backend switched protocols unasked");
    }
    let fields: &[httparse::Header] = resp.headers;
    let informational = (100..200).contains(&status);

    let mut upstream_close = version == 0;
    let mut named: [&[u8]; 8] = [b""; 8];
    let mut n_named = 0;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut has_id = false;
    let mut has_via = false;
    // Each field's class, for the second pass (a field is classified once).
    let mut classes = [Field::Other; MAX_HEADERS];
    for (f, class) in fields.iter().zip(classes.iter_mut()) {
        *class = classify(f.name.as_bytes());
        match *class {
            Field::Connection => {
                for t in list_tokens(f.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        upstream_close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        upstream_close &= version != 0;
                    } else if n_named < named.len() {
                        named[n_named] = t;
                        n_named += 1;
                    }
                }
            }
            Field::TransferEncoding => {
                if chunked || !f.value.eq_ignore_ascii_case(b"chunked") {
                    return ResponsePrep::Invalid(
                        "the backend used a transfer coding other than chunked",
                    );
                }
                chunked = true;
            }
            Field::ContentLength => {
                let Some(n) = parse_length(f.value) else {
                    return ResponsePrep::Invalid("the backend sent a bad Content-Length");
                };
                if length.is_some_and(|l| l != n as u64) {
                    return ResponsePrep::Invalid("the backend sent conflicting Content-Lengths");
                }
                length = Some(n as u64);
            }
            Field::RequestId => has_id = true,
            Field::Via => has_via = true,
            _ => {}
        }
    }
    let framing = if head_request || informational || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        upstream_close = true;
        Framing::UntilClose
    };

    out.reserve(head_len + 128);
    out.extend_from_slice(b"HTTP/1.1 ");
    let code = http::StatusCode::from_u16(status).ok();
    match code {
        Some(c) => out.extend_from_slice(c.as_str().as_bytes()),
        None => out.extend_from_slice(b"502"),
    }
    out.push(b' ');
    match code.and_then(|c| c.canonical_reason()) {
        Some(r) => out.extend_from_slice(r.as_bytes()),
        None => out.extend_from_slice(resp.reason.unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    // Kept fields go out as they came: a run of consecutive ones whose lines end in CRLF is
    // one copy from the input (a field at a time was ~1k instructions per response). A
    // line ending in a bare LF, which httparse accepts, is written anew with CRLF.
    let base = input.as_ptr() as usize;
    let line_start = |f: &httparse::Header<'_>| f.name.as_ptr() as usize - base;
    let head = &input[..head_len];
    let blank_line = if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\r\n") {
        head_len - 2
    } else {
        head_len - 1
    };
    let mut run: Option<usize> = None;
    for (i, (f, class)) in fields.iter().zip(classes).enumerate() {
        let name = f.name.as_bytes();
        let keep = match class {
            Field::HopByHop | Field::Connection | Field::Upgrade | Field::Te | Field::Via => false,
            // The chunked framing passes through byte for byte, so its field stays.
            Field::TransferEncoding => framing == Framing::Chunked,
            _ => !named[..n_named]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name)),
        };
        let start = line_start(f);
        let end = fields.get(i + 1).map_or(blank_line, line_start);
        if keep && input[..end].ends_with(b"\r\n") {
            run.get_or_insert(start);
            continue;
        }
        if let Some(from) = run.take() {
            out.extend_from_slice(&input[from..start]);
        }
        if keep {
            push_field(out, name, f.value);
        }
    }
    if let Some(from) = run {
        out.extend_from_slice(&input[from..blank_line]);
    }
    out.extend_from_slice(b"via: ");
    if has_via {
        for f in fields {
            if f.name.eq_ignore_ascii_case("via") && is_visible(f.value) {
                out.extend_from_slice(f.value);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(b"1.1 strata\r\n");
    if !has_id {
        push_field(out, b"x-request-id", request_id);
    }
    if !informational && (close || framing == Framing::UntilClose) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    ResponsePrep::Ready(ResponseInfo {
        head_len,
        status,
        framing,
        upstream_close,
        informational,
    })
}

/// Follows a chunked body (RFC 9112 §7.1) through the bytes fed to it, to find where the
/// message ends (after the last chunk and the trailer section). The bytes themselves pass
/// through unchanged.
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: Chunk,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    LineStart,
    Trailer,
    EndLf,
    Done,
}

/// The chunked framing is broken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

impl ChunkedEnd {
    /// Consumes `bytes`; returns how many of them belong to the message when it ends
    /// within them, `None` when more are needed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 15 {
                            return Err(ChunkError);
                        }
                        let d = (b as char).to_digit(16).ok_or(ChunkError)?;
                        self.size = self.size * 16 + u64::from(d);
                        self.digits += 1;
                        Chunk::Size
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => Chunk::Ext,
                    b'\r' if self.digits > 0 => Chunk::SizeLf,
                    _ => return Err(ChunkError),
                },
                Chunk::Ext => match b {
                    b'\r' => Chunk::SizeLf,
                    b'\n' => return Err(ChunkError),
                    _ => Chunk::Ext,
                },
                Chunk::SizeLf if b == b'\n' => {
                    self.digits = 0;
                    if self.size == 0 {
                        Chunk::LineStart
                    } else {
                        Chunk::Data
                    }
                }
                Chunk::Data => {
                    let take = self.size.min((bytes.len() - i) as u64);
                    self.size -= take;
                    i += take as usize;
                    if self.size == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size,
                Chunk::LineStart => match b {
                    b'\r' => Chunk::EndLf,
                    b'\n' => return Err(ChunkError),
                    _ => Chunk::Trailer,
                },
                Chunk::Trailer => match b {
                    b'\n' => Chunk::LineStart,
                    _ => Chunk::Trailer,
                },
                Chunk::EndLf if b == b'\n' => {
                    self.state = Chunk::Done;
                    return Ok(Some(i + 1));
                }
                _ => return Err(ChunkError),
            };
            i += 1;
        }
        Ok(None)
    }
}

/// Writes a local answer (problem+json) as an HTTP/1.1 response.
pub fn write_problem(
    out: &mut Vec<u8>,
    problem: &crate::http::problem::Problem,
    request_id: &[u8],
    close: bool,
) {
    let json = serde_json::to_vec(problem).unwrap_or_else(|_| b"{}".to_vec());
    let code = http::StatusCode::from_u16(problem.status)
        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(code.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/problem+json\r\ncontent-length: ");
    out.extend_from_slice(json.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(s) = problem.retry_after {
        push_field(out, b"retry-after", s.to_string().as_bytes());
    }
    push_field(out, b"x-request-id", request_id);
    push_field(
        out,
        b"date",
        httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes(),
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&json);
}

/// Header fields the hygiene rules single out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    HopByHop,
    Connection,
    TransferEncoding,
    Upgrade,
    Expect,
    Te,
    ContentLength,
    Host,
    RequestId,
    ForwardedFor,
    ForwardedProto,
    ForwardedHost,
    Forwarded,
    Via,
    Other,
}

fn classify(name: &[u8]) -> Field {
    // Dispatch on length first: most fields are none of these and leave after one compare.
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if is("te") => Field::Te,
        3 if is("via") => Field::Via,
        4 if is("host") => Field::Host,
        6 if is("expect") => Field::Expect,
        7 if is("upgrade") => Field::Upgrade,
        9 if is("forwarded") => Field::Forwarded,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::HopByHop,
        12 if is("x-request-id") => Field::RequestId,
        14 if is("content-length") => Field::ContentLength,
        15 if is("x-forwarded-for") => Field::ForwardedFor,
        16 if is("x-forwarded-host") => Field::ForwardedHost,
        16 if is("proxy-connection") => Field::HopByHop,
        17 if is("transfer-encoding") => Field::TransferEncoding,
        17 if is("x-forwarded-proto") => Field::ForwardedProto,
        18 if is("proxy-authenticate") => Field::HopByHop,
        19 if is("proxy-authorization") => Field::HopByHop,
        _ => Field::Other,
    }
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The comma-separated tokens of a list-valued field, trimmed, empty ones skipped.
fn list_tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// A decimal `Content-Length` (no sign, no spaces inside, at most 18 digits).
fn parse_length(v: &[u8]) -> Option<usize> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// What `HeaderValue::to_str` accepts: visible ASCII, space and tab.
fn is_visible(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn valid_request_id(v: &[u8]) -> bool {
    headers::valid_request_id_bytes(v)
}

/// The range `part` (a sub-slice of `whole`) occupies in `whole`.
fn offset_in(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    let start = start.min(whole.len());
    start..(start + part.len()).min(whole.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderName, HeaderValue, Version};

    fn fwd() -> Forwarding {
        Forwarding::new("10.1.2.3".parse().unwrap(), "http")
    }

    fn no_key(_: &[httparse::Header<'_>]) -> Option<u64> {
        None
    }

    /// The header map an upstream head parses into (names lowercased), minus the id.
    fn parsed(head: &[u8]) -> (String, HeaderMap) {
        let mut f = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut f);
        assert!(r.parse(head).unwrap().is_complete());
        let line = format!("{} {}", r.method.unwrap(), r.path.unwrap());
        let mut m = HeaderMap::new();
        for h in r.headers.iter() {
            m.append(
                HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        (line, m)
    }

    fn fast(req: &str) -> (RequestInfo, Vec<u8>) {
        let mut out = Vec::new();
        match prepare_request(req.as_bytes(), &fwd(), no_key, &mut out) {
            RequestPrep::Ready(i) => (i, out),
            other => panic!("{other:?} for {req:?}"),
        }
    }

    /// The fast path's upstream head says what the general path's header map says.
    #[test]
    fn upstream_head_matches_the_general_hygiene() {
        let cases: &[&[(&str, &str)]] = &[
            &[("Host", "example.com")],
            &[],
            &[
                ("host", "shop.example:8443"),
                ("x-forwarded-for", "192.0.2.1"),
                ("X-Forwarded-For", "192.0.2.9"),
                ("forwarded", "for=192.0.2.1"),
                ("via", "1.1 cdn"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil"),
            ],
            &[
                ("host", "example.com"),
                ("connection", "keep-alive, X-Secret"),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("te", "gzip"),
                ("proxy-authorization", "Basic x"),
                ("proxy-connection", "keep-alive"),
                ("trailer", "x-checksum"),
                ("x-kept", "yes"),
                ("x-request-id", "abc-123"),
            ],
            &[("te", "trailers"), ("x-request-id", &"x".repeat(500))],
            &[("x-forwarded-host", "kept-without-host"), ("cookie", "a=1")],
        ];
        for fields in cases {
            let mut text = String::from("GET /p?q=1 HTTP/1.1\r\n");
            let mut map = HeaderMap::new();
            for (k, v) in *fields {
                text.push_str(&format!("{k}: {v}\r\n"));
                map.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            text.push_str("\r\n");
            let (info, out) = fast(&text);
            assert_eq!(info.head_len, text.len());
            let (line, mut got) = parsed(&out);
            assert_eq!(line, "GET /p?q=1");
            let (_, id) = headers::to_upstream(&mut map, Version::HTTP_11, None, &fwd());
            assert_eq!(got.get_all("x-request-id").iter().count(), 1, "{text}");
            assert_eq!(
                &out[info.request_id.clone()],
                got["x-request-id"].as_bytes()
            );
            let passed = fields
                .iter()
                .any(|(k, v)| *k == "x-request-id" && v.len() <= 128);
            if passed {
                assert_eq!(got["x-request-id"], id);
            } else {
                assert_ne!(got["x-request-id"], id, "a new id each time");
            }
            got.remove("x-request-id");
            map.remove("x-request-id");
            for name in map.keys().chain(got.keys()) {
                let a: Vec<_> = map.get_all(name).iter().collect();
                let b: Vec<_> = got.get_all(name).iter().collect();
                assert_eq!(a, b, "field {name} for {text:?}");
            }
        }
    }

    #[test]
    fn bodies_close_and_partial_heads() {
        let (i, out) =
            fast("POST /x HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabcNEXT");
        assert_eq!((i.body_len, i.close), (3, true));
        assert!(out.ends_with(b"\r\n\r\nabc"));
        let mut out = Vec::new();
        let partial = prepare_request(b"GET / HTTP/1.1\r\nHost: x\r\n", &fwd(), no_key, &mut out);
        assert!(matches!(partial, RequestPrep::Partial));
        // The body has not arrived yet: the general path streams it.
        let later = prepare_request(
            b"PUT / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab",
            &fwd(),
            no_key,
            &mut out,
        );
        assert!(matches!(later, RequestPrep::Fallback));
    }

    #[test]
    fn unusual_requests_go_the_general_way() {
        for req in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "BLAH\x01 / HTTP/9\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            let mut out = Vec::new();
            let p = prepare_request(req.as_bytes(), &fwd(), no_key, &mut out);
            assert!(matches!(p, RequestPrep::Fallback), "{req:?}: {p:?}");
        }
    }

    #[test]
    fn key_function_sees_the_fields() {
        let mut out = Vec::new();
        let key = |f: &[httparse::Header<'_>]| {
            f.iter()
                .find(|h| h.name.eq_ignore_ascii_case("x-user"))
                .map(|h| h.value.len() as u64)
        };
        let RequestPrep::Ready(i) = prepare_request(
            b"GET / HTTP/1.1\r\nX-User: alice\r\n\r\n",
            &fwd(),
            key,
            &mut out,
        ) else {
            panic!()
        };
        assert_eq!(i.key, Some(5));
    }

    fn response(text: &str, head: bool, close: bool) -> (ResponseInfo, String) {
        let mut out = Vec::new();
        match prepare_response(text.as_bytes(), head, b"rid", close, &mut out) {
            ResponsePrep::Ready(i) => (i, String::from_utf8(out).unwrap()),
            other => panic!("{other:?} for {text:?}"),
        }
    }

    #[test]
    fn response_heads_framing_and_hygiene() {
        let (i, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-internal\r\nx-internal: 1\r\nKeep-Alive: timeout=5\r\nContent-Type: text/plain\r\n\r\nhello",
            false,
            false,
        );
        assert_eq!(i.framing, Framing::Length(5));
        assert!(!i.upstream_close);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\nvia: 1.1 strata\r\nx-request-id: rid\r\n\r\n"
        );
        let (i, out) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nVia: 1.0 app\r\nX-Request-Id: theirs\r\n\r\n", false, true);
        assert_eq!(i.framing, Framing::Chunked);
        assert!(out.contains("Transfer-Encoding: chunked\r\n"));
        assert!(out.contains("via: 1.0 app, 1.1 strata\r\n"));
        assert!(out.contains("X-Request-Id: theirs\r\n") && !out.contains("rid"));
        assert!(out.ends_with("connection: close\r\n\r\n"));
        let (i, out) = response("HTTP/1.0 200 OK\r\n\r\nbody until close", false, false);
        assert_eq!((i.framing, i.upstream_close), (Framing::UntilClose, true));
        assert!(out.contains("connection: close"));
        let (i, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, false);
        assert_eq!(i.framing, Framing::Empty);
        let (i, _) = response("HTTP/1.1 304 Not Modified\r\n\r\n", false, false);
        assert_eq!(i.framing, Framing::Empty);
        let (i, out) = response(
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            false,
            true,
        );
        assert!(i.informational && !out.contains("connection: close"));
        let (i, _) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
            false,
            false,
        );
        assert!(i.upstream_close);
        // Kept fields are copied as they came; lines ending in a bare LF get CRLF.
        let (_, out) = response(
            "HTTP/1.1 200 OK\r\nA: 1\r\nB:2  \nKeep-Alive: x\r\nC: 3\r\nD: 4\n\n",
            false,
            false,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nvia: 1.1 strata\r\nx-request-id: rid\r\nconnection: close\r\n\r\n"
        );
        let (_, out) = response("HTTP/1.1 200 OK\r\nA: 1\r\nB:  2\r\n\n", false, false);
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\nA: 1\r\nB:  2\r\nvia:"),
            "{out:?}"
        );
        for bad in [
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 2OO OK\r\n\r\n",
        ] {
            let mut out = Vec::new();
            let p = prepare_response(bad.as_bytes(), false, b"rid", false, &mut out);
            assert!(matches!(p, ResponsePrep::Invalid(_)), "{bad:?}: {p:?}");
        }
    }

    proptest::proptest! {
        /// Whatever mix of fields and line endings a backend sends, the client gets exactly
        /// the end-to-end fields, in order, with their values, every line ending in CRLF.
        #[test]
        fn response_fields_pass_in_order_with_crlf(
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "A", "x-b", "Content-Type", "Keep-Alive", "TE", "Upgrade",
                        "proxy-connection", "Date", "ETag",
                    ]),
                    "[!-~]([ -~]{0,12}[!-~])?",
                    proptest::bool::ANY,
                    "[ ]{0,2}",
                ),
                0..8,
            ),
            blank_crlf in proptest::bool::ANY,
        ) {
            let mut text = String::from("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n");
            for (name, value, crlf, pad) in &fields {
                text += &format!("{name}:{pad}{value}{pad}{}", if *crlf { "\r\n" } else { "\n" });
            }
            text += if blank_crlf { "\r\n" } else { "\n" };
            let (_, out) = response(&text, false, false);
            proptest::prop_assert!(out.ends_with("\r\n\r\n"));
            proptest::prop_assert!(!out.replace("\r\n", "").contains('\n'), "bare LF in {:?}", out);
            let mut h = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut h);
            proptest::prop_assert!(r.parse(out.as_bytes()).is_ok());
            let got: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|f| (f.name.to_owned(), String::from_utf8_lossy(f.value).into_owned()))
                .filter(|(n, _)| n != "via" && n != "x-request-id")
                .collect();
            let hop = ["Keep-Alive", "TE", "Upgrade", "proxy-connection"];
            let mut want = vec![("Content-Length".to_owned(), "0".to_owned())];
            want.extend(
                fields
                    .iter()
                    .filter(|(n, ..)| !hop.contains(n))
                    .map(|(n, v, ..)| (n.to_string(), v.clone())),
            );
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn chunked_end_is_found_across_any_split() {
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n";
        for split in 0..body.len() {
            let mut c = ChunkedEnd::default();
            let first = c.feed(&body[..split]).unwrap();
            assert_eq!(first, None, "split {split}");
            let rest = c.feed(&body[split..]).unwrap();
            assert_eq!(rest, Some(body.len() - split), "split {split}");
        }
        let mut c = ChunkedEnd::default();
        assert_eq!(c.feed(b"0\r\n\r\nEXTRA").unwrap(), Some(5));
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert_eq!(ChunkedEnd::default().feed(bad), Err(ChunkError), "{bad:?}");
        }
    }

    #[test]
    fn problems_are_complete_responses() {
        let mut out = Vec::new();
        let p = crate::http::problem::Problem::new(http::StatusCode::BAD_GATEWAY, "no");
        write_problem(&mut out, &p, b"rid", false);
        let mut f = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut f);
        let n = r.parse(&out).unwrap().unwrap();
        assert_eq!(r.code, Some(502));
        let len: usize = r
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(out.len() - n, len);
        let v: serde_json::Value = serde_json::from_slice(&out[n..]).unwrap();
        assert_eq!(v["status"], 502);
    }
}
