//! Log shipping: the sender on a primary, the follower on a replica, promotion and
//! fencing, and `sync_replicas`.
//!
//! ```text
//! replica                                   primary
//!   ── Hello/Auth (Purpose::Replica) ──────▶
//!   ◀───────────────────────────── Welcome
//!   ── Subscribe{history, applied_lsn} ───▶   state::plan(): resume | snapshot | refuse
//!   ◀── StreamStart{history, from}            (resume)
//!   ◀── SnapshotBegin{history, tag} · SnapshotChunk* · SnapshotEnd{end}   (snapshot)
//!   ◀── Entries{primary_lsn, [entry]} ...     woken by the engine's durable-LSN watch
//!   ── Ack{applied_lsn} ──────────────────▶   after each durable apply
//!   ◀── Heartbeat{primary_lsn}                when idle, every second
//! ```
//!
//! The decisions (which plan, whether an entry may be applied) are in [`state`], pure;
//! this module is the I/O around them. Bounded everywhere: the sender holds one batch of
//! entries at a time and reads them from the log (never from a queue fed by writes), so a
//! slow replica costs the primary nothing but a lagging reader; one that stops taking
//! bytes for `frame_timeout`, or falls out of the log's retention, is cut and resyncs.

pub mod state;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use self::state::{plan, History, Plan, PrimaryPosition, ReplicaPosition};
use super::conn::{self, BoxStream, ConnError, FrameReader};
use super::engine::LogEntry;
use super::protocol::{self, Message, ProtocolError, Purpose, WireReplStatus};
use super::store::StoreError;
use super::{wire, Engine, EngineError, Key};
use crate::config::{StorageConfig, StorageMode, SyncPolicy};
use crate::http::server::{wait_for, Shutdown};
use crate::metrics::Metrics;

/// Most entries one `Entries` frame carries.
const BATCH_ENTRIES: usize = 1024;
/// Bytes of encoded entries (or snapshot records) after which a frame is closed.
const BATCH_BYTES: usize = 1 << 20;
/// Bytes of encoded entries the log reader of a snapshot sender may queue ahead of the
/// replica: the memory one snapshotting replica may cost the primary.
const TAIL_BYTES: usize = 32 << 20;
/// The primary says it is alive this often when there is nothing to send.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A replica that hears nothing for this long reconnects.
const IDLE_LIMIT: Duration = Duration::from_secs(5);
/// First reconnect wait of a replica; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest reconnect wait of a replica.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why replication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The TLS settings for following the primary are unusable.
    #[error("storage.follow_tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// `follow` is not `host:port`.
    #[error("storage.follow: {0:?} is not host:port")]
    Address(String),
}

/// What this storage node is right now. Starts from the config; promotion and fencing
/// change it at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes writes, ships its log.
    Primary,
    /// Follows `primary`, serves reads, refuses writes.
    Replica {
        /// Where writes belong.
        primary: String,
    },
    /// Was primary, then learnt of a newer epoch: takes no writes and ships nothing, so
    /// its tail can never spread. Restart it as a replica to rejoin.
    Fenced {
        /// The newer epoch it learnt of.
        newer_epoch: u64,
    },
}

impl Role {
    /// The name shown in status pages.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica { .. } => "replica",
            Role::Fenced { .. } => "fenced",
        }
    }
}

/// When LSNs became known (durable on a primary, announced to a replica), so lag can be
/// told in time, not only in entries: the lag of a node at LSN `a` is the age of the first
/// LSN above `a`. Bounded: old samples are dropped, which only makes old lags coarser.
#[derive(Default)]
struct Timeline {
    samples: Mutex<VecDeque<(u64, Instant)>>,
}

impl Timeline {
    fn record(&self, lsn: u64) {
        if let Ok(mut s) = self.samples.lock() {
            if s.back().is_some_and(|&(l, _)| l >= lsn) {
                return;
            }
            s.push_back((lsn, Instant::now()));
            while s.len() > 4096 {
                s.pop_front();
            }
        }
    }

    /// How long a node at `applied` has been behind: the age of the first known LSN above it.
    fn lag(&self, applied: u64) -> Duration {
        let Ok(s) = self.samples.lock() else {
            return Duration::ZERO;
        };
        match s.iter().find(|&&(l, _)| l > applied) {
            Some(&(_, at)) => at.elapsed(),
            None => Duration::ZERO,
        }
    }

    fn newest(&self) -> u64 {
        self.samples
            .lock()
            .ok()
            .and_then(|s| s.back().map(|&(l, _)| l))
            .unwrap_or(0)
    }
}

/// A replica as its primary sees it.
struct Peer {
    node: String,
    addr: SocketAddr,
    applied: u64,
    phase: &'static str,
    since: Instant,
}

/// A replica's view of its link to the primary.
#[derive(Default)]
struct Link {
    connected: bool,
    primary_node: Option<String>,
    last_contact: Option<Instant>,
    last_error: Option<String>,
    /// Applied LSN the replica must reach before it is consistent (end of a snapshot).
    ready_after: u64,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    replica: String,
}

/// Replication's metrics.
#[derive(Clone, Default)]
struct ReplMetrics {
    entries_shipped: Counter,
    snapshots_sent: Counter,
    snapshots_installed: Counter,
    entries_applied: Counter,
    cut_too_far_behind: Counter,
    sync_degraded: Counter,
    sync_failed: Counter,
    reconnects: Counter,
    refused: Counter,
    replica_lag_entries: Family<ReplicaLabels, Gauge>,
    replica_lag_ms: Family<ReplicaLabels, Gauge>,
}

/// The replication settings that change on reload.
#[derive(Debug)]
struct LiveSettings {
    sync_replicas: usize,
    sync_timeout: Duration,
    sync_policy: SyncPolicy,
    max_lag: Duration,
}

impl LiveSettings {
    fn from_config(config: &StorageConfig) -> Self {
        LiveSettings {
            sync_replicas: config.sync_replicas,
            sync_timeout: config.sync_timeout.get(),
            sync_policy: config.sync_policy,
            max_lag: config.max_lag.get(),
        }
    }
}

/// Replication state of one storage node: its role, the replicas it ships to (as a
/// primary), its link to the primary (as a replica).
pub struct Replication {
    engine: Arc<Engine>,
    node: String,
    secret: Arc<[u8]>,
    role: Mutex<Role>,
    role_tx: watch::Sender<u64>,
    follow: Option<String>,
    follow_tls: Option<(TlsConnector, ServerName<'static>)>,
    /// `sync_replicas`, `sync_timeout`, `sync_policy`, `max_lag`: swapped whole on reload.
    live: arc_swap::ArcSwap<LiveSettings>,
    frame_timeout: Duration,
    max_frame: usize,
    peers: Mutex<HashMap<u64, Peer>>,
    next_peer: AtomicU64,
    acks: watch::Sender<u64>,
    durable_times: Timeline,
    primary_times: Timeline,
    link: Mutex<Link>,
    stop_follow: watch::Sender<bool>,
    /// Held by the follower around each change it makes to the engine, and by promotion,
    /// so no replicated write can land after the promotion's new epoch.
    apply_gate: tokio::sync::Mutex<()>,
    metrics: ReplMetrics,
}

impl Replication {
    /// Sets up replication for a `[storage]` section.
    pub fn new(
        config: &StorageConfig,
        engine: Arc<Engine>,
        secret: &[u8],
        node: &str,
    ) -> Result<Arc<Self>, ReplicationError> {
        let role = match (&config.mode, &config.follow) {
            (StorageMode::Replica, Some(p)) => Role::Replica { primary: p.clone() },
            _ => Role::Primary,
        };
        let follow_tls = match (&config.follow, &config.follow_tls) {
            (Some(addr), Some(t)) => {
                let host = super::client::split_host(addr)
                    .ok_or_else(|| ReplicationError::Address(addr.clone()))?;
                let cfg = crate::tls::client_config(&t.ca, t.cert.as_deref(), t.key.as_deref())?;
                let name = crate::tls::server_name(t.server_name.as_deref().unwrap_or(host))?;
                Some((TlsConnector::from(cfg), name))
            }
            _ => None,
        };
        let me = Arc::new(Replication {
            durable_times: Timeline::default(),
            primary_times: Timeline::default(),
            engine,
            node: node.to_owned(),
            secret: Arc::from(secret),
            role: Mutex::new(role),
            role_tx: watch::channel(0).0,
            follow: config.follow.clone(),
            follow_tls,
            live: arc_swap::ArcSwap::from_pointee(LiveSettings::from_config(config)),
            frame_timeout: config.frame_timeout.get(),
            max_frame: config.max_frame.as_usize().min(protocol::MAX_FRAME_CEILING),
            peers: Mutex::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            acks: watch::channel(0).0,
            link: Mutex::new(Link {
                phase: "connecting",
                ..Link::default()
            }),
            stop_follow: watch::channel(false).0,
            apply_gate: tokio::sync::Mutex::new(()),
            metrics: ReplMetrics::default(),
        });
        Ok(me)
    }

    /// Starts the background work: the durable-LSN timeline (for lag in seconds) and, on
    /// a replica, the follower. Both stop on `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: Shutdown) {
        let me = self.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut rx = me.engine.subscribe_durable();
            loop {
                let lsn = *rx.borrow_and_update();
                me.durable_times.record(lsn);
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = wait_for(&mut stop) => break,
                }
            }
        });
        if matches!(self.role(), Role::Replica { .. }) {
            tokio::spawn(self.clone().follow_loop(shutdown));
        }
    }

    /// Applies a reloaded `[storage]` section's live settings (`sync_replicas`,
    /// `sync_timeout`, `sync_policy`, `max_lag`); writes already waiting keep the settings
    /// they started with.
    pub fn apply(&self, config: &StorageConfig) {
        self.live.store(Arc::new(LiveSettings::from_config(config)));
    }

    /// The current role.
    pub fn role(&self) -> Role {
        match self.role.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_role(&self, role: Role) {
        match self.role.lock() {
            Ok(mut r) => *r = role,
            Err(p) => *p.into_inner() = role,
        }
        self.role_tx.send_modify(|n| *n += 1);
    }

    /// Why this node refuses a write, if it does: a replica names its primary.
    pub fn refuse_write(&self) -> Option<StoreError> {
        match self.role() {
            Role::Primary => None,
            Role::Replica { primary } => Some(StoreError::ReadOnly(format!(
                "this storage node ({}) is a read replica; send writes to the primary at {primary}",
                self.node
            ))),
            Role::Fenced { newer_epoch } => Some(StoreError::ReadOnly(format!(
                "this storage node ({}) was deposed: a primary of epoch {newer_epoch} exists; \
                 restart it as a replica of that primary",
                self.node
            ))),
        }
    }

    /// Waits until `sync_replicas` replicas hold `lsn` durably, for at most
    /// `sync_timeout`; then applies `sync_policy`. Immediate with `sync_replicas = 0`.
    pub async fn wait_replicated(&self, lsn: u64) -> Result<(), StoreError> {
        let live = self.live.load_full();
        let want = live.sync_replicas;
        if want == 0 {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + live.sync_timeout;
        let mut rx = self.acks.subscribe();
        loop {
            rx.borrow_and_update();
            if self.replicas_at(lsn) >= want {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => break,
            }
        }
        let have = self.replicas_at(lsn);
        if have >= want {
            return Ok(());
        }
        match live.sync_policy {
            SyncPolicy::Fail => {
                self.metrics.sync_failed.inc();
                tracing::warn!(
                    lsn,
                    have,
                    want,
                    "write not confirmed by enough replicas in time (sync_policy = fail)"
                );
                Err(StoreError::OutcomeUnknown(format!(
                    "the write is durable on the primary at LSN {lsn} but only {have} of {want} \
                     replicas confirmed it within {:?} (sync_policy = \"fail\")",
                    live.sync_timeout
                )))
            }
            SyncPolicy::Degrade => {
                self.metrics.sync_degraded.inc();
                tracing::warn!(lsn, have, want, "acknowledging a write with fewer replicas than sync_replicas (sync_policy = degrade)");
                Ok(())
            }
        }
    }

    fn replicas_at(&self, lsn: u64) -> usize {
        self.peers
            .lock()
            .map(|p| p.values().filter(|r| r.applied >= lsn).count())
            .unwrap_or(0)
    }

    /// Turns this replica into the primary of a new epoch: stops following, then stores
    /// the new epoch (after the last applied LSN) durably. Returns `(epoch, lsn)`.
    pub async fn promote(&self) -> Result<(u64, u64), String> {
        match self.role() {
            Role::Replica { .. } => {}
            Role::Primary => return Err("this node is already the primary".into()),
            Role::Fenced { .. } => {
                return Err("this node was deposed; restart it as a replica instead".into())
            }
        }
        if self.engine.resyncing() {
            return Err(
                "this replica is installing a snapshot: its data is partial; promote another one"
                    .into(),
            );
        }
        self.stop_follow.send_replace(true);
        let _gate = self.apply_gate.lock().await;
        let epoch = self
            .engine
            .promote(state::node_tag(&self.node))
            .await
            .map_err(|e| e.to_string())?;
        let lsn = self.engine.status().last_lsn;
        self.set_role(Role::Primary);
        if let Ok(mut l) = self.link.lock() {
            l.connected = false;
            l.phase = "promoted";
        }
        tracing::warn!(epoch, lsn, "promoted to primary of a new epoch");
        Ok((epoch, lsn))
    }

    fn fence(&self, newer_epoch: u64) {
        if self.role() == Role::Primary {
            tracing::error!(
                newer_epoch,
                own_epoch = self.engine.epoch(),
                "a replica knows a newer epoch: this node was deposed; refusing writes from now on"
            );
            self.set_role(Role::Fenced { newer_epoch });
        }
    }

    /// This node's replication state for the wire (read routing) and status pages.
    pub fn wire_status(&self) -> WireReplStatus {
        let st = self.engine.status();
        let role = self.role();
        let (primary_lsn, lag, ready, primary) = match &role {
            Role::Replica { primary } => {
                let lag = self.replica_lag(st.durable_lsn);
                let ready = self.replica_ready(st.durable_lsn, lag);
                (
                    self.primary_times.newest().max(st.durable_lsn),
                    lag,
                    ready,
                    Some(primary.clone()),
                )
            }
            _ => (st.durable_lsn, Duration::ZERO, true, None),
        };
        WireReplStatus {
            role: role.name().into(),
            epoch: st.epoch,
            applied_lsn: st.durable_lsn,
            primary_lsn,
            lag_ms: u64::try_from(lag.as_millis()).unwrap_or(u64::MAX),
            ready: ready && !self.engine.resyncing(),
            primary,
        }
    }

    /// A replica's lag: time since it last held all it knew the primary had; while
    /// disconnected, at least the time since it last heard from the primary.
    fn replica_lag(&self, applied: u64) -> Duration {
        let lag = self.primary_times.lag(applied);
        let (connected, last) = self
            .link
            .lock()
            .map(|l| (l.connected, l.last_contact))
            .unwrap_or((false, None));
        if connected {
            return lag;
        }
        match last {
            Some(t) => lag.max(t.elapsed()),
            None => Duration::MAX,
        }
    }

    fn replica_ready(&self, applied: u64, lag: Duration) -> bool {
        let after = self.link.lock().map(|l| l.ready_after).unwrap_or(0);
        !self.engine.resyncing() && applied >= after && lag <= self.live.load().max_lag
    }

    /// `Ok` when this node can serve; a replica must have finished any snapshot and be
    /// within `max_lag`.
    pub fn ready(&self) -> Result<(), String> {
        match self.role() {
            Role::Primary => Ok(()),
            Role::Fenced { newer_epoch } => Err(format!(
                "deposed by epoch {newer_epoch}; restart as a replica"
            )),
            Role::Replica { .. } => {
                let applied = self.engine.status().durable_lsn;
                let lag = self.replica_lag(applied);
                if self.engine.resyncing() {
                    return Err("installing a snapshot from the primary".into());
                }
                if self.replica_ready(applied, lag) {
                    Ok(())
                } else {
                    Err(format!(
                        "replica behind: applied LSN {applied}, lag {lag:?} (max_lag {:?})",
                        self.live.load().max_lag
                    ))
                }
            }
        }
    }

    /// The `replication` part of `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let ws = self.wire_status();
        let durable = self.engine.status().durable_lsn;
        let replicas: Vec<serde_json::Value> = self
            .peers
            .lock()
            .map(|p| {
                p.values()
                    .map(|r| {
                        serde_json::json!({
                            "node": r.node,
                            "addr": r.addr.to_string(),
                            "phase": r.phase,
                            "applied_lsn": r.applied,
                            "lag_entries": durable.saturating_sub(r.applied),
                            "lag_seconds": self.durable_times.lag(r.applied).as_secs_f64(),
                            "connected_seconds": r.since.elapsed().as_secs(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let link = self.link.lock().ok();
        serde_json::json!({
            "role": ws.role,
            "epoch": ws.epoch,
            "history": self.engine.history().to_pairs(),
            "applied_lsn": ws.applied_lsn,
            "primary_lsn": ws.primary_lsn,
            "lag_entries": ws.primary_lsn.saturating_sub(ws.applied_lsn),
            "lag_seconds": ws.lag_ms as f64 / 1000.0,
            "ready": ws.ready,
            "follow": self.follow,
            "link": link.as_ref().map(|l| serde_json::json!({
                "connected": l.connected,
                "phase": l.phase,
                "primary_node": l.primary_node,
                "last_error": l.last_error,
                "ready_after_lsn": l.ready_after,
            })),
            "replicas": replicas,
            "sync_replicas": self.live.load().sync_replicas,
            "sync_timeout_ms": self.live.load().sync_timeout.as_millis() as u64,
            "max_lag_ms": self.live.load().max_lag.as_millis() as u64,
            "sync_policy": match self.live.load().sync_policy { SyncPolicy::Fail => "fail", SyncPolicy::Degrade => "degrade" },
            "sync_degraded": self.metrics.sync_degraded.get(),
            "resyncing": self.engine.resyncing(),
        })
    }

    /// Registers replication metrics (both roles' sets; the idle side's stay at zero).
    pub fn register_metrics(self: &Arc<Self>, metrics: &Metrics) {
        let m = &self.metrics;
        metrics.register(
            "replication_entries_shipped",
            "Log entries sent to replicas",
            m.entries_shipped.clone(),
        );
        metrics.register(
            "replication_entries_applied",
            "Log entries applied from the primary",
            m.entries_applied.clone(),
        );
        metrics.register(
            "replication_snapshots_sent",
            "Snapshots sent to replicas",
            m.snapshots_sent.clone(),
        );
        metrics.register(
            "replication_snapshots_installed",
            "Snapshots installed from the primary",
            m.snapshots_installed.clone(),
        );
        metrics.register(
            "replication_cut_too_far_behind",
            "Replica streams cut because the replica fell out of the log's retention",
            m.cut_too_far_behind.clone(),
        );
        metrics.register(
            "replication_sync_degraded",
            "Writes acknowledged with fewer replicas than sync_replicas (sync_policy = degrade)",
            m.sync_degraded.clone(),
        );
        metrics.register(
            "replication_sync_failed",
            "Writes answered 'outcome unknown' because too few replicas confirmed in time",
            m.sync_failed.clone(),
        );
        metrics.register(
            "replication_reconnects",
            "Connection attempts of this replica to its primary",
            m.reconnects.clone(),
        );
        metrics.register(
            "replication_refused",
            "Replication streams or entries refused (stale epoch, bad order, corrupt)",
            m.refused.clone(),
        );
        metrics.register(
            "replication_replica_lag_entries",
            "Per replica (on the primary): durable LSN minus the replica's acknowledged LSN",
            m.replica_lag_entries.clone(),
        );
        metrics.register(
            "replication_replica_lag_milliseconds",
            "Per replica (on the primary): age of the oldest entry the replica lacks",
            m.replica_lag_ms.clone(),
        );
        let weak = Arc::downgrade(self);
        metrics.on_scrape(move || {
            let Some(me) = weak.upgrade() else { return };
            let durable = me.engine.status().durable_lsn;
            me.metrics.replica_lag_entries.clear();
            me.metrics.replica_lag_ms.clear();
            let peers: Vec<(String, u64)> = me
                .peers
                .lock()
                .map(|p| {
                    p.values()
                        .map(|r| (format!("{}@{}", r.node, r.addr), r.applied))
                        .collect()
                })
                .unwrap_or_default();
            {
                for (replica, applied) in peers {
                    let r = Peer2 { replica, applied };
                    let l = ReplicaLabels { replica: r.replica };
                    let entries = durable.saturating_sub(r.applied);
                    me.metrics
                        .replica_lag_entries
                        .get_or_create(&l)
                        .set(i64::try_from(entries).unwrap_or(i64::MAX));
                    let ms = me.durable_times.lag(r.applied).as_millis();
                    me.metrics
                        .replica_lag_ms
                        .get_or_create(&l)
                        .set(i64::try_from(ms).unwrap_or(i64::MAX));
                }
            }
        });
        let w = Arc::downgrade(self);
        metrics.gauge_fn(
            "replication_lag_milliseconds",
            "On a replica: time since it last held everything it knew the primary had",
            move || {
                w.upgrade().map_or(0, |me| {
                    i64::try_from(me.wire_status().lag_ms).unwrap_or(i64::MAX)
                })
            },
        );
        let w = Arc::downgrade(self);
        metrics.gauge_fn(
            "replication_lag_entries",
            "On a replica: the primary's known LSN minus the applied LSN",
            move || {
                w.upgrade().map_or(0, |me| {
                    let s = me.wire_status();
                    i64::try_from(s.primary_lsn.saturating_sub(s.applied_lsn)).unwrap_or(0)
                })
            },
        );
        let w = Arc::downgrade(self);
        metrics.gauge_fn(
            "replication_replicas_connected",
            "On a primary: replicas streaming from it",
            move || {
                w.upgrade()
                    .map_or(0, |me| me.peers.lock().map_or(0, |p| p.len() as i64))
            },
        );
        let w = Arc::downgrade(self);
        metrics.gauge_fn(
            "replication_epoch",
            "Current epoch of this storage node",
            move || w.upgrade().map_or(0, |me| me.engine.epoch() as i64),
        );
    }

    // ---------------------------------------------------------------- primary side

    /// Serves one authenticated replica connection (after Welcome): reads its
    /// Subscribe, plans, sends a snapshot if needed, then streams the log until the
    /// connection ends, shutdown, or this node stops being the primary.
    pub async fn serve_replica(
        self: Arc<Self>,
        fr: FrameReader<BoxStream>,
        addr: SocketAddr,
        mut shutdown: Shutdown,
    ) -> Result<(), ConnError> {
        let (stream, buf) = fr.into_parts();
        let (rd, mut wr) = tokio::io::split(stream);
        let mut fr = FrameReader::with_buf(rd, buf, self.max_frame, self.frame_timeout);
        let subscribe = tokio::select! {
            m = tokio::time::timeout(self.frame_timeout, fr.read()) => match m {
                Ok(m) => m?,
                Err(_) => return Err(ConnError::Timeout("waiting for Subscribe")),
            },
            _ = wait_for(&mut shutdown) => return Ok(()),
        };
        let Some(Message::Subscribe {
            node,
            history,
            applied_lsn,
            needs_snapshot,
        }) = subscribe
        else {
            return Err(ProtocolError::Unexpected("expected Subscribe on a replica link").into());
        };
        if self.role() != Role::Primary {
            let why = format!(
                "{} is not a primary ({}); follow the current primary",
                self.node,
                self.role().name()
            );
            conn::refuse(&mut wr, &why).await;
            return Err(ConnError::Refused(why));
        }
        let history = match History::from_pairs(&history) {
            Ok(h) => h,
            Err(e) => {
                self.metrics.refused.inc();
                return Err(ProtocolError::Malformed(format!("replica history: {e}")).into());
            }
        };
        let st = self.engine.status();
        let primary = PrimaryPosition {
            history: self.engine.history(),
            first_log_lsn: st.first_log_lsn,
            durable_lsn: st.durable_lsn,
        };
        let replica = ReplicaPosition {
            history,
            applied_lsn,
            needs_snapshot,
        };
        let decision = plan(&primary, &replica);
        tracing::info!(replica = %node, %addr, applied_lsn, ?decision, "replica subscribed");
        if let Plan::Refuse { replica_epoch } = decision {
            self.metrics.refused.inc();
            self.fence(replica_epoch);
            let why = format!(
                "this primary is at epoch {} but the replica has seen epoch {replica_epoch}",
                primary.history.current()
            );
            conn::refuse(&mut wr, &why).await;
            return Err(ConnError::Refused(why));
        }

        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.peers.lock() {
            p.insert(
                id,
                Peer {
                    node: node.clone(),
                    addr,
                    applied: if matches!(decision, Plan::Resume { .. }) {
                        applied_lsn
                    } else {
                        0
                    },
                    phase: "subscribed",
                    since: Instant::now(),
                },
            );
        }
        self.acks.send_modify(|n| *n += 1);
        let me = self.clone();
        let mut acks = tokio::spawn(async move { me.read_acks(fr, id).await });
        let outcome = tokio::select! {
            r = self.clone().ship(&mut wr, decision, id, shutdown.clone()) => r,
            r = &mut acks => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(()),
            },
        };
        acks.abort();
        if let Ok(mut p) = self.peers.lock() {
            p.remove(&id);
        }
        self.acks.send_modify(|n| *n += 1);
        tracing::info!(replica = %node, %addr, "replica stream ended");
        outcome
    }

    async fn read_acks(
        &self,
        mut fr: FrameReader<ReadHalf<BoxStream>>,
        id: u64,
    ) -> Result<(), ConnError> {
        loop {
            match fr.read().await? {
                Some(Message::Ack { applied_lsn }) => {
                    if let Ok(mut p) = self.peers.lock() {
                        if let Some(r) = p.get_mut(&id) {
                            r.applied = applied_lsn;
                        }
                    }
                    self.acks.send_modify(|n| *n += 1);
                }
                Some(_) => {
                    return Err(ProtocolError::Unexpected("a replica may only send Ack").into())
                }
                None => return Ok(()),
            }
        }
    }

    fn set_phase(&self, id: u64, phase: &'static str) {
        if let Ok(mut p) = self.peers.lock() {
            if let Some(r) = p.get_mut(&id) {
                r.phase = phase;
            }
        }
    }

    async fn send<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        msg: &Message,
    ) -> Result<(), ConnError> {
        match tokio::time::timeout(self.frame_timeout, conn::write_message(wr, msg)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ConnError::Timeout(
                "a write to a replica that is not reading (cut; it will resync)",
            )),
        }
    }

    async fn ship(
        self: Arc<Self>,
        wr: &mut WriteHalf<BoxStream>,
        decision: Plan,
        id: u64,
        mut shutdown: Shutdown,
    ) -> Result<(), ConnError> {
        let history = self.engine.history().to_pairs();
        let mut next = match decision {
            Plan::Resume { from_lsn } => {
                self.send(wr, &Message::StreamStart { history, from_lsn })
                    .await?;
                from_lsn
            }
            Plan::Snapshot { reason } => {
                tracing::info!(peer = id, %reason, "sending a snapshot");
                self.set_phase(id, "snapshot");
                self.send_snapshot(wr, history, id).await?
            }
            Plan::Refuse { .. } => return Ok(()),
        };
        self.set_phase(id, "streaming");
        let mut durable_rx = self.engine.subscribe_durable();
        let mut role_rx = self.role_tx.subscribe();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.role() != Role::Primary {
                return Ok(());
            }
            let durable = *durable_rx.borrow_and_update();
            if next <= durable {
                next = self.send_entries(wr, next, durable, id).await?;
                heartbeat.reset();
                continue;
            }
            tokio::select! {
                r = durable_rx.changed() => if r.is_err() { return Ok(()) },
                _ = heartbeat.tick() => {
                    self.send(wr, &Message::Heartbeat { primary_lsn: durable }).await?;
                }
                _ = role_rx.changed() => {}
                _ = wait_for(&mut shutdown) => return Ok(()),
            }
        }
    }

    /// Sends every durable entry from `next` up to `upto`, in frames of bounded size;
    /// returns the next LSN to send. A position the log no longer holds cuts the replica
    /// (it will resync): the sender never makes the log keep entries for it.
    async fn send_entries(
        &self,
        wr: &mut WriteHalf<BoxStream>,
        mut next: u64,
        upto: u64,
        id: u64,
    ) -> Result<u64, ConnError> {
        while next <= upto {
            let frame = match self.read_frame(next) {
                Ok(f) => f,
                Err(why) => return Err(self.cut(wr, id, why).await),
            };
            next = self.forward(wr, frame).await?;
        }
        Ok(next)
    }

    /// Reads one frame of durable log entries starting exactly at `next`: at most
    /// [`BATCH_ENTRIES`] entries and about [`BATCH_BYTES`]. `Err` says why the replica
    /// must be cut: the log no longer holds `next` (retention passed it) or cannot be read.
    fn read_frame(&self, next: u64) -> Result<Frame, String> {
        let entries = self
            .engine
            .read_log_raw(next, BATCH_ENTRIES)
            .map_err(|e| format!("reading the log: {e}"))?;
        if entries.first().map(|e| e.0) != Some(next) {
            return Err(format!(
                "replica fell behind the log's retention (needs LSN {next}, log starts at {}); it will resync from a snapshot",
                self.engine.status().first_log_lsn
            ));
        }
        let mut frame = Frame {
            next,
            bytes: 0,
            entries: Vec::with_capacity(entries.len()),
        };
        for (lsn, enc) in entries {
            frame.next = lsn + 1;
            frame.bytes += enc.len();
            frame.entries.push(enc);
            if frame.bytes >= BATCH_BYTES {
                break;
            }
        }
        Ok(frame)
    }

    /// Sends one frame of entries; returns the next LSN to send.
    async fn forward(&self, wr: &mut WriteHalf<BoxStream>, frame: Frame) -> Result<u64, ConnError> {
        let n = frame.entries.len() as u64;
        let primary_lsn = self.engine.status().durable_lsn;
        self.send(
            wr,
            &Message::Entries {
                primary_lsn,
                entries: frame.entries,
            },
        )
        .await?;
        self.metrics.entries_shipped.inc_by(n);
        Ok(frame.next)
    }

    /// Tells a replica why it is cut and counts it; returns the error ending its stream.
    async fn cut(&self, wr: &mut WriteHalf<BoxStream>, id: u64, why: String) -> ConnError {
        self.metrics.cut_too_far_behind.inc();
        tracing::warn!(peer = id, "{why}");
        conn::refuse(wr, &why).await;
        ConnError::Refused(why)
    }

    /// Follows the log from `from` in its own task while a snapshot is being sent: each
    /// entry is read as soon as it is durable into a queue of at most [`TAIL_BYTES`]
    /// encoded bytes. The sender may spend seconds pushing pages to a replica that is
    /// installing them; without this reader the log would roll past retention meanwhile
    /// and every snapshot under a steady write load would end in a cut and start over.
    /// Bounded: a replica that does not drain the queue lets the reader fall out of the
    /// log, and it is cut.
    fn spawn_tail(self: &Arc<Self>, from: u64) -> Tail {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(TAIL_BYTES));
        let me = self.clone();
        let space = room.clone();
        let task = tokio::spawn(async move {
            let mut durable_rx = me.engine.subscribe_durable();
            let mut next = from;
            loop {
                let durable = *durable_rx.borrow_and_update();
                while next <= durable {
                    let frame = me.read_frame(next);
                    match &frame {
                        Ok(f) => {
                            next = f.next;
                            let want = u32::try_from(f.bytes.min(TAIL_BYTES)).unwrap_or(u32::MAX);
                            match space.clone().acquire_many_owned(want).await {
                                Ok(p) => p.forget(),
                                Err(_) => return,
                            }
                        }
                        Err(_) => {
                            let _ = tx.send(frame);
                            return;
                        }
                    }
                    if tx.send(frame).is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = durable_rx.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Tail {
            rx,
            room,
            task: AbortOnDrop(task),
        }
    }

    /// Sends a snapshot: tag = durable LSN before reading anything, then pages of records
    /// with the log entries after the tag interleaved, then `SnapshotEnd` once every entry
    /// up to the last one a page may hold is durable and sent. Entries come from
    /// [`Replication::spawn_tail`], so neither the snapshot nor the log's retention waits
    /// for the other. Entries set whole values, so the replica converges whatever the
    /// interleaving: a key's last write is either in the page read after it or in an
    /// entry, and every entry after the tag is applied in order. Returns the next LSN to
    /// send.
    async fn send_snapshot(
        self: &Arc<Self>,
        wr: &mut WriteHalf<BoxStream>,
        history: Vec<(u64, u64)>,
        id: u64,
    ) -> Result<u64, ConnError> {
        let tag = self.engine.status().durable_lsn;
        let mut tail = self.spawn_tail(tag + 1);
        self.send(
            wr,
            &Message::SnapshotBegin {
                history,
                tag_lsn: tag,
            },
        )
        .await?;
        let mut next = tag + 1;
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            while let Ok(frame) = tail.rx.try_recv() {
                next = self.forward_tail(wr, &mut tail, frame, id).await?;
            }
            let (page, more) = self
                .engine
                .snapshot_page(cursor.as_deref(), BATCH_BYTES)
                .map_err(|e| ConnError::Refused(format!("reading the snapshot: {e}")))?;
            if !page.is_empty() {
                let records = page
                    .iter()
                    .map(|(k, r)| (k.clone(), wire::record_to_wire(r)))
                    .collect();
                self.send(wr, &Message::SnapshotChunk { records }).await?;
            }
            match more {
                Some(k) => cursor = Some(k),
                None => break,
            }
        }
        // Pages may include records applied but not yet durable: wait for them to be,
        // so a replica never becomes ready holding what the primary could still lose.
        let end = self.engine.status().last_lsn;
        while next <= end {
            match tokio::time::timeout(self.frame_timeout, tail.rx.recv()).await {
                Ok(Some(frame)) => next = self.forward_tail(wr, &mut tail, frame, id).await?,
                Ok(None) => return Err(ConnError::Refused("the log reader stopped".into())),
                Err(_) => return Err(ConnError::Timeout("the primary making a snapshot durable")),
            }
        }
        self.send(wr, &Message::SnapshotEnd { end_lsn: end })
            .await?;
        self.metrics.snapshots_sent.inc();
        // Hand over to the direct reader: stop the tail, send what it already queued
        // (contiguous from `next`), and stream on from there.
        tail.task.0.abort();
        while let Ok(frame) = tail.rx.try_recv() {
            next = self.forward_tail(wr, &mut tail, frame, id).await?;
        }
        Ok(next)
    }

    /// Sends a frame from the tail reader, merged with the frames queued behind it (up
    /// to about one frame's limits, so a reader that woke per write still makes large
    /// frames), and gives their bytes back to the queue; or cuts the replica if the reader
    /// fell out of the log.
    async fn forward_tail(
        &self,
        wr: &mut WriteHalf<BoxStream>,
        tail: &mut Tail,
        first: Result<Frame, String>,
        id: u64,
    ) -> Result<u64, ConnError> {
        let mut frame = match first {
            Ok(f) => f,
            Err(why) => return Err(self.cut(wr, id, why).await),
        };
        let mut failed = None;
        while frame.bytes < BATCH_BYTES && frame.entries.len() < BATCH_ENTRIES {
            match tail.rx.try_recv() {
                Ok(Ok(more)) => {
                    frame.next = more.next;
                    frame.bytes += more.bytes;
                    frame.entries.extend(more.entries);
                }
                Ok(Err(why)) => {
                    failed = Some(why);
                    break;
                }
                Err(_) => break,
            }
        }
        let bytes = frame.bytes;
        let next = self.forward(wr, frame).await?;
        tail.room.add_permits(bytes.min(TAIL_BYTES));
        match failed {
            Some(why) => Err(self.cut(wr, id, why).await),
            None => Ok(next),
        }
    }

    // ---------------------------------------------------------------- replica side

    /// Follows the primary until shutdown or promotion: connect, subscribe, apply,
    /// acknowledge; on any failure reconnect with capped exponential backoff and jitter.
    async fn follow_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        let Some(addr) = self.follow.clone() else {
            return;
        };
        let mut stop = self.stop_follow.subscribe();
        let mut backoff = MIN_BACKOFF;
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow() || *stop.borrow() {
                break;
            }
            self.metrics.reconnects.inc();
            let started = Instant::now();
            let outcome = tokio::select! {
                r = self.follow_once(&addr) => r,
                _ = wait_for(&mut shutdown) => break,
                _ = stop.wait_for(|s| *s) => break,
            };
            if let Ok(mut l) = self.link.lock() {
                l.connected = false;
                if let Err(e) = &outcome {
                    l.last_error = Some(e.to_string());
                }
            }
            if started.elapsed() > Duration::from_secs(5) {
                backoff = MIN_BACKOFF;
                failures = 0;
            }
            failures += 1;
            match outcome {
                Ok(()) => tracing::info!(primary = %addr, "replication stream ended; reconnecting"),
                // A peer speaking nonsense is always worth a warning; a peer that is
                // merely down is warned about once per outage.
                Err(e) if failures <= 1 || matches!(e, ConnError::Protocol(_)) => {
                    tracing::warn!(primary = %addr, error = %e, "replication stream failed; reconnecting with backoff")
                }
                Err(e) => {
                    tracing::debug!(primary = %addr, error = %e, failures, "replication still failing")
                }
            }
            let jitter =
                Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = wait_for(&mut shutdown) => break,
                _ = stop.wait_for(|s| *s) => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn connect(&self, addr: &str) -> Result<FrameReader<BoxStream>, ConnError> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let stream: BoxStream = match &self.follow_tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| ConnError::Tls(e.to_string()))?,
            ),
            None => Box::new(tcp),
        };
        Ok(FrameReader::new(
            stream,
            protocol::MAX_FRAME_CEILING,
            self.frame_timeout,
        ))
    }

    async fn follow_once(&self, addr: &str) -> Result<(), ConnError> {
        let setup = async {
            let mut fr = self.connect(addr).await?;
            let welcome = conn::client_handshake(&mut fr, &self.secret, Purpose::Replica).await?;
            Ok::<_, ConnError>((fr, welcome))
        };
        let (fr, welcome) = match tokio::time::timeout(self.frame_timeout, setup).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnError::Timeout("connecting to the primary")),
        };
        let mine = self.engine.history();
        if welcome.epoch < mine.current() {
            self.metrics.refused.inc();
            return Err(ConnError::Refused(format!(
                "{} at {addr} is at epoch {}, older than this node's {}: not following a deposed primary",
                welcome.node,
                welcome.epoch,
                mine.current()
            )));
        }
        let (stream, buf) = fr.into_parts();
        let (rd, mut wr) = tokio::io::split(stream);
        let mut fr =
            FrameReader::with_buf(rd, buf, protocol::MAX_FRAME_CEILING, self.frame_timeout);
        let status = self.engine.status();
        let subscribe = Message::Subscribe {
            node: self.node.clone(),
            history: mine.to_pairs(),
            applied_lsn: status.durable_lsn,
            needs_snapshot: self.engine.resyncing(),
        };
        self.send(&mut wr, &subscribe).await?;
        if let Ok(mut l) = self.link.lock() {
            l.connected = true;
            l.primary_node = Some(welcome.node.clone());
            l.last_contact = Some(Instant::now());
            l.last_error = None;
            l.phase = "subscribed";
        }
        tracing::info!(primary = %addr, node = %welcome.node, applied_lsn = status.durable_lsn, "following the primary");
        let mut phase = Phase::AwaitStart;
        let mut pending: Option<Message> = None;
        loop {
            let msg = match pending.take() {
                Some(m) => m,
                None => match tokio::time::timeout(IDLE_LIMIT, fr.read()).await {
                    Ok(Ok(Some(m))) => m,
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(ConnError::Timeout("the primary went silent")),
                },
            };
            if let Ok(mut l) = self.link.lock() {
                l.last_contact = Some(Instant::now());
            }
            match msg {
                Message::Entries {
                    primary_lsn,
                    entries,
                } => {
                    if phase == Phase::AwaitStart {
                        return Err(self.refused("entries before the stream started"));
                    }
                    self.primary_times.record(primary_lsn);
                    let mut batch = Vec::with_capacity(entries.len());
                    for bytes in &entries {
                        batch.push(
                            LogEntry::decode(bytes).map_err(|e| self.refused(&e.to_string()))?,
                        );
                    }
                    let mut raw = entries;
                    // Gather what else has already arrived into the same apply (one fsync).
                    while batch.len() < 8 * BATCH_ENTRIES {
                        match fr.buffered()? {
                            Some(Message::Entries {
                                primary_lsn,
                                entries,
                            }) => {
                                self.primary_times.record(primary_lsn);
                                for bytes in &entries {
                                    batch.push(
                                        LogEntry::decode(bytes)
                                            .map_err(|e| self.refused(&e.to_string()))?,
                                    );
                                }
                                raw.extend(entries);
                            }
                            Some(other) => {
                                pending = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    let n = batch.len() as u64;
                    let applied = {
                        let _gate = self.apply_gate.lock().await;
                        if !matches!(self.role(), Role::Replica { .. }) {
                            return Ok(());
                        }
                        self.engine
                            .apply_shipped(batch, raw)
                            .await
                            .map_err(|e| self.engine_refused(e))?
                    };
                    self.metrics.entries_applied.inc_by(n);
                    // Mid-snapshot the data is partial: nothing to vouch for yet.
                    if phase == Phase::Streaming {
                        let ack = Message::Ack {
                            applied_lsn: applied,
                        };
                        self.send(&mut wr, &ack).await?;
                    }
                }
                Message::Heartbeat { primary_lsn } => {
                    self.primary_times.record(primary_lsn);
                    if phase == Phase::Streaming {
                        let ack = Message::Ack {
                            applied_lsn: self.engine.status().durable_lsn,
                        };
                        self.send(&mut wr, &ack).await?;
                    }
                }
                Message::StreamStart { history, from_lsn } => {
                    if phase != Phase::AwaitStart {
                        return Err(self.refused("a second stream start"));
                    }
                    let theirs = self.check_history(&history)?;
                    let applied = self.engine.status().durable_lsn;
                    if from_lsn != applied + 1 || self.engine.resyncing() {
                        return Err(self.refused(&format!(
                            "stream starts at {from_lsn}, this replica needs {}",
                            applied + 1
                        )));
                    }
                    if !theirs.contains_position(&self.engine.history(), applied) {
                        return Err(self.refused(
                            "the primary's history does not contain this replica's log, yet it offered to resume",
                        ));
                    }
                    if theirs != self.engine.history() {
                        let _gate = self.apply_gate.lock().await;
                        self.engine
                            .adopt_history(theirs)
                            .await
                            .map_err(|e| self.engine_refused(e))?;
                    }
                    phase = Phase::Streaming;
                    self.set_link_phase("streaming");
                }
                Message::SnapshotBegin { history, tag_lsn } => {
                    if phase != Phase::AwaitStart {
                        return Err(self.refused("a snapshot in the middle of a stream"));
                    }
                    let theirs = self.check_history(&history)?;
                    tracing::warn!(
                        tag_lsn,
                        "the primary is sending a snapshot: replacing this replica's data"
                    );
                    {
                        let _gate = self.apply_gate.lock().await;
                        if !matches!(self.role(), Role::Replica { .. }) {
                            return Ok(());
                        }
                        self.engine
                            .snapshot_begin(theirs, tag_lsn)
                            .await
                            .map_err(|e| self.engine_refused(e))?;
                    }
                    phase = Phase::Snapshot { tag: tag_lsn };
                    self.set_link_phase("snapshot");
                }
                Message::SnapshotChunk { records } => {
                    if !matches!(phase, Phase::Snapshot { .. }) {
                        return Err(self.refused("snapshot records outside a snapshot"));
                    }
                    let mut page = Vec::with_capacity(records.len());
                    for (key, r) in records {
                        Key::parse(&key)
                            .map_err(|e| self.refused(&format!("snapshot key {key:?}: {e}")))?;
                        page.push((key, wire::record_from_wire(r)));
                    }
                    let _gate = self.apply_gate.lock().await;
                    self.engine
                        .snapshot_chunk(page)
                        .await
                        .map_err(|e| self.engine_refused(e))?;
                }
                Message::SnapshotEnd { end_lsn } => {
                    let Phase::Snapshot { tag } = phase else {
                        return Err(self.refused("snapshot end outside a snapshot"));
                    };
                    if end_lsn < tag {
                        return Err(self.refused("snapshot ends before it began"));
                    }
                    let applied = {
                        let _gate = self.apply_gate.lock().await;
                        self.engine
                            .snapshot_end()
                            .await
                            .map_err(|e| self.engine_refused(e))?
                    };
                    if let Ok(mut l) = self.link.lock() {
                        l.ready_after = end_lsn;
                    }
                    self.primary_times.record(end_lsn);
                    self.metrics.snapshots_installed.inc();
                    tracing::info!(
                        tag,
                        end_lsn,
                        applied,
                        "snapshot installed; streaming the log"
                    );
                    self.send(
                        &mut wr,
                        &Message::Ack {
                            applied_lsn: applied,
                        },
                    )
                    .await?;
                    phase = Phase::Streaming;
                    self.set_link_phase("streaming");
                }
                Message::Refused { reason } => return Err(ConnError::Refused(reason)),
                _ => {
                    return Err(
                        ProtocolError::Unexpected("a message a primary does not send").into(),
                    )
                }
            }
        }
    }

    fn set_link_phase(&self, phase: &'static str) {
        if let Ok(mut l) = self.link.lock() {
            l.phase = phase;
        }
    }

    /// A primary's history, checked: well formed and not older than ours (fencing).
    fn check_history(&self, pairs: &[(u64, u64)]) -> Result<History, ConnError> {
        let theirs = History::from_pairs(pairs)
            .map_err(|e| self.refused(&format!("primary's history: {e}")))?;
        let ours = self.engine.history().current();
        if theirs.current() < ours {
            return Err(self.refused(&format!(
                "the primary is at epoch {}, older than this node's {ours}",
                theirs.current()
            )));
        }
        Ok(theirs)
    }

    fn refused(&self, why: &str) -> ConnError {
        self.metrics.refused.inc();
        tracing::error!(reason = why, "refusing the replication stream");
        ConnError::Refused(format!("refused the primary's stream: {why}"))
    }

    fn engine_refused(&self, e: EngineError) -> ConnError {
        match e {
            EngineError::Refused(_) | EngineError::State(_) | EngineError::Corrupt(_) => {
                self.refused(&e.to_string())
            }
            other => ConnError::Refused(format!("applying replicated data failed: {other}")),
        }
    }
}

/// One `Entries` frame's worth of encoded log entries, and the LSN after them.
struct Frame {
    next: u64,
    bytes: usize,
    entries: Vec<Vec<u8>>,
}

/// The log reader of a snapshot sender: its queue of frames, the room left in it
/// (bytes), and the task (stopped when this is dropped).
struct Tail {
    rx: mpsc::UnboundedReceiver<Result<Frame, String>>,
    room: Arc<Semaphore>,
    task: AbortOnDrop,
}

/// Aborts a task when dropped, so a sender that fails mid-snapshot never leaves its log
/// reader behind.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Peer2 {
    replica: String,
    applied: u64,
}

/// Where a replica's stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitStart,
    Snapshot { tag: u64 },
    Streaming,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::storage::{EngineConfig, Precondition, Write, WriteOp};

    fn engine(dir: &std::path::Path, retention: u64) -> Arc<Engine> {
        Engine::open(EngineConfig {
            path: dir.to_path_buf(),
            log_retention: retention,
            max_group: 128,
            cache_bytes: 16 << 20,
        })
        .expect("open engine")
    }

    fn put(id: &str, body: String) -> Write {
        Write {
            key: Key::new("t", id).expect("key"),
            op: WriteOp::Put(Bytes::from(body)),
            precondition: Precondition::None,
        }
    }

    /// The root cause of the late-replica defect: a snapshot sender blocked for a long
    /// time pushing a page to a replica that is busy installing it, while writes roll the
    /// log past its retention several times. The entries after the snapshot's tag must
    /// still all reach the replica (read as they became durable), so the snapshot
    /// completes instead of cutting the replica into an endless resnapshot loop, and the
    /// installed copy is identical to the primary.
    #[tokio::test]
    async fn snapshot_completes_while_the_log_rolls_past_retention_behind_a_stalled_replica() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let primary = engine(&tmp.path().join("p"), 50);
        let pad = "x".repeat(1000);
        for b in 0..30 {
            let writes = (0..100)
                .map(|i| {
                    put(
                        &format!("r{b:02}-{i:03}"),
                        format!("{{\"v\":0,\"p\":\"{pad}\"}}"),
                    )
                })
                .collect();
            primary.write(writes).await.expect("seed");
        }
        let config: StorageConfig = toml::from_str("listen = \"127.0.0.1:0\"").expect("config");
        let repl = Replication::new(&config, primary.clone(), b"secret", "p").expect("repl");

        // A 64 KiB pipe: the sender blocks inside the first 1 MiB page until we read.
        let (ours, theirs) = tokio::io::duplex(64 << 10);
        let boxed: BoxStream = Box::new(theirs);
        let (_rd, mut wr) = tokio::io::split(boxed);
        let history = primary.history().to_pairs();
        let sender = {
            let repl = repl.clone();
            tokio::spawn(async move { repl.send_snapshot(&mut wr, history, 1).await })
        };
        tokio::task::yield_now().await;
        let tag = primary.status().durable_lsn;

        // Overwrite keys of the first (already streaming) page and delete some, one entry
        // at a time, until the log has rolled past retention four times over.
        let mut i = 0u64;
        while primary.status().first_log_lsn <= tag + 200 {
            let id = format!("r00-{:03}", i % 100);
            let w = if i % 7 == 3 {
                Write {
                    key: Key::new("t", &id).expect("key"),
                    op: WriteOp::Delete,
                    precondition: Precondition::None,
                }
            } else {
                put(&id, format!("{{\"v\":{i}}}"))
            };
            primary.write(vec![w]).await.expect("write");
            i += 1;
        }
        assert!(!sender.is_finished(), "the sender must still be stalled");

        // Now the replica reads everything and installs it.
        let replica = engine(&tmp.path().join("r"), 1_000_000);
        let mut fr = FrameReader::new(ours, protocol::MAX_FRAME_CEILING, Duration::from_secs(10));
        let mut ended = None;
        while ended.is_none() {
            match fr.read().await.expect("frame").expect("not closed") {
                Message::SnapshotBegin { history, tag_lsn } => {
                    assert_eq!(tag_lsn, tag);
                    let h = History::from_pairs(&history).expect("history");
                    replica.snapshot_begin(h, tag_lsn).await.expect("begin");
                }
                Message::SnapshotChunk { records } => {
                    let page = records
                        .into_iter()
                        .map(|(k, r)| (k, wire::record_from_wire(r)))
                        .collect();
                    replica.snapshot_chunk(page).await.expect("chunk");
                }
                Message::Entries { entries, .. } => {
                    let batch = entries
                        .iter()
                        .map(|b| LogEntry::decode(b).expect("entry"))
                        .collect();
                    replica.apply_replicated(batch).await.expect("in order");
                }
                Message::SnapshotEnd { end_lsn } => ended = Some(end_lsn),
                other => panic!("unexpected {other:?}"),
            }
        }
        let next = sender.await.expect("join").expect("snapshot sent");
        // Whatever the sender queued after the end arrives before it returns.
        while replica.status().durable_lsn + 1 < next {
            if let Some(Message::Entries { entries, .. }) = fr.read().await.expect("frame") {
                let batch = entries
                    .iter()
                    .map(|b| LogEntry::decode(b).expect("entry"))
                    .collect();
                replica.apply_replicated(batch).await.expect("in order");
            }
        }
        replica.snapshot_end().await.expect("end");
        let last = primary.status().last_lsn;
        assert!(ended.is_some_and(|e| e <= last));
        assert_eq!(replica.status().durable_lsn, last);
        assert_eq!(
            replica.content_hash().expect("hash"),
            primary.content_hash().expect("hash")
        );
        assert_eq!(repl.metrics.cut_too_far_behind.get(), 0);
    }
}
