//! The app's side of remote storage: a small pool of multiplexed connections to the
//! primary (and one to each read replica), each carrying many requests at once, kept open
//! by background tasks that reconnect with exponential backoff.
//!
//! Read routing: writes and `Strong` reads go to the primary. Other reads go to a replica
//! that is connected, ready, within `max_lag` (polled every 100 ms), picked as the less
//! busy of two at random; a read carrying a write's `(epoch, lsn)` token is sent wrapped
//! in `AtLeast`, so the replica answers only once it has applied the token (waiting up
//! to `token_wait`) — otherwise, or when the replica fails, the primary answers. A read
//! therefore never returns data older than the token it carries.
//!
//! Failure rules, which the data API turns into status codes:
//! - no live connection: [`StoreError::Unavailable`] at once (503, `Retry-After`);
//! - a request that never left this process: safe, tried once more on another connection;
//! - a read sent but unanswered (connection lost, timeout): tried once more elsewhere;
//! - a write sent but unanswered: [`StoreError::OutcomeUnknown`] (504), never retried,
//!   since the server may have applied it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsConnector;

use super::conn::{self, BoxStream, ConnError, FrameReader};
use super::protocol::{self, Message, Purpose, Request, Response};
use super::store::StoreError;
use super::{wire, Committed, Key, ListPage, ListQuery, Record, Write};
use crate::config::RemoteStorage;
use crate::http::fastio::timed;
use crate::http::server::{wait_for, Shutdown};

/// First wait before reconnecting; doubles per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between reconnection attempts: bounds how long an app stays unready
/// after storage is back.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why a remote store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TLS settings are unusable.
    #[error("app.storage.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// `primary` is not `host:port`.
    #[error("app.storage.primary: {0:?} is not host:port")]
    Address(String),
}

/// A storage server as the app sees it: the primary (writes, strong reads) and any read
/// replicas.
pub struct RemoteStore {
    shared: Arc<Shared>,
    /// Swapped whole on reload (`replicas`, `max_lag`, `token_wait` apply live).
    routing: arc_swap::ArcSwap<Routing>,
    /// What new replica links are built from: the link settings of the start-up config
    /// (TLS, connections, timeouts need a restart), the secret and the node's shutdown.
    link_config: RemoteStorage,
    secret: Vec<u8>,
    shutdown: Shutdown,
    replica_reads: AtomicU64,
    primary_reads: AtomicU64,
    token_fallbacks: AtomicU64,
}

/// What a read needs from the node that serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Any healthy replica within `max_lag`.
    Any,
    /// A node that has applied at least this `(epoch, lsn)` (a write's token).
    AtLeast {
        /// Epoch of the token (0: any).
        epoch: u64,
        /// LSN of the token.
        lsn: u64,
    },
    /// The primary.
    Strong,
}

/// The read-routing settings that change on reload.
struct Routing {
    replicas: Vec<Arc<ReplicaLink>>,
    max_lag: Duration,
    token_wait: Duration,
}

/// A reloaded replica list, built but not yet in use: see [`RemoteStore::prepare`].
pub struct PreparedRouting {
    routing: Option<Routing>,
    /// Links this reload started; stopped again if it is never applied.
    fresh: Vec<Arc<ReplicaLink>>,
}

impl Drop for PreparedRouting {
    fn drop(&mut self) {
        if self.routing.is_some() {
            for link in &self.fresh {
                let _ = link.stop.send(true);
            }
        }
    }
}

/// A read replica: its pool and what its last status poll said.
struct ReplicaLink {
    pool: Arc<Shared>,
    view: Mutex<Option<protocol::WireReplStatus>>,
    outstanding: AtomicUsize,
    /// Stops this link's connection and poll tasks when a reload removes the replica.
    stop: watch::Sender<bool>,
}

/// Builds a replica link whose tasks stop on the node's shutdown or on `link.stop`.
fn replica_link(
    config: &RemoteStorage,
    addr: &str,
    secret: &[u8],
    shutdown: &Shutdown,
) -> Result<Arc<ReplicaLink>, ClientError> {
    let (stop, own) = watch::channel(false);
    let pool = pool(config, addr, secret, &own)?;
    let link = Arc::new(ReplicaLink {
        pool,
        view: Mutex::new(None),
        outstanding: AtomicUsize::new(0),
        stop,
    });
    let mut node = shutdown.clone();
    let forward = link.stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = wait_for(&mut node) => { let _ = forward.send(true); }
            _ = forward.closed() => {}
        }
    });
    tokio::spawn(poll_replica(link.clone(), own));
    Ok(link)
}

impl ReplicaLink {
    fn view(&self) -> Option<protocol::WireReplStatus> {
        self.view.lock().ok().and_then(|v| v.clone())
    }
}

/// How often an app asks each replica for its applied LSN and lag.
const REPLICA_POLL: Duration = Duration::from_millis(100);

/// Keeps a replica's view fresh; a failed poll marks it unusable until the next success.
async fn poll_replica(link: Arc<ReplicaLink>, mut shutdown: Shutdown) {
    loop {
        let view = match link.pool.request(Request::ReplStatus, true).await {
            Ok(Response::ReplStatus(s)) => Some(s),
            _ => None,
        };
        if let Ok(mut v) = link.view.lock() {
            *v = view;
        }
        tokio::select! {
            _ = tokio::time::sleep(REPLICA_POLL) => {}
            _ = wait_for(&mut shutdown) => break,
        }
    }
}

/// Builds one address's connection pool and starts its connection tasks.
fn pool(
    config: &RemoteStorage,
    addr: &str,
    secret: &[u8],
    shutdown: &Shutdown,
) -> Result<Arc<Shared>, ClientError> {
    let host = split_host(addr).ok_or_else(|| ClientError::Address(addr.to_owned()))?;
    let tls = match &config.tls {
        Some(t) => {
            let cfg = crate::tls::client_config(&t.ca, t.cert.as_deref(), t.key.as_deref())?;
            let name = crate::tls::server_name(t.server_name.as_deref().unwrap_or(host))?;
            Some((TlsConnector::from(cfg), name))
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        addr: addr.to_owned(),
        secret: Arc::from(secret),
        tls,
        connect_timeout: config.connect_timeout.get(),
        request_timeout: config.request_timeout.get(),
        max_frame: config.max_frame.as_usize().min(protocol::MAX_FRAME_CEILING),
        slots: (0..config.connections.max(1))
            .map(|_| ArcSwapOption::empty())
            .collect(),
        next: AtomicUsize::new(0),
        last_error: Mutex::new(Some("not connected yet".into())),
        server_node: Mutex::new(None),
    });
    for slot in 0..shared.slots.len() {
        tokio::spawn(maintain(shared.clone(), slot, shutdown.clone()));
    }
    Ok(shared)
}

struct Shared {
    addr: String,
    secret: Arc<[u8]>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_frame: usize,
    slots: Vec<ArcSwapOption<Conn>>,
    next: AtomicUsize,
    last_error: Mutex<Option<String>>,
    server_node: Mutex<Option<String>>,
}

/// How a request on one connection failed.
enum CallError {
    /// It never left this process: safe to send elsewhere.
    NotSent(String),
    /// It was handed to the connection but no answer came.
    Lost(String),
    /// It is too large to send at all.
    TooLarge(String),
}

impl RemoteStore {
    /// Sets up the pool and starts its connection tasks (they stop on `shutdown`). Returns
    /// at once: connections come up in the background; [`RemoteStore::ready`] tells when.
    pub fn start(
        config: &RemoteStorage,
        secret: &[u8],
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, ClientError> {
        let shared = pool(config, &config.primary, secret, &shutdown)?;
        let mut replicas = Vec::with_capacity(config.replicas.len());
        for addr in &config.replicas {
            replicas.push(replica_link(config, addr, secret, &shutdown)?);
        }
        Ok(Arc::new(RemoteStore {
            shared,
            routing: arc_swap::ArcSwap::from_pointee(Routing {
                replicas,
                max_lag: config.max_lag.get(),
                token_wait: config.token_wait.get(),
            }),
            link_config: config.clone(),
            secret: secret.to_vec(),
            shutdown,
            replica_reads: AtomicU64::new(0),
            primary_reads: AtomicU64::new(0),
            token_fallbacks: AtomicU64::new(0),
        }))
    }

    /// Builds the read routing of a reloaded config: links to replicas it adds start
    /// connecting now, links it keeps are reused. Nothing serves from it until
    /// [`RemoteStore::apply`]; dropping it unused stops the new links.
    pub fn prepare(&self, config: &RemoteStorage) -> Result<PreparedRouting, ClientError> {
        let current = self.routing.load();
        let mut replicas = Vec::with_capacity(config.replicas.len());
        let mut built: Vec<Arc<ReplicaLink>> = Vec::new();
        for addr in &config.replicas {
            match current.replicas.iter().find(|r| &r.pool.addr == addr) {
                Some(r) => replicas.push(r.clone()),
                None => match replica_link(&self.link_config, addr, &self.secret, &self.shutdown) {
                    Ok(link) => {
                        built.push(link.clone());
                        replicas.push(link);
                    }
                    Err(e) => {
                        for link in built {
                            let _ = link.stop.send(true);
                        }
                        return Err(e);
                    }
                },
            }
        }
        Ok(PreparedRouting {
            routing: Some(Routing {
                replicas,
                max_lag: config.max_lag.get(),
                token_wait: config.token_wait.get(),
            }),
            fresh: built,
        })
    }

    /// Installs prepared routing; replicas it no longer names are disconnected (reads
    /// already sent to them finish first).
    pub fn apply(&self, mut prepared: PreparedRouting) {
        let Some(routing) = prepared.routing.take() else {
            return;
        };
        let new = Arc::new(routing);
        let old = self.routing.swap(new.clone());
        for r in &old.replicas {
            if !new.replicas.iter().any(|n| Arc::ptr_eq(n, r)) {
                tracing::info!(replica = %r.pool.addr, "read replica removed");
                let _ = r.stop.send(true);
            }
        }
        for r in &new.replicas {
            if !old.replicas.iter().any(|o| Arc::ptr_eq(o, r)) {
                tracing::info!(replica = %r.pool.addr, "read replica added");
            }
        }
    }

    /// Reads one record with the given consistency: from a healthy replica when one
    /// qualifies (see the module docs), else from the primary.
    pub async fn read(
        &self,
        key: &Key,
        consistency: ReadConsistency,
    ) -> Result<Option<Record>, StoreError> {
        let request = Request::Get { key: key.joined() };
        match self.routed(request, consistency).await? {
            Response::Record(r) => Ok(r.map(wire::record_from_wire)),
            other => Err(unexpected(other)),
        }
    }

    /// Reads one record as [`RemoteStore::read`] does, and also says at which LSN the node
    /// that answered read it: what a cache fill needs to pass the LSN gate.
    pub async fn read_at(
        &self,
        key: &Key,
        consistency: ReadConsistency,
    ) -> Result<(Option<Record>, u64), StoreError> {
        let request = Request::GetAt { key: key.joined() };
        match self.routed(request, consistency).await? {
            Response::RecordAt { record, read_lsn } => {
                Ok((record.map(wire::record_from_wire), read_lsn))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Lists a collection with the given consistency (as [`RemoteStore::read`]).
    pub async fn list_with(
        &self,
        collection: &str,
        query: &ListQuery,
        consistency: ReadConsistency,
    ) -> Result<ListPage, StoreError> {
        let request = Request::List {
            collection: collection.to_owned(),
            prefix: query.prefix.clone(),
            after: query.after.clone(),
            limit: u32::try_from(query.limit).unwrap_or(u32::MAX),
        };
        match self.routed(request, consistency).await? {
            Response::Page { items, next } => Ok(wire::page_from_wire(items, next)),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a read to a replica that qualifies, falling back to the primary when none
    /// does, when the replica fails, or when it cannot reach the read's token in time.
    async fn routed(
        &self,
        request: Request,
        consistency: ReadConsistency,
    ) -> Result<Response, StoreError> {
        let token = match consistency {
            ReadConsistency::Strong => None,
            ReadConsistency::Any => Some((0, 0)),
            ReadConsistency::AtLeast { epoch, lsn } => Some((epoch, lsn)),
        };
        if let Some((epoch, lsn)) = token {
            if let Some(link) = self.pick_replica(epoch) {
                let known = link.view().map_or(0, |v| v.applied_lsn);
                let body = if lsn == 0 || (known >= lsn && epoch == 0) {
                    request.clone()
                } else {
                    Request::AtLeast {
                        min_epoch: epoch,
                        min_lsn: lsn,
                        wait_ms: u32::try_from(self.routing.load().token_wait.as_millis())
                            .unwrap_or(u32::MAX),
                        read: Box::new(request.clone()),
                    }
                };
                link.outstanding.fetch_add(1, Ordering::Relaxed);
                let answer = link.pool.request(body, true).await;
                link.outstanding.fetch_sub(1, Ordering::Relaxed);
                match answer {
                    Ok(r) => {
                        self.replica_reads.fetch_add(1, Ordering::Relaxed);
                        return Ok(r);
                    }
                    Err(StoreError::Behind(_)) => {
                        self.token_fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(replica = %link.pool.addr, error = %e, "replica read failed; reading the primary");
                    }
                }
            }
        }
        self.primary_reads.fetch_add(1, Ordering::Relaxed);
        self.shared.request(request, true).await
    }

    /// A replica for a read: among those connected, ready, within `max_lag` and at
    /// `min_epoch` or later, the one with fewer outstanding requests of two at random.
    fn pick_replica(&self, min_epoch: u64) -> Option<Arc<ReplicaLink>> {
        let routing = self.routing.load();
        let max_lag = routing.max_lag;
        let ok: Vec<&Arc<ReplicaLink>> = routing
            .replicas
            .iter()
            .filter(|r| {
                r.pool.live() > 0
                    && r.view().is_some_and(|v| {
                        v.ready
                            && v.role != "fenced"
                            && v.epoch >= min_epoch
                            && Duration::from_millis(v.lag_ms) <= max_lag
                    })
            })
            .collect();
        match ok.len() {
            0 => None,
            1 => Some(ok[0].clone()),
            n => {
                let a = rand::random::<usize>() % n;
                let mut b = rand::random::<usize>() % (n - 1);
                if b >= a {
                    b += 1;
                }
                let load = |r: &ReplicaLink| r.outstanding.load(Ordering::Relaxed);
                Some(
                    if load(ok[b]) < load(ok[a]) {
                        ok[b]
                    } else {
                        ok[a]
                    }
                    .clone(),
                )
            }
        }
    }

    /// Waits until at least one connection is up, or `limit` passes.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.ready().is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.ready().is_ok()
    }

    /// Registers the pool's metrics: how many of its connections are up.
    pub fn register_metrics(self: &Arc<Self>, metrics: &crate::metrics::Metrics) {
        let weak = Arc::downgrade(self);
        metrics.gauge_fn(
            "storage_client_connections_up",
            "Connections from this app to its storage server that are up",
            move || weak.upgrade().map_or(0, |s| s.shared.live() as i64),
        );
    }

    /// Reads one record.
    pub async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let request = Request::Get { key: key.joined() };
        match self.shared.request(request, true).await? {
            Response::Record(r) => Ok(r.map(wire::record_from_wire)),
            other => Err(unexpected(other)),
        }
    }

    /// Lists a collection in id order.
    pub async fn list(&self, collection: &str, query: &ListQuery) -> Result<ListPage, StoreError> {
        let request = Request::List {
            collection: collection.to_owned(),
            prefix: query.prefix.clone(),
            after: query.after.clone(),
            limit: u32::try_from(query.limit).unwrap_or(u32::MAX),
        };
        match self.shared.request(request, true).await? {
            Response::Page { items, next } => Ok(wire::page_from_wire(items, next)),
            other => Err(unexpected(other)),
        }
    }

    /// Applies a batch atomically and durably on the primary.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Committed, StoreError> {
        let request = Request::Write {
            writes: writes.iter().map(wire::write_to_wire).collect(),
        };
        match self.shared.request(request, false).await? {
            Response::Committed {
                lsn,
                epoch,
                results,
            } => {
                if results.len() != writes.len() {
                    return Err(StoreError::Internal(format!(
                        "storage answered {} results for {} writes",
                        results.len(),
                        writes.len()
                    )));
                }
                Ok(wire::committed_from_wire(lsn, epoch, results))
            }
            other => Err(unexpected(other)),
        }
    }

    /// `Ok` while at least one connection to the primary is up; otherwise why not.
    pub fn ready(&self) -> Result<(), String> {
        self.shared.ready()
    }

    /// The pool's state for `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "remote",
            "primary": self.shared.addr,
            "tls": self.shared.tls.is_some(),
            "server_node": self.shared.server_node.lock().ok().and_then(|n| n.clone()),
            "connections": self.shared.slots.len(),
            "connections_up": self.shared.live(),
            "last_error": self.shared.last_error.lock().ok().and_then(|e| e.clone()),
            "reads": {
                "replica": self.replica_reads.load(Ordering::Relaxed),
                "primary": self.primary_reads.load(Ordering::Relaxed),
                "token_fallbacks": self.token_fallbacks.load(Ordering::Relaxed),
            },
            "replicas": self.routing.load().replicas.iter().map(|r| {
                let v = r.view();
                serde_json::json!({
                    "addr": r.pool.addr,
                    "connections_up": r.pool.live(),
                    "outstanding": r.outstanding.load(Ordering::Relaxed),
                    "role": v.as_ref().map(|v| v.role.clone()),
                    "applied_lsn": v.as_ref().map(|v| v.applied_lsn),
                    "lag_ms": v.as_ref().map(|v| v.lag_ms),
                    "ready": v.as_ref().is_some_and(|v| v.ready),
                })
            }).collect::<Vec<_>>(),
        })
    }
}

impl Shared {
    /// `Ok` while at least one connection is up; otherwise why not.
    fn ready(&self) -> Result<(), String> {
        if self.live() > 0 {
            return Ok(());
        }
        let why = self
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "no connection".into());
        Err(format!("storage at {} unreachable: {why}", self.addr))
    }

    fn live(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.load().as_ref().is_some_and(|c| c.is_open()))
            .count()
    }

    /// A live connection, round robin, other than `avoid` when another exists.
    fn pick(&self, avoid: Option<&Arc<Conn>>) -> Option<Arc<Conn>> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..n {
            let Some(conn) = self.slots[(start + i) % n].load_full() else {
                continue;
            };
            if !conn.is_open() {
                continue;
            }
            if avoid.is_some_and(|a| Arc::ptr_eq(a, &conn)) {
                fallback = Some(conn);
                continue;
            }
            return Some(conn);
        }
        fallback
    }

    /// Sends a request and waits for its answer, applying the retry rules above.
    async fn request(&self, request: Request, idempotent: bool) -> Result<Response, StoreError> {
        let frame_of = |id| {
            protocol::encode_frame(&Message::Request {
                id,
                body: request.clone(),
            })
        };
        let first = self.pick(None).ok_or_else(|| self.unavailable())?;
        let error = match first
            .call(&frame_of, self.request_timeout, self.max_frame)
            .await
        {
            Ok(r) => return answer(r),
            Err(e) => e,
        };
        let retry = match &error {
            CallError::NotSent(_) => true,
            CallError::Lost(_) => idempotent,
            CallError::TooLarge(_) => false,
        };
        if !retry {
            let why = match error {
                CallError::Lost(why) => why,
                CallError::TooLarge(why) => return Err(StoreError::InvalidBatch(why)),
                CallError::NotSent(_) => return Err(self.unavailable()),
            };
            tracing::warn!(storage = %self.addr, reason = %why, "write outcome unknown");
            return Err(StoreError::OutcomeUnknown(format!(
                "{why}; the write may or may not have been applied"
            )));
        }
        let second = self.pick(Some(&first)).ok_or_else(|| self.unavailable())?;
        match second
            .call(&frame_of, self.request_timeout, self.max_frame)
            .await
        {
            Ok(r) => answer(r),
            Err(CallError::NotSent(why)) => Err(StoreError::Unavailable(why)),
            Err(CallError::TooLarge(why)) => Err(StoreError::InvalidBatch(why)),
            Err(CallError::Lost(why)) if idempotent => Err(StoreError::Unavailable(why)),
            Err(CallError::Lost(why)) => Err(StoreError::OutcomeUnknown(format!(
                "{why}; the write may or may not have been applied"
            ))),
        }
    }

    fn unavailable(&self) -> StoreError {
        StoreError::Unavailable(
            self.ready()
                .err()
                .unwrap_or_else(|| "no connection to storage".into()),
        )
    }
}

fn answer(r: Response) -> Result<Response, StoreError> {
    match r {
        Response::Error(e) => Err(wire::error_from_wire(e)),
        other => Ok(other),
    }
}

fn unexpected(r: Response) -> StoreError {
    StoreError::Internal(format!(
        "storage answered with an unexpected message: {r:?}"
    ))
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub(crate) fn split_host(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some(host)
}

/// One open connection: requests go out through the writer task, answers come back
/// through the reader task, matched by id.
struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    /// Waiting requests by id; `None` once the connection is closed, so no request can
    /// register after the reader has given up on the rest.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Response>>>>,
    next_id: AtomicU64,
    closed: watch::Sender<bool>,
}

impl Conn {
    fn is_open(&self) -> bool {
        !*self.closed.borrow()
    }

    /// Marks the connection closed and fails every request still waiting on it.
    fn close(&self) {
        self.closed.send_replace(true);
        if let Ok(mut p) = self.pending.lock() {
            p.take();
        }
    }

    async fn call(
        &self,
        frame_of: &(dyn Fn(u64) -> Vec<u8> + Sync),
        timeout: Duration,
        max_frame: usize,
    ) -> Result<Response, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = frame_of(id);
        if frame.len() - 4 > max_frame {
            return Err(CallError::TooLarge(format!(
                "the request is {} bytes, over the storage link's frame limit of {max_frame}",
                frame.len() - 4
            )));
        }
        let (tx, rx) = oneshot::channel();
        match self.pending.lock() {
            Ok(mut p) => match p.as_mut() {
                Some(map) => {
                    map.insert(id, tx);
                }
                None => return Err(CallError::NotSent("connection closed".into())),
            },
            Err(_) => return Err(CallError::NotSent("connection state poisoned".into())),
        }
        let forget = || {
            if let Ok(mut p) = self.pending.lock() {
                if let Some(map) = p.as_mut() {
                    map.remove(&id);
                }
            }
        };
        // Usually the queue has room: no timer for that. A full queue means the server is
        // slow, and waiting (bounded) is the backpressure.
        let sent = match self.tx.try_send(frame) {
            Ok(()) => Ok(Ok(())),
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(Err(())),
            Err(mpsc::error::TrySendError::Full(frame)) => {
                tokio::time::timeout(timeout, self.tx.send(frame))
                    .await
                    .map(|r| r.map_err(|_| ()))
            }
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(())) => {
                forget();
                return Err(CallError::NotSent("connection closed".into()));
            }
            Err(_) => {
                forget();
                return Err(CallError::NotSent(
                    "the connection's send queue stayed full".into(),
                ));
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(CallError::Lost(
                "the connection to storage was lost before the answer".into(),
            )),
            Err(_) => {
                forget();
                Err(CallError::Lost(format!(
                    "no answer from storage within {timeout:?}"
                )))
            }
        }
    }
}

/// Keeps one slot of the pool connected: connect, wait for the connection to close,
/// reconnect with exponential backoff, until shutdown.
async fn maintain(shared: Arc<Shared>, slot: usize, mut shutdown: Shutdown) {
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let attempt = tokio::time::timeout(shared.connect_timeout, connect(&shared));
        let outcome = tokio::select! {
            r = attempt => r.unwrap_or(Err(ConnError::Timeout("connecting to storage"))),
            _ = wait_for(&mut shutdown) => break,
        };
        match outcome {
            Ok(conn) => {
                if failures > 0 {
                    tracing::info!(storage = %shared.addr, slot, "storage connection restored");
                }
                backoff = MIN_BACKOFF;
                failures = 0;
                let mut closed = conn.closed.subscribe();
                shared.slots[slot].store(Some(conn.clone()));
                tokio::select! {
                    _ = closed.wait_for(|c| *c) => {}
                    _ = wait_for(&mut shutdown) => {
                        shared.slots[slot].store(None);
                        conn.close();
                        break;
                    }
                }
                shared.slots[slot].store(None);
                record_error(&shared, "the connection was closed".into());
                tracing::warn!(storage = %shared.addr, slot, "storage connection lost; reconnecting");
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(storage = %shared.addr, slot, error = %e, "cannot connect to storage; retrying with backoff");
                } else {
                    tracing::debug!(storage = %shared.addr, slot, error = %e, failures, "storage still unreachable");
                }
                record_error(&shared, e.to_string());
                let jitter = Duration::from_millis(
                    rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1),
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = wait_for(&mut shutdown) => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn record_error(shared: &Shared, e: String) {
    if let Ok(mut last) = shared.last_error.lock() {
        *last = Some(e);
    }
}

/// Opens one connection: TCP, TLS when configured, the handshake; then starts its reader
/// and writer tasks.
async fn connect(shared: &Shared) -> Result<Arc<Conn>, ConnError> {
    let tcp = TcpStream::connect(&shared.addr).await?;
    let _ = tcp.set_nodelay(true);
    let stream: BoxStream = match &shared.tls {
        Some((connector, name)) => Box::new(
            connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| ConnError::Tls(e.to_string()))?,
        ),
        None => Box::new(tcp),
    };
    let mut fr = FrameReader::new(stream, protocol::MAX_FRAME_CEILING, shared.request_timeout);
    let welcome = conn::client_handshake(&mut fr, &shared.secret, Purpose::Client).await?;
    if let Ok(mut n) = shared.server_node.lock() {
        *n = Some(welcome.node.clone());
    }
    let (stream, buf) = fr.into_parts();
    let (rd, wr) = tokio::io::split(stream);
    let fr = FrameReader::with_buf(rd, buf, protocol::MAX_FRAME_CEILING, shared.request_timeout);
    let (tx, rx) = mpsc::channel(1024);
    let (closed, _) = watch::channel(false);
    let conn = Arc::new(Conn {
        tx,
        pending: Mutex::new(Some(HashMap::new())),
        next_id: AtomicU64::new(1),
        closed,
    });
    tokio::spawn(write_loop(
        wr,
        rx,
        Arc::downgrade(&conn),
        shared.request_timeout,
    ));
    tokio::spawn(read_loop(fr, conn.clone()));
    Ok(conn)
}

/// Hands each answer to the request waiting for it, until the connection ends.
async fn read_loop(mut fr: FrameReader<tokio::io::ReadHalf<BoxStream>>, conn: Arc<Conn>) {
    let mut closed = conn.closed.subscribe();
    // One wait for the close for the whole loop, not a watch subscription per answer.
    let closing = closed.wait_for(|c| *c);
    tokio::pin!(closing);
    loop {
        let msg = tokio::select! {
            biased;
            _ = &mut closing => break,
            m = fr.read() => m,
        };
        match msg {
            Ok(Some(Message::Response { id, body })) => {
                let waiter = conn
                    .pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.as_mut().and_then(|m| m.remove(&id)));
                if let Some(w) = waiter {
                    let _ = w.send(body);
                }
            }
            Ok(Some(_)) => {
                tracing::warn!(
                    "storage sent a message that is not a response; closing the connection"
                );
                break;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "storage connection failed");
                break;
            }
        }
    }
    conn.close();
}

/// Sends queued requests, coalescing those ready together into one write.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    conn: std::sync::Weak<Conn>,
    stall: Duration,
) {
    let mut closed = match conn.upgrade() {
        Some(c) => c.closed.subscribe(),
        None => return,
    };
    let mut out = Vec::with_capacity(64 << 10);
    let closing = closed.wait_for(|c| *c);
    tokio::pin!(closing);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut closing => None,
            f = rx.recv() => f,
        };
        let Some(frame) = frame else { break };
        out.extend_from_slice(&frame);
        while out.len() < (256 << 10) {
            match rx.try_recv() {
                Ok(f) => out.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        // Usually the socket takes it at once: no timer then.
        let written = timed(stall, wr.write_all(&out)).await;
        if !matches!(written, Some(Ok(()))) {
            tracing::warn!("writing to storage failed or stalled; closing the connection");
            break;
        }
        out.clear();
    }
    if let Some(c) = conn.upgrade() {
        c.close();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_split_from_ports() {
        assert_eq!(split_host("db.internal:7000"), Some("db.internal"));
        assert_eq!(split_host("[::1]:7000"), Some("::1"));
        assert_eq!(split_host("db"), None);
        assert_eq!(split_host(":7000"), None);
        assert_eq!(split_host("db:port"), None);
    }
}
