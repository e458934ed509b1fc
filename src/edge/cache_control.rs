//! Parsing `Cache-Control` (RFC 9111 §5.2) and `CDN-Cache-Control` (RFC 9213) into
//! directives. Pure: header values in, a struct out.
//!
//! Where the RFC leaves a choice we take the one that is safe for a shared cache:
//! - a freshness directive that appears twice with different values, or whose value does
//!   not parse, makes the response stale (`max-age=0`), as §4.2.1 allows;
//! - the qualified forms `private="field"` and `no-cache="field"` are treated like their
//!   unqualified forms (the whole response is private / must be revalidated), which RFC
//!   9111 §5.2.2.4 and §5.2.2.7 permit;
//! - delta-seconds too large to represent saturate at 2^31 (§1.2.2).

use http::header::{GetAll, HeaderValue};

/// The largest delta-seconds value we keep (RFC 9111 §1.2.2).
pub const DELTA_MAX: u64 = 1 << 31;

/// Directives of one `Cache-Control`-shaped field (request or response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    /// `max-age`: seconds of freshness (response) or the oldest acceptable age (request).
    pub max_age: Option<u64>,
    /// `s-maxage`: freshness for shared caches; overrides `max-age` and `Expires`.
    pub s_maxage: Option<u64>,
    /// `no-store`: never store (request or response).
    pub no_store: bool,
    /// `no-cache`: never reuse without successful validation.
    pub no_cache: bool,
    /// `private`: a shared cache must not store it.
    pub private: bool,
    /// `public`: storable even where it would otherwise not be (Authorization, heuristics).
    pub public: bool,
    /// `must-revalidate`: never serve stale.
    pub must_revalidate: bool,
    /// `proxy-revalidate`: never serve stale from a shared cache.
    pub proxy_revalidate: bool,
    /// `no-transform`: do not change the representation (no compression by us).
    pub no_transform: bool,
    /// `immutable`: the body will not change while fresh (no revalidation on reload).
    pub immutable: bool,
    /// `stale-while-revalidate` (RFC 5861): seconds a stale response may be served while
    /// it is refreshed in the background.
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861): seconds a stale response may be served when the origin
    /// fails.
    pub stale_if_error: Option<u64>,
    /// Request `max-stale`: `Some(None)` accepts any staleness, `Some(Some(n))` up to n.
    pub max_stale: Option<Option<u64>>,
    /// Request `min-fresh`: the response must stay fresh at least this much longer.
    pub min_fresh: Option<u64>,
    /// Request `only-if-cached`: answer from cache or 504.
    pub only_if_cached: bool,
    /// `must-understand`: store only if the status code is understood, and then even
    /// despite `no-store` (RFC 9111 §5.2.2.3).
    pub must_understand: bool,
}

impl Directives {
    /// Parses every line of a header field (several lines are one comma-separated list).
    pub fn parse_all(values: GetAll<'_, HeaderValue>) -> Self {
        let mut d = Directives::default();
        let mut seen = Seen::default();
        for v in values {
            d.parse_into(v.as_bytes(), &mut seen);
        }
        d
    }

    /// Parses one field value.
    pub fn parse(value: &str) -> Self {
        let mut d = Directives::default();
        d.parse_into(value.as_bytes(), &mut Seen::default());
        d
    }

    /// Parses a targeted field such as `CDN-Cache-Control` (RFC 9213 §2.1): its lines
    /// joined are a Structured Field dictionary (RFC 9651). `None` when the field is
    /// absent or not a valid dictionary, which the cache then ignores (§2.2). Members of
    /// the wrong type are ignored one by one — except that any `no-store`, `no-cache` or
    /// `private` member counts, whatever its value, because ignoring it would be unsafe.
    pub fn parse_targeted(values: GetAll<'_, HeaderValue>) -> Option<Self> {
        let mut joined = Vec::new();
        for v in values {
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(v.as_bytes());
        }
        if joined.is_empty() {
            return None;
        }
        let dict: sfv::Dictionary = sfv::Parser::new(&joined).parse().ok()?;
        let mut d = Directives::default();
        for (key, entry) in &dict {
            let item = match entry {
                sfv::ListEntry::Item(item) => Some(item),
                sfv::ListEntry::InnerList(_) => None,
            };
            let int = || {
                item.and_then(|i| i.bare_item.as_integer())
                    .and_then(|i| u64::try_from(i64::from(i)).ok())
                    .map(|v| v.min(DELTA_MAX))
            };
            let flag = item.is_some_and(|i| i.bare_item.as_boolean() == Some(true));
            match key.as_str() {
                "max-age" => d.max_age = int(),
                "s-maxage" => d.s_maxage = int(),
                "stale-while-revalidate" => d.stale_while_revalidate = int(),
                "stale-if-error" => d.stale_if_error = int(),
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = flag,
                "must-revalidate" => d.must_revalidate = flag,
                "proxy-revalidate" => d.proxy_revalidate = flag,
                "no-transform" => d.no_transform = flag,
                "immutable" => d.immutable = flag,
                "must-understand" => d.must_understand = flag,
                _ => {}
            }
        }
        Some(d)
    }

    /// Whether any directive was present at all (used to decide between
    /// `CDN-Cache-Control` and `Cache-Control`).
    pub fn is_empty(&self) -> bool {
        *self == Directives::default()
    }

    fn parse_into(&mut self, raw: &[u8], seen: &mut Seen) {
        for (name, value) in split_directives(raw) {
            let name = name.to_ascii_lowercase();
            match name.as_str() {
                "max-age" => set_delta(&mut self.max_age, value, &mut seen.max_age),
                "s-maxage" => set_delta(&mut self.s_maxage, value, &mut seen.s_maxage),
                "stale-while-revalidate" => {
                    set_delta(&mut self.stale_while_revalidate, value, &mut seen.swr)
                }
                "stale-if-error" => set_delta(&mut self.stale_if_error, value, &mut seen.sie),
                "min-fresh" => set_delta(&mut self.min_fresh, value, &mut seen.min_fresh),
                "max-stale" => {
                    // An unparsable max-stale accepts nothing extra (safe).
                    self.max_stale = Some(value.map(|v| parse_delta(&v).unwrap_or(0)))
                }
                "no-store" => self.no_store = true,
                "no-cache" => self.no_cache = true,
                "private" => self.private = true,
                "public" => self.public = true,
                "must-revalidate" => self.must_revalidate = true,
                "proxy-revalidate" => self.proxy_revalidate = true,
                "no-transform" => self.no_transform = true,
                "immutable" => self.immutable = true,
                "only-if-cached" => self.only_if_cached = true,
                "must-understand" => self.must_understand = true,
                _ => {} // unknown extensions are ignored (§5.2.3)
            }
        }
    }
}

/// First values seen, to detect conflicting duplicates.
#[derive(Default)]
struct Seen {
    max_age: bool,
    s_maxage: bool,
    swr: bool,
    sie: bool,
    min_fresh: bool,
}

fn set_delta(slot: &mut Option<u64>, value: Option<String>, seen: &mut bool) {
    // Missing or malformed values count as 0: for freshness that means stale, which is safe.
    let v = value.as_deref().and_then(parse_delta).unwrap_or(0);
    if *seen {
        if *slot != Some(v) {
            *slot = Some(0);
        }
    } else {
        *slot = Some(v);
        *seen = true;
    }
}

/// delta-seconds: 1*DIGIT, saturating at [`DELTA_MAX`].
pub fn parse_delta(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
}

/// Splits `a, b=1, c="x, y"` into (name, value) pairs, honouring quoted strings.
fn split_directives(raw: &[u8]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut i = 0;
    let n = raw.len();
    while i < n {
        while i < n && (raw[i] == b',' || raw[i] == b' ' || raw[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < n && !matches!(raw[i], b',' | b'=' | b' ' | b'\t') {
            i += 1;
        }
        let name = String::from_utf8_lossy(&raw[start..i]).into_owned();
        while i < n && (raw[i] == b' ' || raw[i] == b'\t') {
            i += 1;
        }
        let mut value = None;
        if i < n && raw[i] == b'=' {
            i += 1;
            while i < n && (raw[i] == b' ' || raw[i] == b'\t') {
                i += 1;
            }
            if i < n && raw[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < n && raw[i] != b'"' {
                    if raw[i] == b'\\' && i + 1 < n {
                        i += 1;
                    }
                    v.push(raw[i]);
                    i += 1;
                }
                i += 1; // closing quote
                value = Some(String::from_utf8_lossy(&v).into_owned());
            } else {
                let vs = i;
                while i < n && raw[i] != b',' {
                    i += 1;
                }
                value = Some(String::from_utf8_lossy(&raw[vs..i]).trim().to_owned());
            }
        }
        // Skip anything up to the next comma (junk after a value).
        while i < n && raw[i] != b',' {
            i += 1;
        }
        if !name.is_empty() {
            out.push((name, value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_directives() {
        let d = Directives::parse("public, max-age=60, s-maxage=120, stale-while-revalidate=30");
        assert!(d.public);
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.s_maxage, Some(120));
        assert_eq!(d.stale_while_revalidate, Some(30));
        assert!(!d.private && !d.no_store && !d.no_cache);
    }

    #[test]
    fn is_case_insensitive_and_tolerates_spaces() {
        let d = Directives::parse("  MAX-AGE = 5 ,No-Store,PRIVATE");
        assert_eq!(d.max_age, Some(5));
        assert!(d.no_store && d.private);
    }

    #[test]
    fn quoted_values_and_qualified_forms() {
        let d = Directives::parse("private=\"set-cookie, x\", no-cache=\"a\", max-age=\"10\"");
        assert!(d.private, "qualified private is treated as private");
        assert!(d.no_cache, "qualified no-cache is treated as no-cache");
        assert_eq!(d.max_age, Some(10), "quoted max-age is accepted (§5.2)");
    }

    #[test]
    fn malformed_or_conflicting_freshness_is_stale() {
        assert_eq!(Directives::parse("max-age=abc").max_age, Some(0));
        assert_eq!(Directives::parse("max-age").max_age, Some(0));
        assert_eq!(Directives::parse("max-age=-1").max_age, Some(0));
        assert_eq!(Directives::parse("max-age=10, max-age=20").max_age, Some(0));
        assert_eq!(
            Directives::parse("max-age=10, max-age=10").max_age,
            Some(10)
        );
    }

    #[test]
    fn huge_deltas_saturate() {
        let d = Directives::parse("max-age=99999999999999999999999");
        assert_eq!(d.max_age, Some(DELTA_MAX));
    }

    #[test]
    fn request_directives() {
        let d = Directives::parse("max-stale, min-fresh=5, only-if-cached");
        assert_eq!(d.max_stale, Some(None));
        assert_eq!(d.min_fresh, Some(5));
        assert!(d.only_if_cached);
        assert_eq!(Directives::parse("max-stale=7").max_stale, Some(Some(7)));
    }

    #[test]
    fn multiple_header_lines_combine() {
        let mut h = http::HeaderMap::new();
        h.append("cache-control", HeaderValue::from_static("public"));
        h.append("cache-control", HeaderValue::from_static("max-age=9"));
        let d = Directives::parse_all(h.get_all("cache-control"));
        assert!(d.public);
        assert_eq!(d.max_age, Some(9));
        assert!(Directives::parse_all(h.get_all("cdn-cache-control")).is_empty());
    }

    fn targeted(v: &'static str) -> Option<Directives> {
        let mut h = http::HeaderMap::new();
        h.append("cdn-cache-control", HeaderValue::from_static(v));
        Directives::parse_targeted(h.get_all("cdn-cache-control"))
    }

    #[test]
    fn targeted_fields_are_structured_dictionaries() {
        let d = targeted("max-age=60, stale-if-error=5, must-revalidate").unwrap();
        assert_eq!((d.max_age, d.stale_if_error), (Some(60), Some(5)));
        assert!(d.must_revalidate);
        // Not a dictionary at all: the whole field is ignored (cache-tests
        // cdn-cc-invalid-sh-type-unknown).
        assert_eq!(targeted("max-age=10000, &&&&&"), None);
        // A member of the wrong type is ignored (cdn-cc-invalid-sh-type-wrong).
        assert!(targeted("max-age=\"10000\"").unwrap().is_empty());
        assert_eq!(targeted("max-age=-5").unwrap().max_age, None);
        // Restrictive members count whatever their value.
        assert!(targeted("private=\"set-cookie\"").unwrap().private);
        assert!(targeted("no-store=?0").unwrap().no_store);
        assert!(!targeted("public=?0").unwrap().public);
        assert_eq!(
            targeted("max-age=2147483648").unwrap().max_age,
            Some(DELTA_MAX)
        );
    }

    #[test]
    fn unknown_extensions_are_ignored() {
        let d = Directives::parse("community=\"UCI\", max-age=3, foo");
        assert_eq!(d.max_age, Some(3));
    }
}
