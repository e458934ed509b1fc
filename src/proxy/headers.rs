//! Header hygiene for a request on its way upstream and a response on its way back: strip
//! hop-by-hop fields, say who forwarded it (`X-Forwarded-*`, `Forwarded`, `Via`), carry a
//! request id. Pure functions over a [`HeaderMap`], tested without sockets.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Version};

/// The request id header: passed on when the client sent a sane one, created otherwise.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop fields (RFC 9110 §7.6.1) always removed. `TE` and `Upgrade` are handled
/// separately; `Trailer` is end-to-end (it names the trailer fields, and hyper only sends
/// trailers that it names), so it is kept.
static HOP_BY_HOP: [&HeaderName; 6] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TRANSFER_ENCODING,
];

/// Longest client-supplied request id passed on; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// Who is forwarding and for whom: what the forwarding headers say. Made once per client
/// connection, so the common case (no forwarding headers from the client) copies
/// pre-rendered values instead of formatting per request.
#[derive(Clone, Debug)]
pub struct Forwarding {
    /// The client's address as this proxy saw it.
    pub client: IpAddr,
    /// `"http"` or `"https"`: how the client reached this proxy.
    pub proto: &'static str,
    /// The client's address as `X-Forwarded-For` writes it.
    xff: HeaderValue,
    /// `for=<client>;proto=<proto>`, the `Forwarded` element without a host.
    element: HeaderValue,
}

impl Forwarding {
    /// The forwarding facts of a connection from `client` over `proto`.
    pub fn new(client: IpAddr, proto: &'static str) -> Self {
        let element = format!("for={};proto={proto}", ip_text(client, true));
        Forwarding {
            client,
            proto,
            xff: owned_value(ip_text(client, false)),
            element: owned_value(element),
        }
    }

    /// The client's address as `X-Forwarded-For` writes it.
    pub fn xff(&self) -> &HeaderValue {
        &self.xff
    }

    /// The `Forwarded` element without a host: `for=<client>;proto=<proto>`.
    pub fn element(&self) -> &HeaderValue {
        &self.element
    }
}

/// A header value that takes over `s` without copying (the text is ours and valid).
fn owned_value(s: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(s))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Rewrites request headers for the upstream hop. Returns the `Upgrade` value when the
/// request asks for a protocol upgrade (kept, with `Connection: upgrade`), and the request
/// id (sent upstream, and echoed to the client).
pub fn to_upstream(
    headers: &mut HeaderMap,
    version: Version,
    authority: Option<&str>,
    fwd: &Forwarding,
) -> (Option<HeaderValue>, HeaderValue) {
    // Room for the fields added below, so the map grows once, not field by field.
    headers.reserve(8);
    let upgrade = upgrade_requested(headers, version);
    strip_hop_by_hop(headers);
    let keep_te = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !keep_te {
        headers.remove(header::TE);
    }
    headers.remove(header::UPGRADE);
    // The proxy answers `Expect: 100-continue` itself: the client gets `100 Continue` as soon
    // as the body is needed, which is when the upstream exchange starts.
    headers.remove(header::EXPECT);
    if let Some(up) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, up.clone());
    }

    // HTTP/2 carries the host in :authority; the HTTP/1.1 hop needs a Host field.
    if !headers.contains_key(header::HOST) {
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a).ok()) {
            headers.insert(header::HOST, v);
        }
    }
    let host = headers.get(header::HOST).cloned();

    append_value(headers, &X_FORWARDED_FOR, &fwd.xff);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(fwd.proto),
    );
    if let Some(h) = &host {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
    match host.as_ref().and_then(|h| h.to_str().ok()) {
        Some(h) => {
            let mut element = String::with_capacity(fwd.element.len() + h.len() + 8);
            element.push_str(fwd.element.to_str().unwrap_or(""));
            element.push_str(";host=");
            push_token_or_quoted(&mut element, h);
            append_value(headers, &FORWARDED, &owned_value(element));
        }
        None => append_value(headers, &FORWARDED, &fwd.element),
    }
    append_via(headers, version);

    let id = match headers.get(&X_REQUEST_ID) {
        Some(v) if valid_request_id(v) => v.clone(),
        _ => {
            let v = new_request_id();
            headers.insert(X_REQUEST_ID.clone(), v.clone());
            v
        }
    };
    (upgrade, id)
}

/// Rewrites response headers for the downstream hop: strips hop-by-hop fields (keeping the
/// upgrade handshake of a `101`), adds `Via`, echoes the request id.
pub fn to_downstream(headers: &mut HeaderMap, switching: bool, request_id: &HeaderValue) {
    let upgrade = if switching {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(headers);
    headers.remove(header::UPGRADE);
    headers.remove(header::TE);
    if let Some(up) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, up);
    }
    append_via(headers, Version::HTTP_11);
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    }
}

/// True when the method may be repeated without changing the outcome (RFC 9110 §9.2.2),
/// so a request that failed after it was sent may be retried.
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The `Upgrade` value when this HTTP/1.1 request asks to switch protocols.
fn upgrade_requested(headers: &HeaderMap, version: Version) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Removes `Connection`, every field it names, and the fixed hop-by-hop list.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // Names listed in Connection are rare beyond keep-alive/close/upgrade, so this Vec
        // almost never allocates.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(tokens)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !HOP_BY_HOP.contains(&n) && n != header::UPGRADE && n != header::TE)
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

/// The comma-separated tokens of a list-valued field.
fn tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Appends `item` to a list-valued field, folding existing lines into one. Without an
/// existing field this is a reference-counted copy of `item`, no allocation.
fn append_value(headers: &mut HeaderMap, name: &HeaderName, item: &HeaderValue) {
    if !headers.contains_key(name) {
        headers.insert(name.clone(), item.clone());
        return;
    }
    let mut joined = String::new();
    for v in headers.get_all(name) {
        if let Ok(s) = v.to_str() {
            joined.push_str(s);
            joined.push_str(", ");
        }
    }
    joined.push_str(item.to_str().unwrap_or(""));
    headers.insert(name.clone(), owned_value(joined));
}

fn append_via(headers: &mut HeaderMap, version: Version) {
    let ours = match version {
        Version::HTTP_10 => "1.0 strata",
        Version::HTTP_2 => "2 strata",
        _ => "1.1 strata",
    };
    append_value(headers, &header::VIA, &HeaderValue::from_static(ours));
}

/// An address as text; `Forwarded` wants IPv6 quoted and bracketed (RFC 7239 §6).
fn ip_text(ip: IpAddr, forwarded: bool) -> String {
    match ip {
        IpAddr::V6(v6) if forwarded => format!("\"[{v6}]\""),
        IpAddr::V6(v6) => v6.to_string(),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// [`push_token_or_quoted`] for a byte buffer (the fast path's heads). Appends in place
/// and classifies bytes by table: a temporary string here cost the balancer an allocation
/// and two reallocations per request (callgrind: ~6 % of its instructions), and UTF-8
/// validation plus a per-byte `match` another ~4 %.
pub fn push_token_or_quoted_bytes(out: &mut Vec<u8>, value: &[u8]) {
    token_or_quoted(value, |piece| out.extend_from_slice(piece));
}

/// Appends a `Forwarded` parameter value: a token if it is one, else a quoted string.
fn push_token_or_quoted(out: &mut String, value: &str) {
    // Pieces are split next to ASCII bytes only, so each is whole UTF-8.
    token_or_quoted(value.as_bytes(), |piece| {
        out.push_str(std::str::from_utf8(piece).unwrap_or(""))
    });
}

/// Hands `push` a `Forwarded` parameter value in pieces: the value itself if it is a
/// token, else the value as a quoted string (RFC 7230 §3.2.6), `"` and `\` escaped.
fn token_or_quoted(value: &[u8], mut push: impl FnMut(&[u8])) {
    if !value.is_empty() && value.iter().all(|&b| TCHAR[usize::from(b)]) {
        push(value);
        return;
    }
    push(b"\"");
    let mut rest = value;
    while let Some(at) = rest.iter().position(|&b| b == b'"' || b == b'\\') {
        push(&rest[..at]);
        push(b"\\");
        push(&rest[at..at + 1]);
        rest = &rest[at + 1..];
    }
    push(rest);
    push(b"\"");
}

/// The `tchar`s of RFC 7230 §3.2.6, what a token is made of, by byte value.
static TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

fn valid_request_id(v: &HeaderValue) -> bool {
    valid_request_id_bytes(v.as_bytes())
}

/// Whether a client's request id is passed on: 1 to 128 visible ASCII characters.
pub fn valid_request_id_bytes(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic())
}

/// A new request id: a random per-process prefix and a counter — unique, cheap, sortable
/// within a process.
fn new_request_id() -> HeaderValue {
    let mut v = Vec::with_capacity(32);
    write_request_id(&mut v);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Appends a new request id (see [`to_upstream`]) to `out`, without formatting machinery:
/// the fast path writes it straight into the upstream head.
pub fn write_request_id(out: &mut Vec<u8>) {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = *PREFIX.get_or_init(rand::random::<u64>) >> 16;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    push_hex(out, prefix, 12);
    out.push(b'-');
    push_hex(out, n, 1);
}

/// `v` in lowercase hex, zero-padded to at least `width` digits (at most 16); written
/// whole, not a `push` (and its capacity check) per digit.
fn push_hex(out: &mut Vec<u8>, v: u64, width: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (16 - v.leading_zeros() as usize / 4)
        .max(width)
        .clamp(1, 16);
    let mut hex = [0u8; 16];
    for (i, d) in hex[..digits].iter_mut().rev().enumerate() {
        *d = DIGITS[((v >> (i * 4)) & 0xf) as usize];
    }
    out.extend_from_slice(&hex[..digits]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition: a token as is, else quoted with `"` and `\` escaped.
    fn quoted_by_chars(value: &str) -> String {
        let token = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if token {
            return value.to_string();
        }
        let mut out = String::from('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    #[test]
    fn forwarded_values_are_tokens_or_escaped_quoted_strings() {
        for (value, want) in [
            ("example.com", "example.com"),
            ("127.0.0.1:8080", "\"127.0.0.1:8080\""),
            ("[::1]:80", "\"[::1]:80\""),
            ("a\"b\\c\"", "\"a\\\"b\\\\c\\\"\""),
            ("", "\"\""),
        ] {
            let mut s = String::new();
            push_token_or_quoted(&mut s, value);
            assert_eq!(s, want);
            let mut b = b"for=".to_vec();
            push_token_or_quoted_bytes(&mut b, value.as_bytes());
            assert_eq!(b, [b"for=", want.as_bytes()].concat());
        }
    }

    proptest::proptest! {
        #[test]
        fn quoting_in_pieces_matches_quoting_by_character(value in "[ -~]{0,40}") {
            let mut s = String::new();
            push_token_or_quoted(&mut s, &value);
            proptest::prop_assert_eq!(s, quoted_by_chars(&value));
        }
    }

    fn fwd() -> &'static Forwarding {
        static F: OnceLock<Forwarding> = OnceLock::new();
        F.get_or_init(|| Forwarding::new("10.1.2.3".parse().unwrap(), "http"))
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("host", "example.com"),
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("trailer", "x-checksum"),
            ("x-kept", "yes"),
        ]);
        let (up, _) = to_upstream(&mut h, Version::HTTP_11, None, fwd());
        assert!(up.is_none(), "Connection does not name upgrade");
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "transfer-encoding",
            "proxy-authorization",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["trailer"], "x-checksum");
        assert_eq!(h["host"], "example.com");
    }

    #[test]
    fn te_trailers_is_kept() {
        let mut h = map(&[("te", "trailers")]);
        to_upstream(&mut h, Version::HTTP_11, None, fwd());
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn upgrade_is_kept_for_upgrades() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "abc"),
        ]);
        let (up, _) = to_upstream(&mut h, Version::HTTP_11, None, fwd());
        assert_eq!(up.unwrap(), "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "abc");
        // HTTP/1.0 cannot upgrade.
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(to_upstream(&mut h, Version::HTTP_10, None, fwd())
            .0
            .is_none());
    }

    #[test]
    fn forwarding_headers_are_appended() {
        let mut h = map(&[
            ("host", "shop.example:8443"),
            ("x-forwarded-for", "192.0.2.1"),
            ("forwarded", "for=192.0.2.1"),
            ("via", "1.1 cdn"),
        ]);
        to_upstream(&mut h, Version::HTTP_11, None, fwd());
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example:8443");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1, for=10.1.2.3;proto=http;host=\"shop.example:8443\""
        );
        assert_eq!(h["via"], "1.1 cdn, 1.1 strata");
    }

    #[test]
    fn ipv6_is_quoted_in_forwarded_and_h2_authority_becomes_host() {
        let mut h = HeaderMap::new();
        let f = Forwarding::new("2001:db8::1".parse().unwrap(), "https");
        to_upstream(&mut h, Version::HTTP_2, Some("example.com"), &f);
        assert_eq!(h["host"], "example.com");
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=example.com"
        );
        assert_eq!(h["via"], "2 strata");
    }

    #[test]
    fn request_id_is_passed_or_created() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        let (_, id) = to_upstream(&mut h, Version::HTTP_11, None, fwd());
        assert_eq!(id, "abc-123");
        let mut h = HeaderMap::new();
        let (_, a) = to_upstream(&mut h, Version::HTTP_11, None, fwd());
        assert_eq!(h["x-request-id"], a);
        let mut h = map(&[("x-request-id", &"x".repeat(500))]);
        let (_, b) = to_upstream(&mut h, Version::HTTP_11, None, fwd());
        assert_ne!(a, b, "ids are unique");
        assert!(b.len() < 40, "an oversized id is replaced");
    }

    #[test]
    fn hex_is_lowercase_and_zero_padded_to_its_width() {
        for (v, width, want) in [
            (0, 1, "0"),
            (0xabc, 1, "abc"),
            (0xabc, 6, "000abc"),
            (u64::MAX, 12, "ffffffffffffffff"),
            (1 << 60, 1, "1000000000000000"),
        ] {
            let mut out = b"id=".to_vec();
            push_hex(&mut out, v, width);
            assert_eq!(out, [b"id=", want.as_bytes()].concat());
        }
    }

    #[test]
    fn expect_is_answered_here_not_forwarded() {
        let mut h = map(&[("expect", "100-continue")]);
        to_upstream(&mut h, Version::HTTP_11, None, fwd());
        assert!(!h.contains_key("expect"));
    }

    #[test]
    fn response_hygiene() {
        let id = HeaderValue::from_static("rid");
        let mut h = map(&[
            ("connection", "close, x-internal"),
            ("x-internal", "1"),
            ("keep-alive", "timeout=5"),
            ("content-type", "text/plain"),
        ]);
        to_downstream(&mut h, false, &id);
        assert!(!h.contains_key("connection") && !h.contains_key("x-internal"));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(h["via"], "1.1 strata");
        assert_eq!(h["x-request-id"], "rid");
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        to_downstream(&mut h, true, &id);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn idempotency() {
        assert!(idempotent(&http::Method::GET));
        assert!(idempotent(&http::Method::PUT));
        assert!(!idempotent(&http::Method::POST));
        assert!(!idempotent(&http::Method::PATCH));
    }
}
