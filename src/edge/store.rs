//! Stored responses, keyed by host + target with `Vary` secondary keys, on top of
//! [`crate::cache::Cache`] (which brings the byte bound, S3-FIFO-class eviction and the
//! invalidation gate).
//!
//! Layout: the primary key (`host` + `target`; only GET responses are stored, HEAD reads
//! them) holds either the one object for that URL, or — when the response has `Vary` — a
//! small [`VarySpec`] naming the fields and a generation. Each variant then lives under
//! `primary \0 generation \0 secondary-key`. Purging the primary key makes every variant
//! unreachable at once (a new spec gets a new generation), so purge and invalidation never
//! need to enumerate variants.
//!
//! The cache's LSN gate is reused with a generation counter: a fill carries the
//! generation at which its fetch began ([`Store::begin`]), and every invalidation takes a
//! new generation, so a fetch that started before a purge or a POST can never put the old
//! response back afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::policy::{self, Freshness};
use crate::cache::{Cache, CacheConfig, CacheConfigError, CacheStats, Lookup, Refused, Weigh};

/// One stored response, ready to send.
#[derive(Debug, Clone)]
pub struct Object {
    /// The stored status.
    pub status: StatusCode,
    /// Header fields to send (hop-by-hop, `Set-Cookie` and `CDN-Cache-Control` removed,
    /// `Content-Length` set). `Age` and `Cache-Status` are added per response.
    pub headers: HeaderMap,
    /// `CDN-Cache-Control` lines, kept for re-deciding freshness after a 304.
    pub cdn_cache_control: Vec<HeaderValue>,
    /// The complete body.
    pub body: Bytes,
    /// Reuse facts computed at store time.
    pub freshness: Freshness,
    /// We compressed the origin's body: our `ETag` is weak and the origin's is below.
    pub transformed: bool,
    /// The origin's validator when we transformed the body (used for revalidation).
    pub origin_etag: Option<HeaderValue>,
    /// The `Vary` fields this response was stored under.
    pub vary: Vec<HeaderName>,
}

impl Object {
    /// The headers the policy functions look at (the stored ones plus
    /// `CDN-Cache-Control`).
    pub fn policy_headers(&self) -> HeaderMap {
        let mut h = self.headers.clone();
        for v in &self.cdn_cache_control {
            h.append(policy::CDN_CACHE_CONTROL, v.clone());
        }
        h
    }
}

/// What the primary key maps to.
#[derive(Debug, Clone)]
enum Slot {
    /// The object for a URL whose response has no `Vary`, or one variant.
    Object(Arc<Object>),
    /// The URL's response varies on these fields; variants sit under their own keys.
    Vary(Arc<VarySpec>),
}

/// How a URL's variants are keyed.
#[derive(Debug)]
struct VarySpec {
    fields: Vec<HeaderName>,
    generation: u64,
}

impl Weigh for Slot {
    fn weight(&self) -> usize {
        match self {
            Slot::Object(o) => {
                let headers: usize = o
                    .headers
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len() + 48)
                    .sum();
                o.body.len() + headers + 256
            }
            Slot::Vary(s) => {
                s.fields
                    .iter()
                    .map(|f| f.as_str().len() + 32)
                    .sum::<usize>()
                    + 64
            }
        }
    }
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Found {
    /// A stored response matching the request's secondary key.
    Hit(Arc<Object>),
    /// Nothing stored for the URL.
    UriMiss,
    /// The URL is stored, but not the variant this request selects.
    VaryMiss,
}

/// The edge's object store.
pub struct Store {
    cache: Cache<String, Slot>,
    generation: AtomicU64,
}

impl Store {
    /// A store bounded by `max_bytes`.
    pub fn new(max_bytes: u64) -> Result<Self, CacheConfigError> {
        let cache = Cache::new(CacheConfig {
            capacity_bytes: max_bytes,
            negative_ttl: std::time::Duration::ZERO,
            expected_entry_bytes: 8 * 1024,
            ..CacheConfig::default()
        })?;
        Ok(Store {
            cache,
            generation: AtomicU64::new(1),
        })
    }

    /// The generation a fetch starts at; pass it to [`Store::insert`].
    pub fn begin(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Finds the stored response for `primary` that the request headers select.
    pub fn lookup(&self, primary: &str, req: &HeaderMap) -> Found {
        let Lookup::Hit(slot) = self.cache.get(&primary.to_owned()) else {
            return Found::UriMiss;
        };
        match slot {
            Slot::Object(o) => Found::Hit(o),
            Slot::Vary(spec) => {
                let key = variant_key(primary, &spec, req);
                match self.cache.get(&key) {
                    Lookup::Hit(Slot::Object(o)) if o.vary == spec.fields => Found::Hit(o),
                    _ => Found::VaryMiss,
                }
            }
        }
    }

    /// Stores a response fetched by a request with headers `req`, begun at generation
    /// `read_gen`. Refused when an invalidation happened since, or when it is too big.
    pub fn insert(
        &self,
        primary: &str,
        req: &HeaderMap,
        object: Object,
        read_gen: u64,
    ) -> Result<(), Refused> {
        if object.vary.is_empty() {
            return self.cache.insert_if_fresh(
                primary.to_owned(),
                Slot::Object(Arc::new(object)),
                read_gen,
            );
        }
        let spec = match self.cache.get(&primary.to_owned()) {
            Lookup::Hit(Slot::Vary(s)) if s.fields == object.vary => s,
            _ => {
                let s = Arc::new(VarySpec {
                    fields: object.vary.clone(),
                    generation: read_gen,
                });
                self.cache
                    .insert_if_fresh(primary.to_owned(), Slot::Vary(s.clone()), read_gen)?;
                s
            }
        };
        let key = variant_key(primary, &spec, req);
        self.cache
            .insert_if_fresh(key, Slot::Object(Arc::new(object)), read_gen)
    }

    /// Drops what is stored for `primary` (and so all its variants) and refuses fills
    /// begun before now.
    pub fn invalidate(&self, primary: &str) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.cache.invalidate(&primary.to_owned(), g);
    }

    /// Invalidates every URL starting with `prefix`; returns how many keys it dropped.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        let keys = self.cache.keys_where(|k| k.starts_with(prefix));
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        for k in &keys {
            self.cache.invalidate(k, g);
        }
        keys.len()
    }

    /// Keys held now that satisfy `pred` (admin use only: walks the whole store).
    pub fn keys_where(&self, pred: impl FnMut(&String) -> bool) -> Vec<String> {
        self.cache.keys_where(pred)
    }

    /// Changes the byte bound live.
    pub fn set_capacity(&self, bytes: u64) {
        self.cache.set_capacity(bytes);
    }

    /// The largest object (body + headers) the store accepts now.
    pub fn max_entry_bytes(&self) -> u64 {
        self.cache.max_entry_bytes()
    }

    /// The underlying cache's counters.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }
}

fn variant_key(primary: &str, spec: &VarySpec, req: &HeaderMap) -> String {
    format!(
        "{primary}\0{}\0{}",
        spec.generation,
        policy::secondary_key(&spec.fields, req)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::cache_control::Directives;
    use crate::edge::policy::Settings;

    fn object(body: &str, vary: &[&str]) -> Object {
        let headers = HeaderMap::new();
        Object {
            status: StatusCode::OK,
            freshness: Freshness::of(
                StatusCode::OK,
                &headers,
                &Directives::parse("max-age=60"),
                0,
                0,
                &Settings::default(),
            ),
            headers,
            cdn_cache_control: Vec::new(),
            body: Bytes::from(body.to_owned()),
            transformed: false,
            origin_etag: None,
            vary: vary
                .iter()
                .map(|v| HeaderName::from_bytes(v.as_bytes()).unwrap())
                .collect(),
        }
    }

    fn req(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn body(f: Found) -> Option<String> {
        match f {
            Found::Hit(o) => Some(String::from_utf8_lossy(&o.body).into_owned()),
            _ => None,
        }
    }

    #[test]
    fn plain_objects_round_trip_and_invalidate() {
        let s = Store::new(1 << 20).unwrap();
        let g = s.begin();
        s.insert("h/a", &HeaderMap::new(), object("A", &[]), g)
            .unwrap();
        assert_eq!(
            body(s.lookup("h/a", &HeaderMap::new())).as_deref(),
            Some("A")
        );
        s.invalidate("h/a");
        assert!(matches!(s.lookup("h/a", &HeaderMap::new()), Found::UriMiss));
        // A fetch begun before the invalidation cannot put the old body back.
        assert!(s
            .insert("h/a", &HeaderMap::new(), object("old", &[]), g)
            .is_err());
        let g2 = s.begin();
        s.insert("h/a", &HeaderMap::new(), object("new", &[]), g2)
            .unwrap();
        assert_eq!(
            body(s.lookup("h/a", &HeaderMap::new())).as_deref(),
            Some("new")
        );
    }

    #[test]
    fn variants_are_kept_apart_and_purged_together() {
        let s = Store::new(1 << 20).unwrap();
        let en = req(&[("accept-language", "en")]);
        let de = req(&[("accept-language", "de")]);
        let g = s.begin();
        s.insert("h/v", &en, object("EN", &["accept-language"]), g)
            .unwrap();
        assert!(matches!(s.lookup("h/v", &de), Found::VaryMiss));
        s.insert("h/v", &de, object("DE", &["accept-language"]), g)
            .unwrap();
        assert_eq!(body(s.lookup("h/v", &en)).as_deref(), Some("EN"));
        assert_eq!(body(s.lookup("h/v", &de)).as_deref(), Some("DE"));
        s.invalidate("h/v");
        assert!(matches!(s.lookup("h/v", &en), Found::UriMiss));
        let g = s.begin();
        s.insert("h/v", &de, object("DE2", &["accept-language"]), g)
            .unwrap();
        assert!(
            matches!(s.lookup("h/v", &en), Found::VaryMiss),
            "old variants stay unreachable after a purge"
        );
    }

    #[test]
    fn purge_by_prefix() {
        let s = Store::new(1 << 20).unwrap();
        let g = s.begin();
        for k in ["h/static/a", "h/static/b", "h/api/c"] {
            s.insert(k, &HeaderMap::new(), object(k, &[]), g).unwrap();
        }
        assert_eq!(s.purge_prefix("h/static/"), 2);
        assert!(matches!(
            s.lookup("h/static/a", &HeaderMap::new()),
            Found::UriMiss
        ));
        assert!(matches!(
            s.lookup("h/api/c", &HeaderMap::new()),
            Found::Hit(_)
        ));
    }
}
