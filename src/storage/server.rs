//! The storage role's listener: serves this node's [`Engine`] to apps over TCP (TLS
//! optional), one authenticated, pipelined connection per client.
//!
//! Per connection: TLS accept and the handshake under one deadline; then a reader that
//! takes frames, answers plain reads on the spot (sled serves them without waiting) and
//! polls the handling of everything else alongside, a writer task that sends the answers in
//! whatever order they finish, and a bound on requests in progress (beyond it the reader
//! stops reading, so TCP pushes back on the client). A peer that sends garbage, an oversize
//! or truncated frame, stalls mid-frame, or fails the handshake is disconnected and the
//! reason logged; no other connection notices.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::conn::{self, BoxStream, ConnError, FrameReader};
use super::protocol::{
    self, ErrorKind, Message, ProtocolError, Purpose, Request, Response, WireError, WireStatus,
};
use super::replication::Replication;
use super::store::StoreError;
use super::{wire, Engine, Key, ListQuery};
use crate::config::StorageConfig;
use crate::http::admin::Component;
use crate::http::server::{wait_for, Shutdown};
use crate::metrics::Metrics;

/// Most items one listing request may ask for, whatever the client says.
pub const MAX_LIST_LIMIT: usize = 10_000;
/// Longest a read with a consistency token waits for this node to reach it.
pub const MAX_TOKEN_WAIT: Duration = Duration::from_secs(5);

/// Why the storage server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS material is unusable.
    #[error("storage.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// Replication could not be set up.
    #[error(transparent)]
    Replication(#[from] super::replication::ReplicationError),
}

/// Limits of one connection, from the config.
#[derive(Clone, Debug)]
struct Limits {
    max_frame: usize,
    max_in_flight: usize,
    max_connections: usize,
    handshake_timeout: Duration,
    frame_timeout: Duration,
}

/// The storage server: the engine, the secret peers must prove, and the limits.
pub struct StorageServer {
    engine: Arc<Engine>,
    repl: Arc<Replication>,
    secret: Arc<[u8]>,
    node: String,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    open: AtomicUsize,
    rejected: Counter,
}

impl StorageServer {
    /// Builds the server for a `[storage]` section; fails if its TLS files are unusable.
    pub fn new(
        config: &StorageConfig,
        engine: Arc<Engine>,
        secret: &[u8],
        node: &str,
    ) -> Result<Arc<Self>, ServerError> {
        let tls = match &config.tls {
            Some(t) => Some(TlsAcceptor::from(crate::tls::server_config(
                &t.cert,
                &t.key,
                t.client_ca.as_deref(),
            )?)),
            None => None,
        };
        let repl = Replication::new(config, engine.clone(), secret, node)?;
        Ok(Arc::new(StorageServer {
            repl,
            engine,
            secret: Arc::from(secret),
            node: node.to_owned(),
            limits: Limits {
                max_frame: config.max_frame.as_usize().min(protocol::MAX_FRAME_CEILING),
                max_in_flight: config.max_in_flight.max(1),
                max_connections: config.max_connections.max(1),
                handshake_timeout: config.handshake_timeout.get(),
                frame_timeout: config.frame_timeout.get(),
            },
            tls,
            open: AtomicUsize::new(0),
            rejected: Counter::default(),
        }))
    }

    /// The node's replication state (role, replicas, link to the primary).
    pub fn replication(&self) -> &Arc<Replication> {
        &self.repl
    }

    /// Registers the server's metrics: open connections and rejected peers.
    pub fn register_metrics(self: &Arc<Self>, metrics: &Metrics) {
        self.repl.register_metrics(metrics);
        let me = self.clone();
        metrics.gauge_fn(
            "storage_connections",
            "Open connections to the storage server",
            move || me.open.load(Ordering::Relaxed) as i64,
        );
        metrics.register(
            "storage_rejected_connections",
            "Storage connections closed for a protocol or authentication failure",
            self.rejected.clone(),
        );
    }

    /// Accepts connections until `shutdown`, then waits up to `grace` for open ones to
    /// answer what they have started. Returns how many were still open at the deadline.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: Shutdown,
        grace: Duration,
    ) -> usize {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = wait_for(&mut shutdown) => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(listener = "storage", error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = wait_for(&mut shutdown) => break,
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            let stop = shutdown.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                me.open.fetch_add(1, Ordering::Relaxed);
                match me.clone().connection(stream, peer, stop).await {
                    Ok(()) => {}
                    // Connect-and-close without a byte: a TCP health check or port scan.
                    Err(ConnError::Closed) => {
                        tracing::debug!(%peer, "storage connection closed before the handshake");
                    }
                    Err(reason) => {
                        me.rejected.inc();
                        tracing::warn!(%peer, reason = %reason, "storage connection closed");
                    }
                }
                me.open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
                drop(done);
            });
        }
        drop(listener);
        drop(done_tx);
        let open = self.open.load(Ordering::Relaxed);
        if open > 0 {
            tracing::info!(listener = "storage", open, "draining storage connections");
        }
        match tokio::time::timeout(grace, done_rx.recv()).await {
            Ok(_) => 0,
            Err(_) => {
                tracing::warn!(
                    listener = "storage",
                    "drain deadline passed; closing remaining connections"
                );
                self.open.load(Ordering::Relaxed).max(1)
            }
        }
    }

    /// One connection from accept to close. `Err` carries the reason for the log.
    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        mut shutdown: Shutdown,
    ) -> Result<(), ConnError> {
        let setup = async {
            let stream: BoxStream = match &self.tls {
                Some(acceptor) => Box::new(
                    acceptor
                        .accept(tcp)
                        .await
                        .map_err(|e| ConnError::Tls(e.to_string()))?,
                ),
                None => Box::new(tcp),
            };
            let mut fr = FrameReader::new(stream, self.limits.max_frame, self.limits.frame_timeout);
            let accepted = conn::server_handshake(&mut fr, &self.secret).await?;
            let welcome = Message::Welcome {
                node: self.node.clone(),
                epoch: self.engine.status().epoch,
                role: self.repl.role().name().into(),
            };
            conn::write_message(fr.get_mut(), &welcome).await?;
            Ok::<_, ConnError>((fr, accepted.purpose))
        };
        let (fr, purpose) = tokio::select! {
            r = tokio::time::timeout(self.limits.handshake_timeout, setup) => match r {
                Ok(r) => r?,
                Err(_) => return Err(ConnError::Timeout("the handshake")),
            },
            _ = wait_for(&mut shutdown) => return Ok(()),
        };
        if purpose == Purpose::Replica {
            tracing::debug!(%peer, "replica authenticated");
            return self.repl.clone().serve_replica(fr, peer, shutdown).await;
        }
        if purpose == Purpose::Feed {
            tracing::debug!(%peer, "change feed subscriber authenticated");
            let repl = self.repl.clone();
            // Only a replica lags; a primary skips the status (and its disk-size call).
            let lag = move || match repl.role() {
                super::replication::Role::Replica { .. } => {
                    Duration::from_millis(repl.wire_status().lag_ms)
                }
                _ => Duration::ZERO,
            };
            return super::feed::serve(
                self.engine.clone(),
                lag,
                fr,
                self.limits.frame_timeout,
                shutdown,
            )
            .await;
        }
        tracing::debug!(%peer, "storage client authenticated");
        self.serve(fr, shutdown).await
    }

    /// The request loop of an authenticated connection.
    async fn serve(
        self: Arc<Self>,
        fr: FrameReader<BoxStream>,
        mut shutdown: Shutdown,
    ) -> Result<(), ConnError> {
        let (stream, buf) = fr.into_parts();
        let (rd, wr) = tokio::io::split(stream);
        let mut fr =
            FrameReader::with_buf(rd, buf, self.limits.max_frame, self.limits.frame_timeout);
        let (tx, rx) = mpsc::channel::<Vec<u8>>(self.limits.max_in_flight);
        let mut writer = tokio::spawn(write_loop(wr, rx, self.limits.frame_timeout));
        // Requests that wait on the engine (writes), polled here rather than spawned: a
        // task per write cost 7 % of the storage server's instructions per PUT. At most
        // `max_in_flight` at once; past that the loop stops reading until one answers.
        let mut waiting = FuturesUnordered::new();
        let max_waiting = self.limits.max_in_flight;
        // One shutdown future for the whole loop: making one per frame cost 3 % of a
        // write's instructions (a watch subscription each time). Never polled again
        // once it has fired: the select breaks on it.
        let stop = wait_for(&mut shutdown);
        tokio::pin!(stop);
        let outcome = loop {
            let msg = tokio::select! {
                biased;
                _ = &mut stop => break Ok(()),
                w = &mut writer => {
                    // The writer only ends early on a failed or stalled write.
                    break match w {
                        Ok(Err(e)) => Err(e),
                        _ => Ok(()),
                    };
                }
                Some(frame) = waiting.next(), if !waiting.is_empty() => {
                    // A failed send means the writer ended; the select reports why.
                    let _ = tx.send(frame).await;
                    continue;
                }
                m = fr.read(), if waiting.len() < max_waiting => m,
            };
            let (id, body) = match msg {
                Ok(Some(Message::Request { id, body })) => (id, body),
                Ok(Some(_)) => {
                    break Err(
                        ProtocolError::Unexpected("a handshake message after the handshake").into(),
                    )
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            if is_plain_read(&body) {
                // Answered on the spot: sled serves reads without waiting on anything.
                let _ = tx.send(self.frame(id, to_response(self.read(body)))).await;
                continue;
            }
            waiting.push(self.answer_frame(id, body));
        };
        match &outcome {
            // Clean end: let requests in progress answer (bounded), then close.
            Ok(()) if !writer.is_finished() => {
                let finish = async {
                    while let Some(frame) = waiting.next().await {
                        if tx.send(frame).await.is_err() {
                            break;
                        }
                    }
                    drop(tx);
                    let _ = (&mut writer).await;
                };
                if tokio::time::timeout(self.limits.frame_timeout * 2, finish)
                    .await
                    .is_err()
                {
                    writer.abort();
                }
            }
            _ => writer.abort(),
        }
        outcome
    }

    /// Carries out one request and encodes its answer.
    async fn answer_frame(&self, id: u64, request: Request) -> Vec<u8> {
        let answer = to_response(self.answer_inner(request).await);
        self.frame(id, answer)
    }

    /// Encodes an answer, replacing one too large for any peer with an error.
    fn frame(&self, id: u64, body: Response) -> Vec<u8> {
        let frame = protocol::encode_frame(&Message::Response { id, body });
        if frame.len() - 4 <= protocol::MAX_FRAME_CEILING {
            return frame;
        }
        let error = WireError {
            kind: ErrorKind::InvalidBatch,
            message: format!(
                "the answer is {} bytes, over the protocol's limit; ask for a smaller page",
                frame.len()
            ),
            index: None,
            key: None,
            current: None,
        };
        protocol::encode_frame(&Message::Response {
            id,
            body: Response::Error(error),
        })
    }

    /// Carries out a plain read (`Get`, `GetAt`, `List`). Sled serves these from memory
    /// without waiting on anything, so the request loop answers them on the spot, ahead of
    /// the writes waiting on the engine (see [`StorageServer::serve`]).
    fn read(&self, request: Request) -> Result<Response, StoreError> {
        let invalid = |m: String| StoreError::InvalidBatch(m);
        if self.engine.resyncing() {
            return Err(StoreError::Unavailable(
                "this replica is installing a snapshot; read from another node".into(),
            ));
        }
        match request {
            Request::Get { key } => {
                let key = Key::parse(&key).map_err(|e| invalid(format!("key {key:?}: {e}")))?;
                let record = self.engine.get(&key)?;
                Ok(Response::Record(record.as_ref().map(wire::record_to_wire)))
            }
            Request::GetAt { key } => {
                let key = Key::parse(&key).map_err(|e| invalid(format!("key {key:?}: {e}")))?;
                let read_lsn = self.engine.applied_lsn();
                let record = self.engine.get(&key)?;
                Ok(Response::RecordAt {
                    record: record.as_ref().map(wire::record_to_wire),
                    read_lsn,
                })
            }
            Request::List {
                collection,
                prefix,
                after,
                limit,
            } => {
                Key::check_collection(&collection).map_err(|e| invalid(e.to_string()))?;
                let query = ListQuery {
                    prefix,
                    after,
                    limit: (limit as usize).clamp(1, MAX_LIST_LIMIT),
                };
                let page = self.engine.list(&collection, &query)?;
                Ok(Response::Page {
                    items: page
                        .items
                        .iter()
                        .map(|(id, r)| (id.clone(), wire::record_to_wire(r)))
                        .collect(),
                    next: page.next,
                })
            }
            _ => Err(invalid("not a plain read".into())),
        }
    }

    async fn answer_inner(&self, request: Request) -> Result<Response, StoreError> {
        let invalid = |m: String| StoreError::InvalidBatch(m);
        match request {
            Request::AtLeast {
                min_epoch,
                min_lsn,
                wait_ms,
                read,
            } => {
                if !is_plain_read(&read) {
                    return Err(invalid("AtLeast wraps only Get, GetAt or List".into()));
                }
                let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_TOKEN_WAIT);
                let mut rx = self.engine.subscribe_durable();
                let reached = |d: &u64| {
                    *d >= min_lsn && self.engine.epoch() >= min_epoch && !self.engine.resyncing()
                };
                let now = reached(&rx.borrow_and_update());
                let ok = now
                    || tokio::time::timeout(wait, rx.wait_for(reached))
                        .await
                        .map(|r| r.is_ok())
                        .unwrap_or(false);
                if !ok {
                    return Err(StoreError::Behind(format!(
                        "{} is at ({}, {}), the read needs ({min_epoch}, {min_lsn})",
                        self.node,
                        self.engine.epoch(),
                        self.engine.status().durable_lsn
                    )));
                }
                self.read(*read)
            }
            Request::ReplStatus => Ok(Response::ReplStatus(self.repl.wire_status())),
            Request::ContentHash => {
                let lsn = self.engine.status().durable_lsn;
                let (records, hash) = self.engine.content_hash()?;
                Ok(Response::ContentHash { lsn, records, hash })
            }
            read @ (Request::Get { .. } | Request::GetAt { .. } | Request::List { .. }) => {
                self.read(read)
            }
            Request::Write { writes } => {
                if let Some(refusal) = self.repl.refuse_write() {
                    return Err(refusal);
                }
                let writes = writes
                    .into_iter()
                    .enumerate()
                    .map(|(i, w)| {
                        wire::write_from_wire(w).map_err(|m| invalid(format!("write {i}: {m}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let committed = self.engine.write(writes).await?;
                self.repl.wait_replicated(committed.lsn).await?;
                Ok(Response::Committed {
                    lsn: committed.lsn,
                    epoch: committed.epoch,
                    results: wire::results_to_wire(&committed),
                })
            }
            Request::Status => {
                let s = self.engine.status();
                Ok(Response::Status(WireStatus {
                    node: self.node.clone(),
                    role: self.repl.role().name().into(),
                    epoch: s.epoch,
                    last_lsn: s.last_lsn,
                    durable_lsn: s.durable_lsn,
                    records: s.records,
                }))
            }
        }
    }
}

/// Sends answers as they come, coalescing those ready together into one write. A peer that
/// does not take a write within `stall` is given up on.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    stall: Duration,
) -> Result<(), ConnError> {
    let mut out = Vec::with_capacity(64 << 10);
    while let Some(frame) = rx.recv().await {
        out.extend_from_slice(&frame);
        while out.len() < (256 << 10) {
            match rx.try_recv() {
                Ok(f) => out.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        match tokio::time::timeout(stall, wr.write_all(&out)).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnError::Timeout("a write to a peer that is not reading")),
        }
        out.clear();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    Ok(())
}

impl Component for StorageServer {
    fn name(&self) -> &'static str {
        "storage"
    }

    fn ready(&self) -> Result<(), String> {
        self.repl.ready()
    }

    fn status(&self) -> serde_json::Value {
        let s = self.engine.status();
        serde_json::json!({
            "mode": self.repl.role().name(),
            "replication": self.repl.status(),
            "tls": self.tls.is_some(),
            "connections": self.open.load(Ordering::Relaxed),
            "rejected_connections": self.rejected.get(),
            "last_lsn": s.last_lsn,
            "durable_lsn": s.durable_lsn,
            "first_log_lsn": s.first_log_lsn,
            "epoch": s.epoch,
            "records": s.records,
            "disk_bytes": s.disk_bytes,
        })
    }
}

/// `Get`, `GetAt` and `List`: reads that never wait, answered by [`StorageServer::read`].
fn is_plain_read(request: &Request) -> bool {
    matches!(
        request,
        Request::Get { .. } | Request::GetAt { .. } | Request::List { .. }
    )
}

/// An outcome as the peer gets it: errors become [`Response::Error`].
fn to_response(outcome: Result<Response, StoreError>) -> Response {
    outcome.unwrap_or_else(|e| Response::Error(wire::error_to_wire(&e)))
}
