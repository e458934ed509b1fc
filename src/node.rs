//! A node: starts the roles its config names, wires them to the admin listener, reloads on
//! SIGHUP, and shuts everything down in order on SIGTERM/SIGINT.
//!
//! Boot reads like a checklist: load config → open storage → start each role's listener →
//! start admin → wait for a stop signal → drain listeners → make storage durable → exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::{static_files::StaticFiles, App, AppSettings};
use crate::balancer::Balancer;
use crate::config::{self, Config, ConfigError, LiveConfig, ReloadReport, Source, StorageTarget};
use crate::http::admin::Admin;
use crate::http::auth::Tokens;
use crate::http::server;
use crate::metrics::Metrics;
use crate::storage::client::{ClientError, RemoteStore};
use crate::storage::server::{ServerError, StorageServer};
use crate::storage::{Engine, EngineConfig, EngineError, Store};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        /// What the listener is for.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Storage could not be opened.
    #[error("cannot open storage in {path}: {source}")]
    Storage {
        /// The data directory.
        path: PathBuf,
        /// The engine's error.
        source: EngineError,
    },
    /// The static directory is unusable.
    #[error(transparent)]
    Static(#[from] crate::app::static_files::StaticError),
    /// A secret (token) could not be read.
    #[error(transparent)]
    Secret(#[from] config::secrets::SecretError),
    /// The storage server could not be set up.
    #[error(transparent)]
    StorageServer(#[from] ServerError),
    /// The link to remote storage could not be set up.
    #[error(transparent)]
    StorageClient(#[from] ClientError),
    /// The balancer could not start (certificates).
    #[error(transparent)]
    Balancer(#[from] crate::balancer::BalancerError),
    /// The edge role could not be built.
    #[error(transparent)]
    Edge(#[from] crate::edge::EdgeError),
    /// The app's record cache or its change feed could not be set up.
    #[error(transparent)]
    AppCache(#[from] crate::app::feed::FeedError),
}

/// The parts of a running node that reload touches.
struct Running {
    live: Arc<LiveConfig>,
    /// Checksum of the config file's bytes as the last reload (or the start) read them:
    /// the file watcher reloads only when the file holds something else.
    seen: std::sync::Mutex<Option<u32>>,
    storage: Option<Arc<crate::storage::replication::Replication>>,
    remote: Option<Arc<RemoteStore>>,
    tokens: Arc<ArcSwap<Tokens>>,
    app: Option<Arc<App>>,
    balancer: Option<Arc<Balancer>>,
    edge: Option<Arc<crate::edge::Edge>>,
}

impl Running {
    /// Re-reads the config source; applies it only if every part of it is acceptable.
    fn reload(&self) -> ReloadReport {
        let old = self.live.get();
        let refused =
            |why: String| ReloadReport::now(false, config::version(&old), why, Vec::new());
        if let Some(path) = self.live.source().path() {
            let sum = std::fs::read(path).ok().map(|b| crc32fast::hash(&b));
            if let Ok(mut seen) = self.seen.lock() {
                *seen = sum;
            }
        }
        let new = match self.live.source().load() {
            Ok(c) => c,
            Err(e) => return refused(e.to_string()),
        };
        // Prepare everything first; nothing changes unless all of it succeeds.
        let tokens = match Tokens::from_config(&all_tokens(&new)) {
            Ok(t) => t,
            Err(e) => return refused(e.to_string()),
        };
        let app_settings = match (&self.app, &new.app) {
            (Some(_), Some(app_cfg)) => match AppSettings::from_config(&new, app_cfg) {
                Ok(s) => Some(s),
                Err(e) => return refused(e.to_string()),
            },
            _ => None,
        };
        let balancer = match (&self.balancer, &new.balancer) {
            (Some(b), Some(cfg)) => match b.prepare(cfg, new.node.access_log) {
                Ok(p) => Some(p),
                Err(e) => return refused(e.to_string()),
            },
            _ => None,
        };
        let edge = match (&self.edge, &new.edge) {
            (Some(e), Some(cfg)) => match e.prepare(cfg) {
                Ok(p) => Some(p),
                Err(e) => return refused(e.to_string()),
            },
            _ => None,
        };
        // Last fallible step: it may start connecting to added replicas, and dropping it
        // unused stops them again.
        let routing = match (&self.remote, new.app.as_ref().map(|a| &a.storage)) {
            (Some(r), Some(StorageTarget::Remote(cfg))) => match r.prepare(cfg) {
                Ok(p) => Some(p),
                Err(e) => return refused(e.to_string()),
            },
            _ => None,
        };
        let restart: Vec<String> = config::restart_required(&old, &new)
            .into_iter()
            .map(str::to_owned)
            .collect();
        self.tokens.store(Arc::new(tokens));
        if let (Some(app), Some(s)) = (&self.app, app_settings) {
            app.apply(s);
        }
        if let (Some(b), Some(p)) = (&self.balancer, balancer) {
            b.apply(p);
        }
        if let (Some(e), Some(p)) = (&self.edge, edge) {
            e.apply(p);
        }
        if let (Some(repl), Some(cfg)) = (&self.storage, &new.storage) {
            repl.apply(cfg);
        }
        if let (Some(r), Some(p)) = (&self.remote, routing) {
            r.apply(p);
        }
        let version = config::version(&new);
        self.live.store(new);
        let message = if restart.is_empty() {
            "applied".to_owned()
        } else {
            format!(
                "applied; these changes wait for a restart: {}",
                restart.join(", ")
            )
        };
        ReloadReport::now(true, version, message, restart)
    }
}

/// Runs a node until SIGTERM/SIGINT, then drains and returns.
pub async fn run(source: Source) -> Result<(), NodeError> {
    let config = source.load()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let live = Arc::new(LiveConfig::new(source, config.clone()));
    let metrics = Metrics::new();
    let tokens = Arc::new(ArcSwap::from_pointee(Tokens::from_config(&all_tokens(
        &config,
    ))?));
    let admin = Admin::new(live.clone(), metrics.clone(), tokens.clone());
    let grace = config.node.shutdown_grace.get();
    let mut tasks = tokio::task::JoinSet::new();
    let mut storage_repl = None;
    let mut remote_store = None;
    let embedded_app = config
        .app
        .as_ref()
        .is_some_and(|a| a.storage == StorageTarget::Embedded);
    // One engine per process, shared by the embedded app and the storage role.
    let engine = if embedded_app || config.storage.is_some() {
        Some(open_engine(&config, &metrics)?)
    } else {
        None
    };

    println!(
        "strata: node {:?} starting roles: {}",
        config.node.name,
        config.roles().join(", ")
    );
    if let Some(e) = &engine {
        let e = e.clone();
        admin.set_backup(Box::new(move || crate::storage::backup::spawn(e.clone())));
    }
    if let (Some(st), Some(e)) = (&config.storage, &engine) {
        let secret = cluster_secret(&config)?;
        let server = StorageServer::new(st, e.clone(), &secret, &config.node.name)?;
        server.register_metrics(&metrics);
        admin.add_component(server.clone());
        let repl = server.replication().clone();
        repl.start(stop_rx.clone());
        storage_repl = Some(repl.clone());
        admin.set_promoter(Box::new(move || {
            let repl = repl.clone();
            Box::pin(async move {
                let (epoch, lsn) = repl.promote().await?;
                Ok(serde_json::json!({ "promoted": true, "epoch": epoch, "after_lsn": lsn }))
            })
        }));
        let listener = bind("storage", st.listen).await?;
        let addr = listener.local_addr().unwrap_or(st.listen);
        println!(
            "strata: storage listening on tcp://{addr} ({}, {})",
            match &st.follow {
                Some(p) if st.mode == config::StorageMode::Replica => format!("replica of {p}"),
                _ => "primary".to_owned(),
            },
            match &st.tls {
                Some(t) if t.client_ca.is_some() => "mutual TLS",
                Some(_) => "TLS",
                None => "plain TCP",
            }
        );
        tasks.spawn(server.run(listener, stop_rx.clone(), grace));
    }
    let app = match &config.app {
        Some(app_cfg) => {
            let store = match (&app_cfg.storage, &engine) {
                (StorageTarget::Remote(remote), _) => {
                    let secret = cluster_secret(&config)?;
                    let store = RemoteStore::start(remote, &secret, stop_rx.clone())?;
                    store.register_metrics(&metrics);
                    if !store.wait_ready(remote.connect_timeout.get()).await {
                        tracing::warn!(
                            reason = %store.ready().err().unwrap_or_default(),
                            "storage is not reachable yet; answering 503 until it is"
                        );
                    }
                    remote_store = Some(store.clone());
                    Store::Remote(store)
                }
                (StorageTarget::Embedded, Some(e)) => Store::Embedded(e.clone()),
                (StorageTarget::Embedded, None) => {
                    // Unreachable: an embedded app always opens the engine above.
                    return Err(NodeError::Config(ConfigError::invalid(
                        std::path::Path::new("config"),
                        "app.storage",
                        "embedded storage without an engine",
                    )));
                }
            };
            let static_files = match &app_cfg.static_dir {
                Some(dir) => Some((dir.clone(), StaticFiles::new(dir)?)),
                None if std::path::Path::new("public").is_dir() => Some((
                    PathBuf::from("public"),
                    StaticFiles::new(std::path::Path::new("public"))?,
                )),
                None => None,
            };
            let cache = match (&app_cfg.cache, &app_cfg.storage, &store) {
                (None, _, _) => None,
                (Some(c), _, Store::Embedded(e)) => Some(crate::app::feed::start_embedded(
                    c,
                    e.clone(),
                    stop_rx.clone(),
                )?),
                (Some(c), StorageTarget::Remote(remote), _) => {
                    let secret = cluster_secret(&config)?;
                    Some(crate::app::feed::start_following(
                        c,
                        remote,
                        &secret,
                        stop_rx.clone(),
                    )?)
                }
                (Some(_), StorageTarget::Embedded, Store::Remote(_)) => None,
            };
            let app = App::new(
                store,
                static_files,
                AppSettings::from_config(&config, app_cfg)?,
                tokens.clone(),
                metrics.clone(),
                cache,
            );
            admin.add_component(app.clone());
            let listener = bind("app", app_cfg.listen).await?;
            let addr = listener.local_addr().unwrap_or(app_cfg.listen);
            println!(
                "strata: app listening on http://{addr} (data API at /api/v1/, static files {})",
                app.static_root().map_or_else(
                    || "off: no ./public directory".to_owned(),
                    |p| format!("from {}", p.display())
                )
            );
            let served = app.clone();
            let limits = app_cfg.http.clone();
            let stop = stop_rx.clone();
            // Plain HTTP/1.1 record reads take the app's fast path; the rest hyper.
            let fast = app.fast_path(&limits);
            tasks.spawn(async move {
                server::serve(
                    "app",
                    listener,
                    &limits,
                    None,
                    server::ConnMode::FastPath(fast),
                    move |peer| {
                        let app = served.clone();
                        hyper::service::service_fn(move |req| app.clone().handle(req, peer))
                    },
                    stop,
                    grace,
                )
                .await
            });
            Some(app)
        }
        None => None,
    };

    let balancer = match &config.balancer {
        Some(cfg) => {
            let balancer = Balancer::new(cfg, config.node.access_log, &metrics, stop_rx.clone())?;
            admin.add_component(balancer.clone());
            let listener = bind("balancer", cfg.listen).await?;
            let addr = listener.local_addr().unwrap_or(cfg.listen);
            balancer.set_listen(addr);
            let tls = balancer.tls();
            let proto = if tls.is_some() { "https" } else { "http" };
            println!(
                "strata: balancer listening on {proto}://{addr} ({} backends, {:?})",
                cfg.backends.len(),
                cfg.algorithm
            );
            tasks.spawn({
                let b = balancer.clone();
                let stop = stop_rx.clone();
                async move {
                    b.run_health(stop).await;
                    0
                }
            });
            let served = balancer.clone();
            let limits = cfg.http.clone();
            let stop = stop_rx.clone();
            // Plain HTTP/1.1 clients take the balancer's fast path; TLS, h2 and unusual
            // requests the general one.
            let fast = balancer.fast_path(&limits);
            let make = move |peer| served.service(peer, proto);
            tasks.spawn(async move {
                server::serve(
                    "balancer",
                    listener,
                    &limits,
                    tls,
                    server::ConnMode::FastPath(fast),
                    make,
                    stop,
                    grace,
                )
                .await
            });
            Some(balancer)
        }
        None => None,
    };
    let edge = match &config.edge {
        Some(edge_cfg) => {
            let edge = crate::edge::Edge::new(edge_cfg, &metrics)?;
            admin.add_component(edge.clone());
            let purger = edge.clone();
            admin.set_purger(move |url, prefix| purger.purge(url, prefix));
            let listener = bind("edge", edge_cfg.listen).await?;
            let addr = listener.local_addr().unwrap_or(edge_cfg.listen);
            let tls = edge.tls();
            println!(
                "strata: edge listening on {}://{addr} (caching {})",
                if tls.is_some() { "https" } else { "http" },
                edge_cfg.upstreams.join(", ")
            );
            tasks.spawn({
                let e = edge.clone();
                let stop = stop_rx.clone();
                async move {
                    e.run_health(stop).await;
                    0
                }
            });
            let served = edge.clone();
            let limits = edge_cfg.http.clone();
            let stop = stop_rx.clone();
            tasks.spawn(async move {
                server::serve(
                    "edge",
                    listener,
                    &limits,
                    tls,
                    server::ConnMode::RelayInterim,
                    move |peer| {
                        let edge = served.clone();
                        hyper::service::service_fn(move |req| edge.clone().handle(req, peer))
                    },
                    stop,
                    grace,
                )
                .await
            });
            Some(edge)
        }
        None => None,
    };

    let running = Arc::new(Running {
        live: live.clone(),
        seen: std::sync::Mutex::new(
            live.source()
                .path()
                .and_then(|p| std::fs::read(p).ok())
                .map(|b| crc32fast::hash(&b)),
        ),
        storage: storage_repl,
        remote: remote_store,
        tokens,
        app,
        balancer,
        edge,
    });
    let reloader = running.clone();
    admin.set_reloader(move || reloader.reload());

    let admin_listener = bind("admin", config.node.admin).await?;
    let admin_addr = admin_listener.local_addr().unwrap_or(config.node.admin);
    println!(
        "strata: admin listening on http://{admin_addr} (/healthz /readyz /metrics /admin/status; dashboard at /admin/)"
    );
    if let Some(e) = &engine {
        println!(
            "strata: data in {} (LSN {})",
            config.node.data_dir.display(),
            e.status().last_lsn
        );
    }
    let served = admin.clone();
    let stop = stop_rx.clone();
    tasks.spawn(async move {
        server::serve(
            "admin",
            admin_listener,
            &config::HttpLimits::default(),
            None,
            server::ConnMode::Plain,
            move |_| {
                let admin = served.clone();
                hyper::service::service_fn(move |req| admin.clone().handle(req))
            },
            stop,
            grace,
        )
        .await
    });

    let signals = tokio::spawn(handle_signals(stop_tx, admin.clone()));
    let watcher = tokio::spawn(watch_file(running.clone(), admin.clone(), stop_rx.clone()));
    let mut stranded = 0;
    while let Some(result) = tasks.join_next().await {
        stranded += result.unwrap_or(0);
    }
    signals.abort();
    watcher.abort();
    if let Some(e) = engine {
        let path = config.node.data_dir.clone();
        tokio::task::spawn_blocking(move || e.shutdown())
            .await
            .unwrap_or(Ok(()))
            .map_err(|source| NodeError::Storage { path, source })?;
    }
    if stranded > 0 {
        tracing::warn!(
            stranded,
            "some connections were still open at the drain deadline"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// The cluster secret as bytes; validation has made sure there is one.
fn cluster_secret(config: &Config) -> Result<Vec<u8>, NodeError> {
    match config::secrets::resolve_cluster_secret(&config.node)? {
        Some(s) => Ok(s.into_bytes()),
        None => Err(NodeError::Config(ConfigError::invalid(
            std::path::Path::new("config"),
            "node.cluster_secret",
            "no cluster secret configured",
        ))),
    }
}

/// Tokens declared by every role section and `[node] admin_tokens` (the admin endpoints
/// accept any of them).
fn all_tokens(config: &Config) -> Vec<config::TokenConfig> {
    let mut t = config
        .app
        .as_ref()
        .map_or_else(Vec::new, |a| a.tokens.clone());
    if let Some(e) = &config.edge {
        t.extend(e.tokens.iter().cloned());
    }
    t.extend(config.node.admin_tokens.iter().cloned());
    t
}

fn open_engine(config: &Config, metrics: &Metrics) -> Result<Arc<Engine>, NodeError> {
    let path = config.node.data_dir.clone();
    let engine = Engine::open(EngineConfig {
        path: path.clone(),
        log_retention: config.node.log_retention,
        max_group: 1024,
        cache_bytes: 256 << 20,
    })
    .map_err(|source| NodeError::Storage { path, source })?;
    engine.register_metrics(metrics);
    Ok(engine)
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { what, addr, source })
}

/// How often the config file is polled for changes.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads when the config file's content changes and then holds still for one poll
/// (debounce: an editor's several writes become one reload). Polling by content rather
/// than inotify keeps working when editors replace the file by rename, and costs one small
/// read per second. Switched off live with `node.watch_config = false`.
async fn watch_file(running: Arc<Running>, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    let Some(path) = running.live.source().path().map(|p| p.to_path_buf()) else {
        return;
    };
    let mut pending: Option<u32> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = crate::http::server::wait_for(&mut stop) => return,
        }
        if !running.live.get().node.watch_config {
            pending = None;
            continue;
        }
        // Missing or unreadable (mid-rename): try again next tick.
        let Ok(bytes) = tokio::fs::read(&path).await else {
            continue;
        };
        let sum = crc32fast::hash(&bytes);
        let seen = running.seen.lock().ok().and_then(|s| *s);
        if seen == Some(sum) {
            pending = None;
            continue;
        }
        if pending != Some(sum) {
            pending = Some(sum);
            continue;
        }
        pending = None;
        tracing::info!(file = %path.display(), "config file changed; reloading");
        let admin = admin.clone();
        let _ = tokio::task::spawn_blocking(move || admin.reload()).await;
    }
}

/// SIGHUP reloads; the first SIGTERM/SIGINT starts a graceful stop, a second exits at once.
async fn handle_signals(stop: watch::Sender<bool>, admin: Arc<Admin>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
                let admin = admin.clone();
                let _ = tokio::task::spawn_blocking(move || admin.reload()).await;
                continue;
            }
        }
        if stopping {
            tracing::warn!("second stop signal: exiting now");
            std::process::exit(130);
        }
        stopping = true;
        tracing::info!("stop signal: draining in-flight requests");
        let _ = stop.send(true);
    }
}
