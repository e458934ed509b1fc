//! RFC 9111 decisions for a shared cache: may a response be stored, how long is it fresh,
//! how old is it, may it be reused for this request, how does a 304 update it. Pure: every
//! function takes the times it needs (Unix seconds) and header maps, and does no I/O, so
//! each rule is unit-tested below.
//!
//! Choices made where the RFC leaves room, always the safe side for a shared cache:
//! - `CDN-Cache-Control` (RFC 9213), when present, replaces `Cache-Control` for every
//!   decision here; it is stripped before the response goes downstream.
//! - Responses with `Set-Cookie` are stored only when the origin says `public` or
//!   `s-maxage`, and even then the cookie is not kept in the stored copy: only the client
//!   whose request fetched it gets it.
//! - `s-maxage`, `must-revalidate`, `proxy-revalidate` and `no-cache` forbid serving stale,
//!   including `stale-while-revalidate`, `stale-if-error` and a client's `max-stale`.
//! - A request carrying `Authorization` is answered from the cache only when the stored
//!   response says `public`, `s-maxage` or `must-revalidate` (§3.5).
//! - `Vary: *` is never stored (it could never be reused).
//! - Only complete responses to GET (HEAD is answered from GET) are stored: any final
//!   status with explicit freshness (§3), heuristically cacheable ones also without;
//!   partial (206) responses are not.
//! - When the origin cannot be reached at all (connection refused, reset, timed out — not
//!   when it answers 5xx), a stale response may be served for up to `stale_if_unreachable`
//!   (§4.2.4 "disconnected"), unless `must-revalidate`, `proxy-revalidate`, `s-maxage` or
//!   `no-cache` forbid stale use.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::cache_control::{Directives, DELTA_MAX};

/// The header carrying CDN-targeted directives (RFC 9213).
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// Tunables of the heuristics (from config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Fraction of the Last-Modified age used as heuristic freshness (0 disables).
    pub heuristic_fraction: f64,
    /// Cap of the heuristic lifetime, in seconds.
    pub heuristic_max: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heuristic_fraction: 0.1,
            heuristic_max: 86_400,
        }
    }
}

/// Why a response is not stored. Shown in `Cache-Status` as `detail=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotStorable {
    /// Only GET responses are stored.
    #[error("method")]
    Method,
    /// A status code we do not store (or a non-final one).
    #[error("status")]
    Status,
    /// `no-store` on the request or response.
    #[error("no-store")]
    NoStore,
    /// `private` on the response.
    #[error("private")]
    Private,
    /// The request had `Authorization` and the response did not allow sharing it.
    #[error("authorization")]
    Authorization,
    /// `Set-Cookie` without `public` or `s-maxage`.
    #[error("set-cookie")]
    SetCookie,
    /// `Vary: *`.
    #[error("vary-star")]
    VaryStar,
    /// Neither explicit nor heuristic freshness, and nothing to revalidate with.
    #[error("no-freshness")]
    NoFreshness,
}

/// The directives that govern caching of a response: `CDN-Cache-Control` when present,
/// otherwise `Cache-Control`.
pub fn response_directives(headers: &HeaderMap) -> Directives {
    if let Some(cdn) = Directives::parse_targeted(headers.get_all(CDN_CACHE_CONTROL)) {
        if !cdn.is_empty() {
            return cdn;
        }
    }
    Directives::parse_all(headers.get_all(header::CACHE_CONTROL))
}

/// The request's directives (`Cache-Control` only; `Pragma` is obsolete).
pub fn request_directives(headers: &HeaderMap) -> Directives {
    Directives::parse_all(headers.get_all(header::CACHE_CONTROL))
}

/// Status codes that may get heuristic freshness (RFC 9110 §15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Status codes whose semantics this cache understands (RFC 9110 §15), for
/// `must-understand`.
fn understood(status: StatusCode) -> bool {
    heuristically_cacheable(status)
        || matches!(
            status.as_u16(),
            201..=203 | 302 | 303 | 307 | 400..=417 | 421..=422 | 426 | 500..=505
        )
}

/// Final statuses that may be stored with explicit freshness (§3: any final status; a
/// 206 is partial and a 304 is not a complete response, so neither is stored whole).
fn final_storable(status: StatusCode) -> bool {
    status.as_u16() >= 200 && !matches!(status.as_u16(), 206 | 304)
}

/// Whether the response to this GET may be stored (RFC 9111 §3 plus the choices above).
pub fn storable(
    method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    resp_headers: &HeaderMap,
    cc: &Directives,
    response_time: u64,
    settings: &Settings,
) -> Result<(), NotStorable> {
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    if !final_storable(status) || (cc.must_understand && !understood(status)) {
        return Err(NotStorable::Status);
    }
    // `must-understand` with an understood status overrides the response's `no-store`.
    if (cc.no_store && !cc.must_understand) || request_directives(req_headers).no_store {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    if req_headers.contains_key(header::AUTHORIZATION) && !shareable_with_auth(cc) {
        return Err(NotStorable::Authorization);
    }
    if resp_headers.contains_key(header::SET_COOKIE) && !(cc.public || cc.s_maxage.is_some()) {
        return Err(NotStorable::SetCookie);
    }
    if vary_fields(resp_headers).is_err() {
        return Err(NotStorable::VaryStar);
    }
    let explicit =
        cc.s_maxage.is_some() || cc.max_age.is_some() || resp_headers.contains_key(header::EXPIRES);
    if !(explicit || heuristically_cacheable(status) || cc.public) {
        return Err(NotStorable::Status);
    }
    // Storing something that is stale at once is only worth it if it can be revalidated
    // or served on error.
    let lifetime = freshness_lifetime(status, resp_headers, cc, response_time, settings);
    if lifetime == 0 && !has_validator(resp_headers) && cc.stale_if_error.is_none() {
        return Err(NotStorable::NoFreshness);
    }
    Ok(())
}

/// §3.5: responses a shared cache may reuse for requests with `Authorization`.
pub fn shareable_with_auth(cc: &Directives) -> bool {
    cc.public || cc.s_maxage.is_some() || cc.must_revalidate
}

/// Whether the response carries `ETag` or `Last-Modified`.
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// The freshness lifetime in seconds (§4.2.1), heuristic (§4.2.2) when no explicit one.
/// `response_time` stands in for a missing or invalid `Date`.
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    cc: &Directives,
    response_time: u64,
    settings: &Settings,
) -> u64 {
    if let Some(s) = cc.s_maxage {
        return s;
    }
    if let Some(m) = cc.max_age {
        return m;
    }
    let date = http_date(headers, header::DATE).unwrap_or(response_time);
    if headers.contains_key(header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (§5.3); so do duplicates.
        if headers.get_all(header::EXPIRES).iter().count() > 1 {
            return 0;
        }
        return http_date(headers, header::EXPIRES).map_or(0, |e| e.saturating_sub(date));
    }
    if (heuristically_cacheable(status) || cc.public) && settings.heuristic_fraction > 0.0 {
        if let Some(lm) = http_date(headers, header::LAST_MODIFIED) {
            let since = date.saturating_sub(lm) as f64;
            let h = (since * settings.heuristic_fraction) as u64;
            return h.min(settings.heuristic_max);
        }
    }
    0
}

/// The corrected initial age of a response (§4.2.3): the larger of the apparent age (the
/// clock gap between its `Date` and our receipt) and its `Age` plus the time the request
/// took.
pub fn initial_age(headers: &HeaderMap, request_time: u64, response_time: u64) -> u64 {
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        // A list (`7200, 0`) is invalid; its first member is the safe reading (the oldest
        // claim wins), as the first of several lines is.
        .and_then(|v| v.split(',').next())
        .and_then(super::cache_control::parse_delta)
        .unwrap_or(0);
    let date_value = http_date(headers, header::DATE).unwrap_or(response_time);
    let apparent_age = response_time.saturating_sub(date_value);
    let response_delay = response_time.saturating_sub(request_time);
    let corrected_age_value = age_value.saturating_add(response_delay);
    apparent_age.max(corrected_age_value).min(DELTA_MAX)
}

/// Everything the reuse decisions need about a stored response, computed once at store
/// (and again after a 304 refresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    /// When the response arrived (Unix seconds).
    pub response_time: u64,
    /// Corrected initial age (§4.2.3).
    pub initial_age: u64,
    /// Freshness lifetime in seconds.
    pub lifetime: u64,
    /// `stale-while-revalidate` window, 0 if none or not allowed.
    pub swr: u64,
    /// `stale-if-error` window from the response, 0 if none or not allowed.
    pub sie: u64,
    /// `no-cache`: always revalidate.
    pub no_cache: bool,
    /// Serving stale is forbidden (must-revalidate, proxy-revalidate, s-maxage, no-cache).
    pub no_stale: bool,
    /// May be reused for requests with `Authorization` (§3.5).
    pub auth_ok: bool,
}

impl Freshness {
    /// Computes the reuse facts of a response received at `response_time` for a request
    /// sent at `request_time`.
    pub fn of(
        status: StatusCode,
        headers: &HeaderMap,
        cc: &Directives,
        request_time: u64,
        response_time: u64,
        settings: &Settings,
    ) -> Self {
        let no_stale =
            cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some() || cc.no_cache;
        Freshness {
            response_time,
            initial_age: initial_age(headers, request_time, response_time),
            lifetime: freshness_lifetime(status, headers, cc, response_time, settings),
            swr: if no_stale {
                0
            } else {
                cc.stale_while_revalidate.unwrap_or(0)
            },
            sie: if no_stale {
                0
            } else {
                cc.stale_if_error.unwrap_or(0)
            },
            no_cache: cc.no_cache,
            no_stale,
            auth_ok: shareable_with_auth(cc),
        }
    }

    /// The current age (§4.2.3): initial age plus time resident here.
    pub fn age(&self, now: u64) -> u64 {
        self.initial_age
            .saturating_add(now.saturating_sub(self.response_time))
            .min(DELTA_MAX)
    }

    /// Seconds of freshness left (0 when stale).
    pub fn ttl(&self, now: u64) -> u64 {
        self.lifetime.saturating_sub(self.age(now))
    }

    /// How a request may use this stored response now.
    pub fn reuse(&self, req: &Directives, has_auth: bool, now: u64) -> Reuse {
        if has_auth && !self.auth_ok {
            return Reuse::Bypass;
        }
        if self.no_cache || req.no_cache {
            return Reuse::Revalidate;
        }
        let age = self.age(now);
        if req.max_age.is_some_and(|m| age > m) {
            return Reuse::Revalidate;
        }
        let fresh_left = self.lifetime.saturating_sub(age);
        let min_fresh = req.min_fresh.unwrap_or(0);
        if self.lifetime > age && fresh_left >= min_fresh.max(1) {
            return Reuse::Fresh;
        }
        if self.no_stale {
            return Reuse::Revalidate;
        }
        let staleness = age.saturating_sub(self.lifetime);
        match req.max_stale {
            Some(None) => return Reuse::StaleAllowed,
            Some(Some(n)) if staleness <= n => return Reuse::StaleAllowed,
            _ => {}
        }
        if self.swr > 0 && staleness <= self.swr && req.max_age.is_none() {
            return Reuse::StaleWhileRevalidate;
        }
        Reuse::Revalidate
    }

    /// Whether a stale copy may answer because the origin cannot be reached at all
    /// (§4.2.4: a disconnected cache may serve stale), for at most `limit` seconds of
    /// staleness; never where stale use is forbidden.
    pub fn stale_if_unreachable(&self, limit: u64, now: u64) -> bool {
        let staleness = self.age(now).saturating_sub(self.lifetime);
        !self.no_stale && limit > 0 && staleness <= limit
    }

    /// Whether a stale copy may answer when the origin failed (RFC 5861 `stale-if-error`,
    /// from the response or the request).
    pub fn stale_if_error(&self, req: &Directives, now: u64) -> bool {
        if self.no_stale {
            return false;
        }
        let window = self.sie.max(req.stale_if_error.unwrap_or(0));
        let staleness = self.age(now).saturating_sub(self.lifetime);
        window > 0 && staleness <= window
    }
}

/// What a request may do with a stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh: answer from the cache.
    Fresh,
    /// Stale, but the client's `max-stale` accepts it.
    StaleAllowed,
    /// Stale within `stale-while-revalidate`: answer now, refresh in the background.
    StaleWhileRevalidate,
    /// Must be validated with the origin first.
    Revalidate,
    /// May not be used for this request at all (Authorization): forward it.
    Bypass,
}

/// The request header names a response varies on (lowercase, sorted, deduplicated), or
/// `Err(())` for `Vary: *`.
#[allow(clippy::result_unit_err)]
pub fn vary_fields(headers: &HeaderMap) -> Result<Vec<HeaderName>, ()> {
    let mut out: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::VARY) {
        let Ok(s) = v.to_str() else { return Err(()) };
        for f in s.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            if f == "*" {
                return Err(());
            }
            let Ok(name) = HeaderName::from_bytes(f.to_ascii_lowercase().as_bytes()) else {
                return Err(());
            };
            out.push(name);
        }
    }
    out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    out.dedup();
    Ok(out)
}

/// The secondary key of a request for the given Vary fields: each field's values, joined
/// and whitespace-normalised (§4.1). `Accept-Encoding` is normalised to the coding this
/// cache would negotiate, because that is also what it forwards upstream.
pub fn secondary_key(fields: &[HeaderName], req: &HeaderMap) -> String {
    let mut key = String::new();
    for f in fields {
        key.push_str(f.as_str());
        key.push('=');
        if *f == header::ACCEPT_ENCODING {
            key.push_str(negotiate_encoding(req).as_str());
        } else {
            let mut first = true;
            for v in req.get_all(f) {
                if !first {
                    key.push(',');
                }
                first = false;
                for part in String::from_utf8_lossy(v.as_bytes()).split(',') {
                    key.push_str(&part.split_whitespace().collect::<Vec<_>>().join(" "));
                    key.push(',');
                }
            }
        }
        key.push('\n');
    }
    key
}

/// A content coding this cache produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// brotli
    Br,
    /// gzip
    Gzip,
    /// no coding
    Identity,
}

impl Coding {
    /// The token as written in `Accept-Encoding` / `Content-Encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Gzip => "gzip",
            Coding::Identity => "identity",
        }
    }
}

/// The best coding the client accepts among brotli, gzip and identity, honouring q-values
/// (brotli wins ties; `*` covers codings not named).
pub fn negotiate_encoding(req: &HeaderMap) -> Coding {
    let mut q = [(Coding::Br, None), (Coding::Gzip, None)];
    let mut star = None;
    for v in req.get_all(header::ACCEPT_ENCODING) {
        let Ok(s) = v.to_str() else { continue };
        for item in s.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut qv = 1.0f32;
            for p in parts {
                if let Some(x) = p.trim().strip_prefix("q=") {
                    qv = x.trim().parse().unwrap_or(0.0);
                }
            }
            match name.as_str() {
                "br" => q[0].1 = Some(qv),
                "gzip" | "x-gzip" => q[1].1 = Some(qv),
                "*" => star = Some(qv),
                _ => {}
            }
        }
    }
    let mut best = (Coding::Identity, 0.0f32);
    for (c, v) in q {
        let v = v.or(star).unwrap_or(0.0);
        if v > best.1 {
            best = (c, v);
        }
    }
    best.0
}

/// Media types worth compressing.
pub fn compressible(content_type: Option<&HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let ct = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    ct.starts_with("text/")
        || ct.ends_with("json")
        || ct.ends_with("+json")
        || ct.ends_with("javascript")
        || ct.ends_with("xml")
        || ct == "image/svg+xml"
}

/// Header fields never stored nor forwarded: hop-by-hop fields (RFC 9110 §7.6.1) and the
/// CDN-only `CDN-Cache-Control`.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

/// Removes hop-by-hop fields, including those the `Connection` field names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for n in hop {
        headers.remove(n);
    }
}

/// Merges the header fields of a 304 into a stored response's (§3.2, §4.3.4): every field
/// of the 304 replaces the stored one, except `Content-Length` and the fields describing a
/// representation we transformed ourselves (`Content-Encoding`, and `ETag` when
/// `transformed`).
pub fn merge_304(stored: &mut HeaderMap, fresh: &HeaderMap, transformed: bool) {
    let mut replaced: Vec<HeaderName> = Vec::new();
    for (name, value) in fresh {
        if is_hop_by_hop(name)
            || *name == header::CONTENT_LENGTH
            || *name == header::CONTENT_ENCODING
            || *name == header::CONTENT_RANGE
            || *name == header::TRANSFER_ENCODING
            || (transformed && *name == header::ETAG)
        {
            continue;
        }
        if !replaced.contains(name) {
            stored.remove(name);
            replaced.push(name.clone());
        }
        stored.append(name.clone(), value.clone());
    }
}

/// Whether a response to `method` with `status` invalidates stored responses for its URL
/// (§4.4): unsafe methods with a non-error status.
pub fn invalidates(method: &Method, status: StatusCode) -> bool {
    let unsafe_method = !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    unsafe_method && (status.is_success() || status.is_redirection())
}

/// The path-and-query of a `Location`/`Content-Location` value if it points at `host`
/// (relative references always do); `None` for other origins, which must not be
/// invalidated (§4.4).
pub fn same_host_target(value: &HeaderValue, host: &str, base_path: &str) -> Option<String> {
    let s = value.to_str().ok()?.trim();
    if s.starts_with('/') && !s.starts_with("//") {
        return Some(s.to_owned());
    }
    if let Some(rest) = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
    {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        return authority
            .eq_ignore_ascii_case(host)
            .then(|| path.to_owned());
    }
    if s.is_empty() || s.contains(':') || s.starts_with("//") {
        return None;
    }
    // A relative path: resolve against the request's directory.
    let dir = base_path.rsplit_once('/').map_or("", |(d, _)| d);
    Some(format!("{dir}/{s}"))
}

/// What a client's conditional GET/HEAD gets from a stored 200 (RFC 9110 §13.2.2).
pub fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Ok(inm) = inm.to_str() else { return false };
        return inm.trim() == "*" || inm.split(',').any(|t| weak_eq(t.trim(), etag.trim()));
    }
    if let (Some(ims), Some(lm)) = (
        http_date(req, header::IF_MODIFIED_SINCE),
        http_date(stored, header::LAST_MODIFIED),
    ) {
        return lm <= ims;
    }
    false
}

fn weak_eq(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}

/// The outcome of a `Range` request against a stored body of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Send the whole body with 200 (no Range, an unsupported or invalid one, multiple
    /// ranges, or a failed If-Range).
    Full,
    /// Send bytes `start..=end` with 206.
    Partial(u64, u64),
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Evaluates `Range` and `If-Range` (RFC 9110 §14) against a stored 200.
pub fn range(req: &HeaderMap, stored: &HeaderMap, len: u64) -> RangeAnswer {
    let Some(r) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if let Some(ir) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        let ir = ir.trim();
        let matches = if ir.starts_with('"') {
            // Strong comparison only.
            stored
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|e| e.trim() == ir)
        } else {
            let lm = stored
                .get(header::LAST_MODIFIED)
                .and_then(|v| v.to_str().ok());
            lm.is_some_and(|lm| lm.trim() == ir)
        };
        if !matches {
            return RangeAnswer::Full;
        }
    }
    let Some(spec) = r.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if a.is_empty() {
        let Some(n) = num(b) else {
            return RangeAnswer::Full;
        };
        if n == 0 || len == 0 {
            return RangeAnswer::Unsatisfiable;
        }
        return RangeAnswer::Partial(len.saturating_sub(n), len - 1);
    }
    let Some(start) = num(a) else {
        return RangeAnswer::Full;
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match num(b) {
            Some(e) if e >= start => e,
            _ => return RangeAnswer::Full,
        }
    };
    if start >= len {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Partial(start, end.min(len - 1))
}

/// A header parsed as an HTTP date, in Unix seconds (see [`parse_http_date`]).
pub fn http_date(headers: &HeaderMap, name: HeaderName) -> Option<u64> {
    parse_http_date(headers.get(name)?.to_str().ok()?)
}

/// An HTTP-date (RFC 9110 §5.6.7) in any of its three formats, in Unix seconds. Strict
/// parsing first; failing that, read leniently as §5.6.7 lets recipients: day and month
/// names in any case and a weekday that does not match the date are accepted (cache-tests
/// freshness-expires-ansi-c and -wrong-case-*). Anything else is `None` — for `Expires`
/// that means already expired, the safe reading.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Ok(t) = httpdate::parse_http_date(s) {
        return Some(
            t.duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs(),
        );
    }
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    const LONG: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let l = s.to_ascii_lowercase();
    let num = |t: &str, len: usize| -> Option<u64> {
        let t = t.trim_start_matches(' ');
        (t.len() <= len && !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let month = |t: &str| MONTHS.iter().position(|m| *m == t).map(|m| m as u64 + 1);
    let time = |t: &str| -> Option<u64> {
        let b = t.as_bytes();
        if t.len() != 8 || b[2] != b':' || b[5] != b':' {
            return None;
        }
        let (h, m, sec) = (num(&t[0..2], 2)?, num(&t[3..5], 2)?, num(&t[6..8], 2)?);
        (h <= 23 && m <= 59 && sec <= 60).then_some(h * 3600 + m * 60 + sec.min(59))
    };
    // The exact layouts of §5.6.7; only the case of names and the weekday are forgiven.
    let (d, m, y, t) = if let Some((wday, rest)) = l.split_once(", ") {
        let parts: Vec<&str> = rest.split(' ').collect();
        match parts.as_slice() {
            // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
            [d, mon, y, t, "gmt"]
                if DAYS.contains(&wday) && d.len() == 2 && mon.len() == 3 && y.len() == 4 =>
            {
                (num(d, 2)?, month(mon)?, num(y, 4)?, time(t)?)
            }
            // rfc850-date: Sunday, 06-Nov-94 08:49:37 GMT
            [date, t, "gmt"] if LONG.contains(&wday) => {
                let dp: Vec<&str> = date.split('-').collect();
                let [d, mon, y] = dp.as_slice() else {
                    return None;
                };
                if d.len() != 2 || y.len() != 2 {
                    return None;
                }
                // Two-digit years: 70–99 are 19xx, the rest 20xx.
                let y = num(y, 2)?;
                let y = if y >= 70 { 1900 + y } else { 2000 + y };
                (num(d, 2)?, month(mon)?, y, time(t)?)
            }
            _ => return None,
        }
    } else {
        // asctime-date: Sun Nov  6 08:49:37 1994
        let b = l.as_bytes();
        if l.len() != 24 || b[3] != b' ' || b[7] != b' ' || b[10] != b' ' || b[19] != b' ' {
            return None;
        }
        if !DAYS.contains(&&l[0..3]) || (b[8] == b' ' && b[9] == b' ') {
            return None;
        }
        (
            num(&l[8..10], 2)?,
            month(&l[4..7])?,
            num(&l[20..24], 4)?,
            time(&l[11..19])?,
        )
    };
    let days_in = [
        31,
        if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) {
            29
        } else {
            28
        },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if y < 1970 || d == 0 || d > days_in[(m - 1) as usize] {
        return None;
    }
    // Days since 1970-01-01 (H. Hinnant's days_from_civil, for years ≥ 1970).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2 / 400;
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + t)
}

/// Now in Unix seconds.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests;
