//! The edge role: an RFC 9111 HTTP cache (CDN tier) in front of the origins.
//!
//! Split like Pingora's cache: [`cache_control`] parses directives, [`policy`] makes every
//! RFC 9111 decision (pure, unit-tested), [`store`] keeps objects with Vary variants on top
//! of [`crate::cache`], [`coalesce`] makes concurrent misses share one fetch, and
//! [`upstream`] reaches the origins. This module is the request path that ties them:
//!
//! - GET/HEAD: look up → fresh hit (answer, conditional 304, Range 206/416) · stale within
//!   `stale-while-revalidate` (answer, refresh once in the background) · stale (revalidate
//!   with the stored validators; 304 refreshes the stored headers; origin failure or 5xx
//!   serves stale where `stale-if-error` allows) · miss (coalesced fetch; store only a
//!   complete body of the right length).
//! - Other methods pass through; a non-error answer to an unsafe one invalidates the URL
//!   and its same-host `Location`/`Content-Location`.
//! - Every response carries `Cache-Status` (RFC 9211).

pub mod cache_control;
pub mod coalesce;
pub mod policy;
pub mod store;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use self::cache_control::Directives;
use self::coalesce::{Coalescer, Flight, Joined};
use self::policy::{Coding, RangeAnswer, Reuse, Settings};
use self::store::{Found, Object, Store};
use self::upstream::{Collected, IdleBody, UpstreamError, Upstreams};
use crate::config::edge::EdgeConfig;
use crate::http::admin::Component;
use crate::http::body::{self, Body};
use crate::http::interim::InterimRelay;
use crate::http::problem::Problem;
use crate::http::server::Tls;
use crate::metrics::Metrics;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The object store refused its configuration.
    #[error("edge cache: {0}")]
    Cache(#[from] crate::cache::CacheConfigError),
    /// The TLS certificates could not be loaded.
    #[error("edge.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A reload, prepared: everything that can fail (certificates) is done; applying it
/// cannot fail.
pub struct Prepared {
    live: Live,
    max_bytes: u64,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Settings of one config version, swapped whole on reload.
struct Live {
    upstreams: Upstreams,
    policy: Settings,
    max_object: usize,
    compress: bool,
    purge_method: bool,
    coalesce_wait: Duration,
    stale_if_unreachable: u64,
    health: crate::config::edge::EdgeHealth,
}

impl Live {
    fn new(cfg: &EdgeConfig) -> Self {
        Live {
            upstreams: Upstreams::new(cfg),
            policy: Settings {
                heuristic_fraction: cfg.heuristic_fraction,
                heuristic_max: cfg.heuristic_max.get().as_secs(),
            },
            max_object: cfg.cache.max_object_size.as_usize(),
            compress: cfg.compress,
            purge_method: cfg.purge_method,
            coalesce_wait: cfg.coalesce_wait.get(),
            stale_if_unreachable: cfg.stale_if_unreachable.get().as_secs(),
            health: cfg.health.clone(),
        }
    }
}

/// Counters of the edge, read by `/metrics` and `/admin/status`.
#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale_served: AtomicU64,
    revalidations: AtomicU64,
    coalesced: AtomicU64,
    bytes_from_cache: AtomicU64,
    stored: AtomicU64,
    passes: AtomicU64,
    upstream_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The edge role's state. Share it in an `Arc`.
pub struct Edge {
    live: ArcSwap<Live>,
    tls: Option<Tls>,
    store: Store,
    flights: Coalescer,
    counters: Counters,
}

/// A request's facts the cache path needs, taken once.
struct Ask {
    method: Method,
    host: String,
    target: String,
    primary: String,
    headers: HeaderMap,
    cc: Directives,
    coding: Coding,
    /// Where 1xx interim responses from the origin go: the client's connection, when it
    /// speaks HTTP/1.1 (HTTP/1.0 clients must not get them; h2 is not wired).
    interim: Option<InterimRelay>,
}

/// `Cache-Status` of a fresh hit: built once.
const HIT: HeaderValue = HeaderValue::from_static("strata; hit");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Smallest body the edge compresses (and so lets vary on `Accept-Encoding`).
const MIN_COMPRESS: usize = 128;

impl Edge {
    /// Builds the role from its config and registers its metrics.
    pub fn new(cfg: &EdgeConfig, metrics: &Metrics) -> Result<Arc<Self>, EdgeError> {
        let tls = match &cfg.tls {
            Some(t) => Some(Arc::new(ArcSwap::new(crate::tls::listener_config(t)?))),
            None => None,
        };
        let edge = Arc::new(Edge {
            live: ArcSwap::from_pointee(Live::new(cfg)),
            tls,
            store: Store::new(cfg.cache.max_bytes.bytes())?,
            flights: Coalescer::default(),
            counters: Counters::default(),
        });
        edge.register_metrics(metrics);
        Ok(edge)
    }

    /// The TLS config in force when the listener terminates TLS; swapped on reload, so
    /// the next handshake uses the new certificates.
    pub fn tls(&self) -> Option<Tls> {
        self.tls.clone()
    }

    /// Builds everything a reload needs (loads and checks the certificates); nothing
    /// changes until [`Edge::apply`].
    pub fn prepare(&self, cfg: &EdgeConfig) -> Result<Prepared, EdgeError> {
        let tls = match (&cfg.tls, &self.tls) {
            (Some(t), Some(_)) => Some(crate::tls::listener_config(t)?),
            _ => None,
        };
        Ok(Prepared {
            live: Live::new(cfg),
            max_bytes: cfg.cache.max_bytes.bytes(),
            tls,
        })
    }

    /// Applies a prepared reload: upstreams, rules, sizes and certificates change without
    /// dropping a request (in-flight requests finish with the settings they started with;
    /// open connections keep their TLS session). A smaller cache evicts at once.
    pub fn apply(&self, prepared: Prepared) {
        self.store.set_capacity(prepared.max_bytes);
        self.live.store(Arc::new(prepared.live));
        if let (Some(cfg), Some(slot)) = (prepared.tls, &self.tls) {
            slot.store(cfg);
        }
    }

    /// Probes the origins every `health.interval` while `health.path` is set (re-read
    /// each round, so reload turns probes on, off or elsewhere), until shutdown.
    pub async fn run_health(self: Arc<Self>, mut shutdown: crate::http::server::Shutdown) {
        loop {
            let live = self.live.load_full();
            let interval = if live.health.path.is_empty() {
                Duration::from_secs(1)
            } else {
                tokio::select! {
                    _ = live.upstreams.probe_all(&live.health) => {}
                    _ = crate::http::server::wait_for(&mut shutdown) => return,
                }
                live.health.interval.get()
            };
            drop(live);
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = crate::http::server::wait_for(&mut shutdown) => return,
            }
        }
    }

    fn register_metrics(self: &Arc<Self>, metrics: &Metrics) {
        type Read = fn(&Edge) -> u64;
        let gauges: [(&str, &str, Read); 11] = [
            (
                "edge_hits",
                "Requests answered from the edge cache (fresh or allowed stale)",
                |e| e.counters.hits.load(Ordering::Relaxed),
            ),
            (
                "edge_misses",
                "Requests the edge had to forward for a cacheable method",
                |e| e.counters.misses.load(Ordering::Relaxed),
            ),
            (
                "edge_stale_served",
                "Stale responses served (stale-while-revalidate, stale-if-error)",
                |e| e.counters.stale_served.load(Ordering::Relaxed),
            ),
            (
                "edge_revalidations",
                "Conditional requests sent to refresh stale entries",
                |e| e.counters.revalidations.load(Ordering::Relaxed),
            ),
            (
                "edge_coalesced_waits",
                "Requests that waited for another request's fetch",
                |e| e.counters.coalesced.load(Ordering::Relaxed),
            ),
            (
                "edge_bytes_from_cache",
                "Body bytes served from the edge cache",
                |e| e.counters.bytes_from_cache.load(Ordering::Relaxed),
            ),
            ("edge_stored", "Responses stored", |e| {
                e.counters.stored.load(Ordering::Relaxed)
            }),
            (
                "edge_upstream_errors",
                "Upstream requests that failed",
                |e| e.counters.upstream_errors.load(Ordering::Relaxed),
            ),
            (
                "edge_entries",
                "Entries in the edge cache (objects and Vary specs)",
                |e| e.store.stats().entries,
            ),
            ("edge_bytes", "Bytes held by the edge cache", |e| {
                e.store.stats().bytes
            }),
            (
                "edge_evictions",
                "Entries evicted from the edge cache",
                |e| e.store.stats().evictions,
            ),
        ];
        for (name, help, f) in gauges {
            let weak = Arc::downgrade(self);
            metrics.gauge_fn(name, help, move || {
                weak.upgrade()
                    .map_or(0, |e| i64::try_from(f(&e)).unwrap_or(i64::MAX))
            });
        }
    }

    /// Answers one client request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let (mut parts, incoming) = req.into_parts();
        let Some(host) = host_of(&parts) else {
            return Ok(with_status(
                Problem::new(StatusCode::BAD_REQUEST, "a Host is required").into_response(),
                "strata; fwd=bypass; detail=no-host".into(),
            ));
        };
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let interim = if parts.version == http::Version::HTTP_11 {
            parts.extensions.remove::<InterimRelay>()
        } else {
            None
        };
        let ask = Ask {
            interim,
            primary: format!("{host}{target}"),
            cc: policy::request_directives(&parts.headers),
            coding: policy::negotiate_encoding(&parts.headers),
            method: parts.method.clone(),
            host,
            target,
            headers: parts.headers,
        };
        let live = self.live.load_full();
        let resp = match ask.method {
            Method::GET | Method::HEAD => self.cached(ask, &live).await,
            ref m if m.as_str() == "PURGE" && live.purge_method => {
                self.store.invalidate(&ask.primary);
                with_status(
                    json_response(&json!({"purged": ask.primary})),
                    "strata; fwd=bypass; detail=purge".into(),
                )
            }
            // With the PURGE method off, refuse it rather than forward it: forwarded, a 2xx
            // from the origin would invalidate (§4.4) and so purge anyway.
            ref m if m.as_str() == "PURGE" => with_status(
                crate::http::admin::method_not_allowed(&[
                    Method::GET,
                    Method::HEAD,
                    Method::POST,
                    Method::PUT,
                    Method::PATCH,
                    Method::DELETE,
                    Method::OPTIONS,
                ]),
                "strata; fwd=bypass; detail=purge-disabled".into(),
            ),
            _ => self.pass(ask, incoming, &live).await,
        };
        Ok(resp)
    }

    /// GET and HEAD: the cache path.
    async fn cached(self: Arc<Self>, ask: Ask, live: &Arc<Live>) -> Response<Body> {
        let has_auth = ask.headers.contains_key(header::AUTHORIZATION);
        let now = policy::now_secs();
        let found = self.store.lookup(&ask.primary, &ask.headers);
        let miss_kind = match found {
            Found::Hit(obj) => match obj.freshness.reuse(&ask.cc, has_auth, now) {
                Reuse::Fresh | Reuse::StaleAllowed => {
                    bump(&self.counters.hits);
                    return self.serve(&ask, &obj, HIT, now);
                }
                Reuse::StaleWhileRevalidate => {
                    bump(&self.counters.hits);
                    bump(&self.counters.stale_served);
                    self.clone()
                        .refresh_in_background(&ask, obj.clone(), live.clone());
                    return self.serve(
                        &ask,
                        &obj,
                        HeaderValue::from_static("strata; hit; detail=stale-while-revalidate"),
                        now,
                    );
                }
                Reuse::Revalidate => {
                    if ask.cc.only_if_cached {
                        return only_if_cached();
                    }
                    bump(&self.counters.misses);
                    bump(&self.counters.revalidations);
                    let flight = match self.flights.join(&flight_key(&ask)) {
                        Joined::Leader(f) => Some(f),
                        Joined::Follower(_) => None,
                    };
                    return self
                        .fetch(ask, Some(obj), flight, live.clone(), "stale")
                        .await;
                }
                Reuse::Bypass => {
                    bump(&self.counters.passes);
                    return self.fetch_uncached(ask, live, "bypass").await;
                }
            },
            Found::UriMiss => "uri-miss",
            Found::VaryMiss => "vary-miss",
        };
        if ask.cc.only_if_cached {
            return only_if_cached();
        }
        bump(&self.counters.misses);
        match self.flights.join(&flight_key(&ask)) {
            Joined::Leader(f) => {
                self.fetch(ask, None, Some(f), live.clone(), miss_kind)
                    .await
            }
            Joined::Follower(wait) => {
                bump(&self.counters.coalesced);
                let _ = wait.done(live.coalesce_wait).await;
                let now = policy::now_secs();
                if let Found::Hit(obj) = self.store.lookup(&ask.primary, &ask.headers) {
                    if matches!(
                        obj.freshness.reuse(&ask.cc, has_auth, now),
                        Reuse::Fresh | Reuse::StaleAllowed
                    ) {
                        let status = format!("strata; fwd={miss_kind}; collapsed");
                        return self.serve(&ask, &obj, hv(status), now);
                    }
                }
                // Uncacheable, failed, or our wait ran out: go upstream ourselves.
                self.fetch(ask, None, None, live.clone(), miss_kind).await
            }
        }
    }

    /// Forwards a GET/HEAD and stores what may be stored; the leader of a flight runs this
    /// in its own task so the fill completes even if its client goes away.
    async fn fetch(
        self: Arc<Self>,
        ask: Ask,
        stale: Option<Arc<Object>>,
        flight: Option<Flight>,
        live: Arc<Live>,
        fwd: &'static str,
    ) -> Response<Body> {
        let task = tokio::spawn(async move {
            let resp = self.fetch_inner(&ask, stale, &live, fwd).await;
            drop(flight);
            resp
        });
        match task.await {
            Ok(r) => r,
            Err(_) => {
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "edge fetch failed").into_response()
            }
        }
    }

    async fn fetch_inner(
        &self,
        ask: &Ask,
        stale: Option<Arc<Object>>,
        live: &Live,
        fwd: &'static str,
    ) -> Response<Body> {
        let mut headers = upstream_headers(&ask.headers, &ask.host);
        for h in [
            header::RANGE,
            header::IF_RANGE,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
        ] {
            headers.remove(h);
        }
        match ask.coding {
            Coding::Identity => headers.remove(header::ACCEPT_ENCODING),
            c => headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static(c.as_str()),
            ),
        };
        if let Some(obj) = &stale {
            let etag = if obj.transformed {
                obj.origin_etag.clone()
            } else {
                obj.headers.get(header::ETAG).cloned()
            };
            if let Some(e) = etag {
                headers.insert(header::IF_NONE_MATCH, e);
            }
            if let Some(lm) = obj.headers.get(header::LAST_MODIFIED) {
                headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
            }
        }
        let read_gen = self.store.begin();
        let request_time = policy::now_secs();
        let result = live
            .upstreams
            .send(
                &Method::GET,
                &ask.target,
                &headers,
                None,
                ask.interim.as_ref(),
            )
            .await;
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                bump(&self.counters.upstream_errors);
                return self.upstream_failed(ask, stale.as_deref(), &e.to_string(), 502, live);
            }
        };
        let response_time = policy::now_secs();
        let (mut parts, incoming) = resp.into_parts();
        let status = parts.status;
        if let Some(obj) = &stale {
            if status == StatusCode::NOT_MODIFIED {
                return self.refreshed(
                    ask,
                    obj,
                    &parts.headers,
                    read_gen,
                    request_time,
                    response_time,
                    live,
                );
            }
            if status.is_server_error() {
                bump(&self.counters.upstream_errors);
                if obj.freshness.stale_if_error(&ask.cc, response_time) {
                    return self.upstream_failed(ask, Some(obj), "", status.as_u16(), live);
                }
            }
        }
        policy::strip_hop_by_hop(&mut parts.headers);
        let cc = policy::response_directives(&parts.headers);
        let verdict = policy::storable(
            &Method::GET,
            &ask.headers,
            status,
            &parts.headers,
            &cc,
            response_time,
            &live.policy,
        );
        let declared_len = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let fwd_status = status.as_u16();
        let too_big = declared_len.is_some_and(|l| l > live.max_object as u64);
        if verdict.is_err() || too_big {
            // A response that may not be stored also retires what we held for the URL.
            if stale.is_some() || verdict.is_err() {
                self.store.invalidate(&ask.primary);
            }
            let detail = match verdict {
                Err(why) => why.to_string(),
                Ok(()) => "too-large".to_owned(),
            };
            parts.headers.remove(policy::CDN_CACHE_CONTROL);
            let mut resp = Response::from_parts(
                parts,
                IdleBody::boxed(incoming, live.upstreams.timeout(), None),
            );
            set_status(
                &mut resp,
                format!("strata; fwd={fwd}; fwd-status={fwd_status}; detail={detail}"),
            );
            return head_only(resp, &ask.method);
        }
        let limit = live.max_object;
        let body = match upstream::collect(incoming, limit, live.upstreams.timeout()).await {
            Ok(Collected::Full(b)) => b,
            Ok(Collected::TooLarge(prefix, rest)) => {
                parts.headers.remove(policy::CDN_CACHE_CONTROL);
                let mut resp = Response::from_parts(
                    parts,
                    IdleBody::boxed(rest, live.upstreams.timeout(), Some(prefix)),
                );
                set_status(
                    &mut resp,
                    format!("strata; fwd={fwd}; fwd-status={fwd_status}; detail=too-large"),
                );
                return head_only(resp, &ask.method);
            }
            Err(e) => {
                bump(&self.counters.upstream_errors);
                tracing::warn!(url = %ask.primary, error = %e, "upstream body failed; not stored");
                return self.upstream_failed(ask, stale.as_deref(), &e.to_string(), 502, live);
            }
        };
        if declared_len.is_some_and(|l| l != body.len() as u64) {
            return self.upstream_failed(ask, stale.as_deref(), "body length mismatch", 502, live);
        }
        let set_cookies: Vec<HeaderValue> = parts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        let obj = self
            .build_object(
                ask,
                status,
                parts.headers,
                body,
                &cc,
                request_time,
                response_time,
                live,
            )
            .await;
        let obj = Arc::new(obj);
        let stored = self
            .store
            .insert(&ask.primary, &ask.headers, (*obj).clone(), read_gen)
            .is_ok();
        if stored {
            bump(&self.counters.stored);
        }
        let ttl = obj.freshness.ttl(response_time);
        let status_line = if stored {
            format!("strata; fwd={fwd}; fwd-status={fwd_status}; stored; ttl={ttl}")
        } else {
            format!("strata; fwd={fwd}; fwd-status={fwd_status}")
        };
        // The body just came from the origin: not counted as served from cache.
        let mut resp = self.respond(ask, &obj, hv(status_line), policy::now_secs(), false);
        for c in set_cookies {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
        resp
    }

    /// A 304 answered our revalidation: merge its fields into the stored response
    /// (§4.3.4), recompute freshness, store and serve.
    #[allow(clippy::too_many_arguments)]
    fn refreshed(
        &self,
        ask: &Ask,
        obj: &Object,
        fresh: &HeaderMap,
        read_gen: u64,
        request_time: u64,
        response_time: u64,
        live: &Live,
    ) -> Response<Body> {
        let mut full = obj.policy_headers();
        policy::merge_304(&mut full, fresh, obj.transformed);
        let cc = policy::response_directives(&full);
        let mut updated = obj.clone();
        updated.cdn_cache_control = full
            .get_all(policy::CDN_CACHE_CONTROL)
            .iter()
            .cloned()
            .collect();
        full.remove(policy::CDN_CACHE_CONTROL);
        full.remove(header::SET_COOKIE);
        full.remove(header::AGE);
        updated.freshness = policy::Freshness::of(
            obj.status,
            &full,
            &cc,
            request_time,
            response_time,
            &live.policy,
        );
        updated.headers = full;
        let stored = !cc.no_store
            && !cc.private
            && self
                .store
                .insert(&ask.primary, &ask.headers, updated.clone(), read_gen)
                .is_ok();
        let s = if stored {
            "strata; fwd=stale; fwd-status=304; stored"
        } else {
            "strata; fwd=stale; fwd-status=304"
        };
        self.serve(ask, &updated, HeaderValue::from_static(s), response_time)
    }

    /// The origin failed (no answer, broken body — `why` says how — or a 5xx, with `why`
    /// empty): serve stale where `stale-if-error` allows, or where the origin could not be
    /// reached and `stale_if_unreachable` allows; otherwise a 502/504 problem.
    fn upstream_failed(
        &self,
        ask: &Ask,
        stale: Option<&Object>,
        why: &str,
        fwd_status: u16,
        live: &Live,
    ) -> Response<Body> {
        let now = policy::now_secs();
        if let Some(obj) = stale {
            let detail = if obj.freshness.stale_if_error(&ask.cc, now) {
                Some("stale-if-error")
            } else if !why.is_empty()
                && obj
                    .freshness
                    .stale_if_unreachable(live.stale_if_unreachable, now)
            {
                Some("origin-unreachable")
            } else {
                None
            };
            if let Some(detail) = detail {
                bump(&self.counters.stale_served);
                return self.serve(
                    ask,
                    obj,
                    hv(format!(
                        "strata; fwd=stale; fwd-status={fwd_status}; detail={detail}"
                    )),
                    now,
                );
            }
        }
        let status = if why.contains("timed out") {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        let detail = if why.is_empty() {
            format!("the origin answered {fwd_status}")
        } else {
            format!("the origin failed: {why}")
        };
        with_status(
            Problem::new(status, detail).into_response(),
            "strata; fwd=uri-miss; detail=upstream-error".to_owned(),
        )
    }

    /// Turns a complete upstream response into a stored object, compressing it when the
    /// client and the type allow.
    #[allow(clippy::too_many_arguments)]
    async fn build_object(
        &self,
        ask: &Ask,
        status: StatusCode,
        mut headers: HeaderMap,
        mut body: Bytes,
        cc: &Directives,
        request_time: u64,
        response_time: u64,
        live: &Live,
    ) -> Object {
        let freshness = policy::Freshness::of(
            status,
            &headers,
            cc,
            request_time,
            response_time,
            &live.policy,
        );
        let cdn: Vec<HeaderValue> = headers
            .get_all(policy::CDN_CACHE_CONTROL)
            .iter()
            .cloned()
            .collect();
        headers.remove(policy::CDN_CACHE_CONTROL);
        headers.remove(header::SET_COOKIE);
        headers.remove(header::AGE);
        let mut transformed = false;
        let mut origin_etag = None;
        let identity = headers
            .get(header::CONTENT_ENCODING)
            .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let transformable = live.compress
            && status == StatusCode::OK
            && identity
            && !cc.no_transform
            && policy::compressible(headers.get(header::CONTENT_TYPE));
        // Bodies too small to be worth compressing are the same for every client, so they
        // neither get compressed nor vary on Accept-Encoding.
        if transformable && body.len() >= MIN_COMPRESS {
            // Every stored copy of a compressible type varies on the client's coding.
            if !policy::vary_fields(&headers).is_ok_and(|f| f.contains(&header::ACCEPT_ENCODING)) {
                headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
            }
            if ask.coding != Coding::Identity {
                let coding = ask.coding;
                let input = body.clone();
                let compressed = if input.len() > 64 * 1024 {
                    tokio::task::spawn_blocking(move || compress(coding, &input))
                        .await
                        .ok()
                        .flatten()
                } else {
                    compress(coding, &input)
                };
                if let Some(c) = compressed {
                    body = c;
                    transformed = true;
                    headers.insert(
                        header::CONTENT_ENCODING,
                        HeaderValue::from_static(coding.as_str()),
                    );
                    if let Some(e) = headers.remove(header::ETAG) {
                        let weak = if e.as_bytes().starts_with(b"W/") {
                            e.clone()
                        } else {
                            let mut v = b"W/".to_vec();
                            v.extend_from_slice(e.as_bytes());
                            HeaderValue::from_bytes(&v).unwrap_or_else(|_| e.clone())
                        };
                        headers.insert(header::ETAG, weak);
                        origin_etag = Some(e);
                    }
                }
            }
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let vary = policy::vary_fields(&headers).unwrap_or_default();
        Object {
            status,
            headers,
            cdn_cache_control: cdn,
            body,
            freshness,
            transformed,
            origin_etag,
            vary,
        }
    }

    /// Answers from a stored object: conditional 304, Range 206/416, HEAD, or the whole
    /// body. One Age computation, headers cloned from the prebuilt map.
    fn serve(
        &self,
        ask: &Ask,
        obj: &Object,
        cache_status: HeaderValue,
        now: u64,
    ) -> Response<Body> {
        self.respond(ask, obj, cache_status, now, true)
    }

    /// [`Edge::serve`], saying whether the body counts as bytes served from cache.
    fn respond(
        &self,
        ask: &Ask,
        obj: &Object,
        cache_status: HeaderValue,
        now: u64,
        from_cache: bool,
    ) -> Response<Body> {
        let age = HeaderValue::from(obj.freshness.age(now));
        if obj.status == StatusCode::OK && policy::not_modified(&ask.headers, &obj.headers) {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            let h = resp.headers_mut();
            for name in [
                header::CACHE_CONTROL,
                header::CONTENT_LOCATION,
                header::DATE,
                header::ETAG,
                header::EXPIRES,
                header::VARY,
                header::LAST_MODIFIED,
            ] {
                for v in obj.headers.get_all(&name) {
                    h.append(name.clone(), v.clone());
                }
            }
            h.insert(header::AGE, age);
            h.insert(CACHE_STATUS, cache_status);
            return resp;
        }
        let len = obj.body.len() as u64;
        let (status, body_bytes, range) = if obj.status == StatusCode::OK {
            match policy::range(&ask.headers, &obj.headers, len) {
                RangeAnswer::Full => (StatusCode::OK, obj.body.clone(), None),
                RangeAnswer::Partial(a, b) => (
                    StatusCode::PARTIAL_CONTENT,
                    obj.body.slice(a as usize..=b as usize),
                    Some(format!("bytes {a}-{b}/{len}")),
                ),
                RangeAnswer::Unsatisfiable => {
                    let mut resp = Response::new(body::empty());
                    *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                    let h = resp.headers_mut();
                    h.insert(header::CONTENT_RANGE, hv(format!("bytes */{len}")));
                    h.insert(CACHE_STATUS, cache_status);
                    return resp;
                }
            }
        } else {
            (obj.status, obj.body.clone(), None)
        };
        let n = body_bytes.len();
        let mut headers = obj.headers.clone();
        headers.insert(header::AGE, age);
        headers.insert(CACHE_STATUS, cache_status);
        if let Some(cr) = range {
            headers.insert(header::CONTENT_RANGE, hv(cr));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        if obj.status == StatusCode::OK {
            headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        let body = if ask.method == Method::HEAD {
            body::empty()
        } else {
            if from_cache {
                self.counters
                    .bytes_from_cache
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            body::full(body_bytes)
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    /// Starts one background revalidation of a stale object (none if one is running).
    fn refresh_in_background(self: Arc<Self>, ask: &Ask, obj: Arc<Object>, live: Arc<Live>) {
        let Joined::Leader(flight) = self.flights.join(&flight_key(ask)) else {
            return;
        };
        bump(&self.counters.revalidations);
        let ask = Ask {
            method: Method::GET,
            host: ask.host.clone(),
            target: ask.target.clone(),
            primary: ask.primary.clone(),
            headers: ask.headers.clone(),
            cc: Directives::default(),
            coding: ask.coding,
            // Its client has its answer already: nothing more may go to that connection.
            interim: None,
        };
        tokio::spawn(async move {
            let _ = self.fetch_inner(&ask, Some(obj), &live, "stale").await;
            drop(flight);
        });
    }

    /// GET/HEAD that may not use the cache (Authorization on an unshared entry).
    async fn fetch_uncached(&self, ask: Ask, live: &Live, fwd: &str) -> Response<Body> {
        let headers = upstream_headers(&ask.headers, &ask.host);
        match live
            .upstreams
            .send(
                &ask.method,
                &ask.target,
                &headers,
                None,
                ask.interim.as_ref(),
            )
            .await
        {
            Ok(resp) => {
                let (mut parts, incoming) = resp.into_parts();
                policy::strip_hop_by_hop(&mut parts.headers);
                parts.headers.remove(policy::CDN_CACHE_CONTROL);
                let s = format!("strata; fwd={fwd}; fwd-status={}", parts.status.as_u16());
                let mut r = Response::from_parts(
                    parts,
                    IdleBody::boxed(incoming, live.upstreams.timeout(), None),
                );
                set_status(&mut r, s);
                r
            }
            Err(e) => self.upstream_failed(&ask, None, &e.to_string(), 502, live),
        }
    }

    /// Methods other than GET/HEAD: forward with the body streamed; invalidate on success.
    async fn pass(&self, ask: Ask, incoming: Incoming, live: &Live) -> Response<Body> {
        bump(&self.counters.passes);
        let headers = upstream_headers(&ask.headers, &ask.host);
        let body = incoming.map_err(Into::into).boxed();
        let resp = match live
            .upstreams
            .send(
                &ask.method,
                &ask.target,
                &headers,
                Some(body),
                ask.interim.as_ref(),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                bump(&self.counters.upstream_errors);
                let status = if matches!(e, UpstreamError::Timeout(_)) {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                return with_status(
                    Problem::new(status, format!("the origin failed: {e}")).into_response(),
                    "strata; fwd=method; detail=upstream-error".into(),
                );
            }
        };
        let (mut parts, incoming) = resp.into_parts();
        if policy::invalidates(&ask.method, parts.status) {
            self.store.invalidate(&ask.primary);
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(path) = parts
                    .headers
                    .get(&name)
                    .and_then(|v| policy::same_host_target(v, &ask.host, &ask.target))
                {
                    self.store.invalidate(&format!("{}{path}", ask.host));
                }
            }
        }
        policy::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(policy::CDN_CACHE_CONTROL);
        let s = format!("strata; fwd=method; fwd-status={}", parts.status.as_u16());
        let mut r = Response::from_parts(
            parts,
            IdleBody::boxed(incoming, live.upstreams.timeout(), None),
        );
        set_status(&mut r, s);
        r
    }

    /// Purges by exact URL (`http://host/path`, `host/path`) or by prefix; returns how
    /// many stored URLs were dropped. Called by `POST /admin/purge` and the `PURGE`
    /// method.
    pub fn purge(&self, url: Option<&str>, prefix: Option<&str>) -> usize {
        let strip = |s: &str| {
            s.strip_prefix("http://")
                .or_else(|| s.strip_prefix("https://"))
                .unwrap_or(s)
                .to_owned()
        };
        let mut n = 0;
        if let Some(u) = url {
            let key = lowercase_host(&strip(u));
            if key.starts_with('/') {
                // A path without a host: that path on every host.
                for k in self
                    .store
                    .keys_where(|k| !k.contains('\0') && k.find('/').is_some_and(|i| k[i..] == key))
                {
                    self.store.invalidate(&k);
                    n += 1;
                }
            } else {
                n += usize::from(matches!(
                    self.store.lookup(&key, &HeaderMap::new()),
                    Found::Hit(_) | Found::VaryMiss
                ));
                self.store.invalidate(&key);
            }
        }
        if let Some(p) = prefix {
            n += self.store.purge_prefix(&lowercase_host(&strip(p)));
        }
        n
    }
}

impl Component for Edge {
    fn name(&self) -> &'static str {
        "edge"
    }

    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let hits = c.hits.load(Ordering::Relaxed);
        let misses = c.misses.load(Ordering::Relaxed);
        let s = self.store.stats();
        json!({
            "hits": hits,
            "misses": misses,
            "hit_ratio": if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            "stale_served": c.stale_served.load(Ordering::Relaxed),
            "revalidations": c.revalidations.load(Ordering::Relaxed),
            "coalesced_waits": c.coalesced.load(Ordering::Relaxed),
            "bytes_from_cache": c.bytes_from_cache.load(Ordering::Relaxed),
            "stored": c.stored.load(Ordering::Relaxed),
            "passes": c.passes.load(Ordering::Relaxed),
            "upstream_errors": c.upstream_errors.load(Ordering::Relaxed),
            "entries": s.entries,
            "bytes": s.bytes,
            "capacity_bytes": s.capacity_bytes,
            "evictions": s.evictions,
            "in_flight": self.flights.in_flight(),
            "upstreams": self.live.load().upstreams.status(),
        })
    }
}

/// The coalescing key: the URL plus the coding we will ask for (a gzip fetch does not
/// serve an identity client).
fn flight_key(ask: &Ask) -> String {
    format!("{}\0{}", ask.primary, ask.coding.as_str())
}

/// The request's host (Host header, or the authority of an absolute / HTTP/2 target),
/// lowercased.
fn host_of(parts: &Parts) -> Option<String> {
    let h = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })?;
    (!h.is_empty()).then(|| h.to_ascii_lowercase())
}

fn lowercase_host(key: &str) -> String {
    match key.find('/') {
        Some(i) => format!("{}{}", key[..i].to_ascii_lowercase(), &key[i..]),
        None => format!("{}/", key.to_ascii_lowercase()),
    }
}

/// Client headers as sent upstream: hop-by-hop removed, Host kept, X-Forwarded-Host set.
fn upstream_headers(client: &HeaderMap, host: &str) -> HeaderMap {
    let mut h = client.clone();
    policy::strip_hop_by_hop(&mut h);
    if !h.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(host) {
            h.insert(header::HOST, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        h.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
    h
}

fn compress(coding: Coding, input: &[u8]) -> Option<Bytes> {
    use std::io::Write;
    match coding {
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            e.write_all(input).ok()?;
            e.finish().ok().map(Bytes::from)
        }
        Coding::Br => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(input).ok()?;
            }
            Some(Bytes::from(out))
        }
        Coding::Identity => None,
    }
}

fn hv(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("strata"))
}

fn set_status(resp: &mut Response<Body>, s: String) {
    resp.headers_mut().insert(CACHE_STATUS, hv(s));
}

fn with_status(mut resp: Response<Body>, s: String) -> Response<Body> {
    set_status(&mut resp, s);
    resp
}

/// A HEAD answered from an upstream GET: keep the head, drop the body.
fn head_only(resp: Response<Body>, method: &Method) -> Response<Body> {
    if method == Method::HEAD {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, body::empty());
    }
    resp
}

fn only_if_cached() -> Response<Body> {
    with_status(
        Problem::new(StatusCode::GATEWAY_TIMEOUT, "not in cache (only-if-cached)").into_response(),
        "strata; fwd=miss; detail=only-if-cached".into(),
    )
}

fn json_response(v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(body::full(v.to_string()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
