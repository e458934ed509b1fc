//! The app role: the data API under `/api/v1`, static files for every other path.
//!
//! [`App::handle`] is the whole request path: route (pure), authenticate, dispatch to a
//! handler in [`api`] or to [`static_files`], count the request, optionally log it.

pub mod api;
pub mod cache;
pub mod fast;
pub mod feed;
pub mod router;
pub mod static_files;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;

use crate::config::{AppConfig, Config, ConfigError, Scope};
use crate::http::admin::{method_not_allowed, Component};
use crate::http::auth::Tokens;
use crate::http::body::Body;
use crate::http::problem::Problem;
use crate::metrics::Metrics;
use crate::storage::Store;
use cache::RecordCache;
use router::Endpoint;
use static_files::{CacheRules, StaticFiles};

/// The app settings that apply live, derived from the config once per (re)load.
pub struct AppSettings {
    /// Largest request body.
    pub max_body: usize,
    /// Listing page size by default.
    pub list_default_limit: usize,
    /// Largest listing page.
    pub list_max_limit: usize,
    /// Most writes in one batch.
    pub max_batch_writes: usize,
    /// Compiled static `Cache-Control` rules.
    pub cache_rules: CacheRules,
    /// Whether to log each request.
    pub access_log: bool,
    /// The record cache's settings (`[app.cache]`); its live parts apply on reload.
    pub cache: Option<crate::config::AppCacheConfig>,
}

impl AppSettings {
    /// Derives the live settings; fails (and nothing changes) if a rule does not compile.
    pub fn from_config(config: &Config, app: &AppConfig) -> Result<Self, ConfigError> {
        let cache_rules = CacheRules::new(&app.static_cache).map_err(|e| {
            ConfigError::invalid(Path::new("config"), "app.static_cache", e.to_string())
        })?;
        Ok(AppSettings {
            max_body: app.max_body.as_usize(),
            list_default_limit: app.list_default_limit,
            list_max_limit: app.list_max_limit,
            max_batch_writes: app.max_batch_writes,
            cache_rules,
            access_log: config.node.access_log,
            cache: app.cache.clone(),
        })
    }
}

/// The running app role.
pub struct App {
    store: Store,
    static_files: Option<StaticFiles>,
    static_root: Option<PathBuf>,
    settings: ArcSwap<AppSettings>,
    tokens: Arc<ArcSwap<Tokens>>,
    metrics: Arc<Metrics>,
    cache: Option<Arc<RecordCache>>,
    /// Reads and writes answered by the fast path ([`fast`]); the rest went through hyper.
    fast_reads: Counter,
    fast_writes: Counter,
}

impl App {
    /// Builds the app over a store, with its record cache when `cache` is set (whose feed
    /// the caller starts). `static_root` is served when set.
    pub fn new(
        store: Store,
        static_files: Option<(PathBuf, StaticFiles)>,
        settings: AppSettings,
        tokens: Arc<ArcSwap<Tokens>>,
        metrics: Arc<Metrics>,
        cache: Option<Arc<RecordCache>>,
    ) -> Arc<Self> {
        if let Some(c) = &cache {
            c.register_metrics(&metrics);
        }
        let fast_reads = Counter::default();
        metrics.register(
            "app_fast_path_reads",
            "Record reads answered by the app's own HTTP/1.1 path rather than hyper's",
            fast_reads.clone(),
        );
        let fast_writes = Counter::default();
        metrics.register(
            "app_fast_path_writes",
            "Record PUTs answered by the app's own HTTP/1.1 path rather than hyper's",
            fast_writes.clone(),
        );
        let (static_root, static_files) = match static_files {
            Some((root, files)) => (Some(root), Some(files)),
            None => (None, None),
        };
        Arc::new(App {
            store,
            static_files,
            static_root,
            settings: ArcSwap::from_pointee(settings),
            tokens,
            metrics,
            cache,
            fast_reads,
            fast_writes,
        })
    }

    /// Installs settings from a reload (including the cache's live bounds).
    pub fn apply(&self, settings: AppSettings) {
        if let (Some(cache), Some(cfg)) = (&self.cache, &settings.cache) {
            cache.apply(cfg);
        }
        self.settings.store(Arc::new(settings));
    }

    /// The record cache, when `[app.cache]` is on.
    pub fn cache(&self) -> Option<&Arc<RecordCache>> {
        self.cache.as_ref()
    }

    /// Where static files come from, if anywhere.
    pub fn static_root(&self) -> Option<&Path> {
        self.static_root.as_deref()
    }

    /// Answers one request (never fails: errors become problem+json responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let settings = self.settings.load_full();
        let method = req.method().clone();
        let log_path = settings.access_log.then(|| req.uri().path().to_owned());
        let (route, resp) = self.dispatch(req, &settings).await;
        let mut resp = resp.unwrap_or_else(|p| p.into_response());
        if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
            // The body was left unread, so hyper closes the connection after this response;
            // saying so stops the client from reusing it and racing the close.
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        self.account(
            route,
            &method,
            log_path.as_deref(),
            resp.status().as_u16(),
            started,
            peer,
        );
        Ok(resp)
    }

    /// Counts a served request and logs it when given its path (the access log is on).
    fn account(
        &self,
        route: &'static str,
        method: &Method,
        log_path: Option<&str>,
        status: u16,
        started: Instant,
        peer: SocketAddr,
    ) {
        let elapsed = started.elapsed();
        self.metrics.observe_request("app", route, status, elapsed);
        if let Some(path) = log_path {
            tracing::info!(target: "access", %peer, %method, path, status, micros = elapsed.as_micros() as u64);
        }
    }

    /// A record read for the fast path ([`fast`]): authenticated and decided by the same
    /// code as on the hyper path.
    async fn read_record(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
        collection: &str,
        id: &str,
    ) -> Result<api::RecordRead, Box<Problem>> {
        self.tokens.load().check(headers, Scope::Read)?;
        let data = api::Data {
            store: &self.store,
            cache: self.cache.as_deref(),
        };
        api::read_record(&data, headers, query, collection, id).await
    }

    /// A record PUT for the fast path ([`fast`]), its body read whole: authenticated and
    /// carried out by the same code as on the hyper path. Returns the committed batch and
    /// its key for [`api::Written`], or the problem to answer.
    async fn put_record(
        &self,
        headers: &http::HeaderMap,
        collection: &str,
        id: &str,
        body: bytes::Bytes,
    ) -> Result<(crate::storage::Committed, crate::storage::Key), Box<Problem>> {
        self.tokens.load().check(headers, Scope::Write)?;
        let data = api::Data {
            store: &self.store,
            cache: self.cache.as_deref(),
        };
        api::put_record_body(&data, headers, body, collection, id).await
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        settings: &AppSettings,
    ) -> (&'static str, api::ApiResult) {
        let (parts, body) = req.into_parts();
        let endpoint = router::route(parts.uri.path());
        let route = endpoint.name();
        let method = &parts.method;
        if !endpoint.allowed().contains(method) {
            if endpoint == Endpoint::ApiNotFound {
                return (
                    route,
                    Err(Box::new(Problem::new(
                        StatusCode::NOT_FOUND,
                        format!("no API endpoint at {}", parts.uri.path()),
                    ))),
                );
            }
            return (route, Ok(method_not_allowed(endpoint.allowed())));
        }
        if endpoint != Endpoint::Static {
            let scope = if matches!(*method, Method::GET | Method::HEAD) {
                Scope::Read
            } else {
                Scope::Write
            };
            if let Err(p) = self.tokens.load().check(&parts.headers, scope) {
                return (route, Err(p));
            }
        }
        let data = api::Data {
            store: &self.store,
            cache: self.cache.as_deref(),
        };
        let store = &data;
        let headers = &parts.headers;
        let result = match endpoint {
            Endpoint::Record { collection, id } => match *method {
                Method::GET | Method::HEAD => {
                    api::get_record(store, method, headers, parts.uri.query(), collection, id).await
                }
                Method::PUT => {
                    api::put_record(store, settings, headers, body, collection, id).await
                }
                Method::PATCH => {
                    api::patch_record(store, settings, headers, body, collection, id).await
                }
                _ => api::delete_record(store, headers, collection, id).await,
            },
            Endpoint::Collection { collection } => match *method {
                Method::POST => {
                    api::create_record(store, settings, headers, body, collection).await
                }
                _ => {
                    api::list(
                        store,
                        settings,
                        method,
                        headers,
                        parts.uri.query(),
                        collection,
                    )
                    .await
                }
            },
            Endpoint::Batch => api::batch(store, settings, headers, body).await,
            Endpoint::ApiNotFound | Endpoint::Static => self.serve_static(&parts, settings).await,
        };
        (route, result)
    }

    async fn serve_static(
        &self,
        parts: &http::request::Parts,
        settings: &AppSettings,
    ) -> api::ApiResult {
        let path = parts.uri.path();
        if let Some(files) = &self.static_files {
            if let Some(resp) = files
                .serve(&parts.method, path, &parts.headers, &settings.cache_rules)
                .await
            {
                return Ok(resp);
            }
        }
        Err(Box::new(Problem::new(
            StatusCode::NOT_FOUND,
            format!("nothing at {path}"),
        )))
    }
}

impl Component for App {
    fn name(&self) -> &'static str {
        "app"
    }

    fn ready(&self) -> Result<(), String> {
        self.store.ready()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "static_dir": self.static_root.as_ref().map(|p| p.display().to_string()),
            "storage": self.store.status(),
            "cache": self.cache.as_ref().map(|c| c.status()),
        })
    }
}
