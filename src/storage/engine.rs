//! The embedded storage engine: records, the replication log and group commit on sled.
//!
//! # Layout
//!
//! Everything lives in ONE sled tree (the database's default tree) under one-byte key
//! prefixes, next to the commit journal (`<path>/journal`, [`super::journal`]):
//!
//! | key | value |
//! |---|---|
//! | `r` + `collection/id` | the record: `[format=1][lsn][created_ms][updated_ms]` (u64 LE) then the body |
//! | `l` + LSN (u64 big-endian) | a chunk of log entries ending at that LSN ([`log_chunk`]), each one client batch ([`LogEntry::encode`]) |
//! | `m` + name | metadata: `epoch`, `last_lsn` (u64 big-endian) |
//!
//! After a crash the records and the log always agree: a group's record changes, log
//! chunk and `last_lsn` are one journal record, replayed whole or not at all.
//!
//! # Group commit
//!
//! One dedicated OS thread (not a tokio worker: every sled call may block) owns all writes.
//! It takes one request from its channel, drains whatever else is already queued (up to
//! [`EngineConfig::max_group`]), checks preconditions and stages each client batch in
//! order (later batches see earlier ones; record states come from the writer's memory of
//! recent records, [`super::recent`], before sled), then makes the whole group durable ONCE — one
//! synchronous journal write — applies it to sled and only then answers every
//! request.
//!
//! sled itself is made durable only at a *checkpoint*: when the journal is full, before
//! any change the journal does not carry (replication, snapshots, epochs), and at
//! shutdown. That is `Db::flush()` followed by an `fsync` of sled's data file
//! `<path>/db` and of any new file in `<path>/blobs`: sled 0.34's flush only issues
//! `sync_file_range` (sled issue #1452), which neither flushes the drive's cache nor the
//! file's metadata, and sled writes blob files (nodes larger than ~128 KiB) without
//! syncing them at all. Flushing happens from the writer thread only (concurrent
//! `flush_async` can deadlock: sled #1308). A replica applies replicated entries the same
//! way as before the journal: one `sled::Batch` and a flush per apply.
//!
//! # Reads
//!
//! [`Engine::get`] and [`Engine::list`] read sled directly, from any thread: sled serves
//! them from its page cache, so calling them on the async runtime is fine for
//! cache-resident data. They see a group once it is durable, and whole: the writer
//! applies a group under a lock that reads share.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::{oneshot, watch};

use super::journal::{Change, Journal, JournalError};
use super::log_chunk::{self, check_entry, seal, ChunkBuilder, ENTRY_FORMAT, ENTRY_HEADER};
use super::recent::{RecentRecords, RecordStamp};
use super::replication::state::{EntryRefused, Follower, History};
use super::{inbox, relay};
use super::{
    Committed, Key, ListPage, ListQuery, Precondition, Record, Write, WriteOp, WriteResult,
};

/// How to open the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Directory holding the sled database.
    pub path: PathBuf,
    /// How many log entries to keep behind the newest one (replicas resume from the log).
    pub log_retention: u64,
    /// Most client batches one group commit takes.
    pub max_group: usize,
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
}

/// Errors the engine reports.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A write's precondition did not hold; nothing of the batch was applied.
    #[error("precondition failed for {key} (write {index} of the batch)")]
    PreconditionFailed {
        /// Index of the failing write in the batch.
        index: usize,
        /// Its key.
        key: Key,
        /// The record's current version, `None` if it does not exist.
        current: Option<u64>,
    },
    /// The batch itself is invalid (empty, or the same key twice).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The engine is shutting down and takes no more writes.
    #[error("storage engine is closed")]
    Closed,
    /// sled or the file system failed.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Stored bytes did not decode or failed their checksum.
    #[error("storage corruption: {0}")]
    Corrupt(String),
    /// A replicated entry was refused (out of order, or from the wrong epoch); nothing of
    /// its batch was applied.
    #[error("replicated entry refused: {0}")]
    Refused(#[from] EntryRefused),
    /// The operation needs another replication state (e.g. promoting a node whose
    /// snapshot install is incomplete).
    #[error("{0}")]
    State(String),
}

/// A snapshot of the engine's state for status pages and metrics.
#[derive(Clone, Debug, Default)]
pub struct EngineStatus {
    /// LSN of the newest applied entry.
    pub last_lsn: u64,
    /// LSN of the newest entry known durable.
    pub durable_lsn: u64,
    /// Oldest LSN still in the log. The log holds `first_log_lsn..=last_lsn`; when it is
    /// empty (a fresh database) this is `last_lsn + 1`.
    pub first_log_lsn: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Number of records.
    pub records: u64,
    /// Bytes on disk.
    pub disk_bytes: u64,
}

/// One page of a snapshot: `(collection/id, record)` pairs and the cursor of the next page
/// (`None` after the last).
pub type SnapshotPage = (Vec<(String, Record)>, Option<Vec<u8>>);

/// One client batch as the replication log keeps it: everything a replica needs to apply
/// the batch exactly as the primary did, in LSN order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// The batch's LSN (also its records' version).
    pub lsn: u64,
    /// The epoch the batch was written in, so replicas can refuse a deposed primary.
    pub epoch: u64,
    /// When the batch was applied (ms since the Unix epoch); its records' `updated_ms`.
    pub timestamp_ms: u64,
    /// The batch's changes, in the client's order.
    pub writes: Vec<LoggedWrite>,
}

/// One change inside a [`LogEntry`]: the new state of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedWrite {
    /// `collection/id`, as [`Key`]'s `Display` prints it (parse back with [`Key::parse`]).
    pub key: String,
    /// The record as stored after the write (full state, not a diff, so applying it is
    /// idempotent); `None` for a delete.
    pub value: Option<Record>,
}

/// The engine's Prometheus metrics. Clones share their values, so the metrics module can
/// register clones of these while the engine keeps updating the originals.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    /// Client batches made durable by one group commit (one synchronous journal write):
    /// how well the fsync cost is amortised under load.
    pub group_size: Histogram,
    /// Seconds one group commit's synchronous journal write took (and each checkpoint's
    /// sled flush); the floor of write latency.
    pub flush_seconds: Histogram,
    /// Group commits (synchronous journal writes) performed.
    pub groups: Counter,
    /// Client batches committed (each one log entry / one LSN).
    pub batches: Counter,
    /// Individual writes committed, summed over batches.
    pub writes: Counter,
    /// Batches refused because a precondition did not hold.
    pub precondition_failures: Counter,
}

impl EngineMetrics {
    fn new() -> Self {
        EngineMetrics {
            // 1, 2, 4, ... 512 batches per group.
            group_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            // 50 µs ... ~1.6 s.
            flush_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            groups: Counter::default(),
            batches: Counter::default(),
            writes: Counter::default(),
            precondition_failures: Counter::default(),
        }
    }
}

const RECORD_PREFIX: u8 = b'r';
const LOG_PREFIX: u8 = b'l';
const META_EPOCH: &[u8] = b"mepoch";
const META_LAST_LSN: &[u8] = b"mlast_lsn";
/// The epoch history ([`History::encode`]).
const META_HISTORY: &[u8] = b"mhistory";
/// Present while a snapshot install is under way: the records are partial until it ends.
const META_RESYNC: &[u8] = b"mresync";

/// The commit journal's file, inside the sled directory ([`super::journal`]).
const JOURNAL_FILE: &str = "journal";
/// The journal's size bound: past it the writer checkpoints (one sled flush) and starts
/// over. It also bounds what a restart replays.
const JOURNAL_LIMIT: u64 = 64 << 20;

/// Keys per generation of the writer's memory of record states ([`RecentRecords`]):
/// up to twice this many are kept, ~100 bytes each (~250 with the longest keys).
const RECENT_RECORDS: usize = 32 * 1024;

/// Log chunks removed per truncation pass (riding on each group commit's batch).
const TRUNCATE_CHUNKS: usize = 256;

/// State shared between the engine handle (readers) and the writer thread.
struct Shared {
    db: sled::Db,
    epoch: AtomicU64,
    last_lsn: AtomicU64,
    durable_lsn: AtomicU64,
    first_log_lsn: AtomicU64,
    records: AtomicU64,
    metrics: EngineMetrics,
    /// The epoch history; changes only on the writer thread (adopt, promote, snapshot).
    history: Mutex<History>,
    /// True while a snapshot install is incomplete (also stored as `META_RESYNC`).
    resyncing: AtomicBool,
    /// Publishes `durable_lsn` so replication senders wake on new entries without polling.
    durable_tx: watch::Sender<u64>,
    /// Held shared by record reads and exclusively while the writer applies a group, so a
    /// reader sees all of a batch or none of it: the group goes to sled as separate
    /// inserts (see [`super::journal`]), not as one isolated `sled::Batch`.
    applying: std::sync::RwLock<()>,
}

impl Shared {
    /// Waits out a group being applied; see `applying`.
    fn read_whole(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.applying.read().unwrap_or_else(|p| p.into_inner())
    }
}

struct Request {
    writes: Vec<Write>,
    reply: relay::Reply<Result<Committed, EngineError>>,
}

enum Msg {
    Write(Request),
    Repl(ReplOp, oneshot::Sender<Result<u64, EngineError>>),
    Shutdown,
}

/// Replication's changes to the engine, carried out on the writer thread in order with
/// client writes. Each answers an LSN (see [`Engine`]'s replication methods).
enum ReplOp {
    /// Entries, and their bytes as shipped (empty: encode them here).
    Apply(Vec<LogEntry>, Vec<Vec<u8>>),
    Adopt(History),
    SnapshotBegin(History, u64),
    SnapshotChunk(Vec<(String, Record)>),
    SnapshotEnd,
    Promote(u32),
}

/// The engine handle.
///
/// Cheap reads (`get`, `list`, `status`, `read_log`) go straight to sled; writes go through
/// the single group-commit writer thread. Dropping the last handle shuts the writer down
/// (draining queued writes) like [`Engine::shutdown`].
pub struct Engine {
    shared: Arc<Shared>,
    tx: inbox::Sender<Msg>,
    writer: Mutex<Option<JoinHandle<Result<(), EngineError>>>>,
    closed: AtomicBool,
}

fn sled_err(context: &str, e: sled::Error) -> EngineError {
    match e {
        sled::Error::Corruption { .. } => EngineError::Corrupt(format!("{context}: {e}")),
        other => EngineError::Io(format!("{context}: {other}")),
    }
}

fn io_err(context: &str, e: std::io::Error) -> EngineError {
    EngineError::Io(format!("{context}: {e}"))
}

fn journal_err(e: JournalError) -> EngineError {
    match e {
        JournalError::Malformed(..) => EngineError::Corrupt(e.to_string()),
        JournalError::Io(..) | JournalError::TooLarge(_) => EngineError::Io(e.to_string()),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn record_key(key: &Key) -> Vec<u8> {
    let (c, i) = (key.collection().as_bytes(), key.id().as_bytes());
    let mut k = Vec::with_capacity(2 + c.len() + i.len());
    k.push(RECORD_PREFIX);
    k.extend_from_slice(c);
    k.push(b'/');
    k.extend_from_slice(i);
    k
}

fn log_key(lsn: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LOG_PREFIX;
    k[1..].copy_from_slice(&lsn.to_be_bytes());
    k
}

fn decode_log_key(k: &[u8]) -> Result<u64, EngineError> {
    match k {
        [LOG_PREFIX, rest @ ..] => rest
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| EngineError::Corrupt(format!("log key of {} bytes", k.len()))),
        _ => Err(EngineError::Corrupt("log key without log prefix".into())),
    }
}

fn corrupt_log(lsn: u64, e: log_chunk::CorruptLog) -> EngineError {
    EngineError::Corrupt(format!("log chunk ending at lsn {lsn}: {e}"))
}

fn decode_meta_u64(name: &str, v: &[u8]) -> Result<u64, EngineError> {
    v.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| EngineError::Corrupt(format!("metadata {name}: {} bytes, want 8", v.len())))
}

/// Bounds-checked little-endian reader over stored bytes: every short read is a
/// `Corrupt` error naming what was being decoded, never a panic.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// What is being read, for errors; formatted only when there is one.
    what: &'a dyn std::fmt::Display,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'a dyn std::fmt::Display) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(EngineError::Corrupt(format!(
                "{}: truncated at byte {} (need {n} more of {})",
                self.what,
                self.pos,
                self.buf.len()
            ))),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EngineError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, EngineError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, EngineError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len_u64(&mut self) -> Result<usize, EngineError> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| EngineError::Corrupt(format!("{}: length {n}", self.what)))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn corrupt(&self, msg: impl std::fmt::Display) -> EngineError {
        EngineError::Corrupt(format!("{}: {msg}", self.what))
    }
}

const RECORD_FORMAT: u8 = 1;
/// Format byte + lsn + created_ms + updated_ms; the body follows.
const RECORD_HEADER: usize = 1 + 8 + 8 + 8;

/// Stored record layout: `[format=1][lsn u64 LE][created_ms u64 LE][updated_ms u64 LE][body]`.
/// The body is the tail so reads can hand it out without copying.
fn encode_record(r: &Record) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_HEADER + r.body.len());
    v.push(RECORD_FORMAT);
    v.extend_from_slice(&r.lsn.to_le_bytes());
    v.extend_from_slice(&r.created_ms.to_le_bytes());
    v.extend_from_slice(&r.updated_ms.to_le_bytes());
    v.extend_from_slice(&r.body);
    v
}

/// Decodes a stored record; `what` names it in errors (and is formatted only for one:
/// every read and write decodes a record).
fn decode_record(value: sled::IVec, what: &dyn std::fmt::Display) -> Result<Record, EngineError> {
    let mut r = Reader::new(&value, what);
    let format = r.u8()?;
    if format != RECORD_FORMAT {
        return Err(r.corrupt(format!("unknown record format {format}")));
    }
    let lsn = r.u64()?;
    let created_ms = r.u64()?;
    let updated_ms = r.u64()?;
    // Zero-copy: the body is a view into sled's buffer.
    let body = Bytes::from_owner(value).slice(RECORD_HEADER..);
    Ok(Record {
        body,
        lsn,
        created_ms,
        updated_ms,
    })
}

impl LogEntry {
    /// Serializes the entry as the engine stores it (and as it can be shipped to replicas):
    /// `[format=1][crc32 u32 LE of the rest][epoch][lsn][timestamp_ms][count u32]` then per
    /// write `[key_len u16][key][0 = delete | 1 = put]` and for a put
    /// `[lsn][created_ms][updated_ms][body_len u64][body]`; integers little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self
            .writes
            .iter()
            .map(|w| 3 + w.key.len() + w.value.as_ref().map_or(0, |r| 32 + r.body.len()))
            .sum();
        let mut v = Vec::with_capacity(ENTRY_HEADER + 28 + size);
        self.encode_into(&mut v);
        v
    }

    /// [`LogEntry::encode`], appended to `out` (the writer encodes straight into a log
    /// chunk).
    pub fn encode_into(&self, v: &mut Vec<u8>) {
        let start = v.len();
        v.push(ENTRY_FORMAT);
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(&self.lsn.to_le_bytes());
        v.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        // Batches and keys are far below these limits (keys are at most 193 bytes).
        let count = u32::try_from(self.writes.len()).unwrap_or(u32::MAX);
        v.extend_from_slice(&count.to_le_bytes());
        for w in self.writes.iter().take(count as usize) {
            let key = w.key.as_bytes();
            let key = &key[..key.len().min(u16::MAX as usize)];
            v.extend_from_slice(&(key.len() as u16).to_le_bytes());
            v.extend_from_slice(key);
            match &w.value {
                None => v.push(0),
                Some(r) => {
                    v.push(1);
                    v.extend_from_slice(&r.lsn.to_le_bytes());
                    v.extend_from_slice(&r.created_ms.to_le_bytes());
                    v.extend_from_slice(&r.updated_ms.to_le_bytes());
                    v.extend_from_slice(&(r.body.len() as u64).to_le_bytes());
                    v.extend_from_slice(&r.body);
                }
            }
        }
        seal(&mut v[start..]);
    }

    /// Parses an entry produced by [`LogEntry::encode`], verifying its checksum and that
    /// every key is a valid `collection/id`; any mismatch is [`EngineError::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<LogEntry, EngineError> {
        let mut r = Reader::new(bytes, &"log entry");
        check_entry(bytes).map_err(|e| r.corrupt(e))?;
        r.take(ENTRY_HEADER)?;
        let epoch = r.u64()?;
        let lsn = r.u64()?;
        let timestamp_ms = r.u64()?;
        let count = r.u32()? as usize;
        // Each write takes at least 3 bytes: never trust `count` for the allocation.
        let mut writes = Vec::with_capacity(count.min(r.remaining() / 3));
        for _ in 0..count {
            let key_len = r.u16()? as usize;
            let key =
                std::str::from_utf8(r.take(key_len)?).map_err(|_| r.corrupt("key is not UTF-8"))?;
            Key::parse(key).map_err(|e| r.corrupt(format!("key {key:?}: {e}")))?;
            let value = match r.u8()? {
                0 => None,
                1 => {
                    let lsn = r.u64()?;
                    let created_ms = r.u64()?;
                    let updated_ms = r.u64()?;
                    let len = r.len_u64()?;
                    let body = Bytes::copy_from_slice(r.take(len)?);
                    Some(Record {
                        body,
                        lsn,
                        created_ms,
                        updated_ms,
                    })
                }
                tag => return Err(r.corrupt(format!("unknown write tag {tag}"))),
            };
            writes.push(LoggedWrite {
                key: key.to_owned(),
                value,
            });
        }
        if r.remaining() != 0 {
            return Err(r.corrupt(format!("{} trailing bytes", r.remaining())));
        }
        Ok(LogEntry {
            lsn,
            epoch,
            timestamp_ms,
            writes,
        })
    }
}

/// Refuses batches the writer must never see: empty, or naming a key twice (the
/// per-write results and preconditions would be ambiguous).
fn validate_batch(writes: &[Write]) -> Result<(), EngineError> {
    if writes.is_empty() {
        return Err(EngineError::InvalidBatch(
            "a batch needs at least one write".into(),
        ));
    }
    if writes.len() > 1 {
        let mut seen = HashSet::with_capacity(writes.len());
        for w in writes {
            if !seen.insert(&w.key) {
                return Err(EngineError::InvalidBatch(format!(
                    "key {} appears more than once",
                    w.key
                )));
            }
        }
    }
    Ok(())
}

fn sync_path(path: &Path) -> Result<(), EngineError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(&format!("fsync {}", path.display()), e))
}

impl Engine {
    /// Opens (or creates) the database and starts the group-commit writer.
    ///
    /// Recovers `last_lsn` from the `last_lsn` metadata (written in every batch) and the
    /// newest log key, counts the records, and makes sled's files and directory entries
    /// durable once so that later fsyncs of the data file are sufficient.
    pub fn open(config: EngineConfig) -> Result<Arc<Engine>, EngineError> {
        let path = config.path.clone();
        std::fs::create_dir_all(&path)
            .map_err(|e| io_err(&format!("create {}", path.display()), e))?;
        let db = open_sled(&path, config.cache_bytes)?;
        let (journal, replay) =
            Journal::open(&path.join(JOURNAL_FILE), JOURNAL_LIMIT).map_err(journal_err)?;
        if !replay.is_empty() {
            // Groups acknowledged after sled's last durable flush: apply them again, in
            // order, before reading any state (the checkpoint below makes them durable).
            let changes: usize = replay.iter().map(Vec::len).sum();
            for record in replay {
                let mut batch = sled::Batch::default();
                for (k, v) in record {
                    match v {
                        Some(v) => batch.insert(k, v),
                        None => batch.remove(k),
                    }
                }
                db.apply_batch(batch)
                    .map_err(|e| sled_err("replay the commit journal", e))?;
            }
            tracing::info!(changes, "replayed the commit journal");
        }

        let epoch = match db.get(META_EPOCH).map_err(|e| sled_err("read epoch", e))? {
            Some(v) => decode_meta_u64("epoch", &v)?,
            None => {
                db.insert(META_EPOCH, &1u64.to_be_bytes())
                    .map_err(|e| sled_err("write epoch", e))?;
                1
            }
        };

        let history = match db
            .get(META_HISTORY)
            .map_err(|e| sled_err("read history", e))?
        {
            Some(v) => History::decode(&v)
                .map_err(|e| EngineError::Corrupt(format!("metadata history: {e}")))?,
            None => {
                // A database from before epoch histories: its epoch began at the start.
                let h = History::from_pairs(&[(epoch, 0)])
                    .map_err(|e| EngineError::Corrupt(format!("epoch {epoch}: {e}")))?;
                db.insert(META_HISTORY, h.encode())
                    .map_err(|e| sled_err("write history", e))?;
                h
            }
        };
        let epoch = history.current().max(epoch);
        let resyncing = db
            .contains_key(META_RESYNC)
            .map_err(|e| sled_err("read resync flag", e))?;

        let meta_last = match db
            .get(META_LAST_LSN)
            .map_err(|e| sled_err("read last_lsn", e))?
        {
            Some(v) => decode_meta_u64("last_lsn", &v)?,
            None => 0,
        };
        // Chunks are keyed by their last LSN: the newest LSN is the last key, the oldest
        // is the first entry of the first chunk.
        let log_end = |kv: Option<sled::Result<(sled::IVec, sled::IVec)>>| {
            kv.transpose()
                .map_err(|e| sled_err("scan log", e))?
                .map(|(k, v)| {
                    let last = decode_log_key(&k)?;
                    let chunk = log_chunk::entries(&v, last).map_err(|e| corrupt_log(last, e))?;
                    let first = chunk.first().map_or(last, |(lsn, _)| *lsn);
                    let last_ts = chunk
                        .last()
                        .and_then(|(_, bytes)| LogEntry::decode(bytes).ok())
                        .map_or(0, |e| e.timestamp_ms);
                    Ok::<_, EngineError>((first, last, last_ts))
                })
                .transpose()
        };
        let mut log = db.scan_prefix([LOG_PREFIX]);
        let oldest = log_end(log.next())?;
        let newest = log_end(log.next_back())?.or(oldest);
        let last_lsn = meta_last.max(newest.map_or(0, |(_, last, _)| last));
        let first_log_lsn = oldest.map_or(last_lsn + 1, |(first, _, _)| first);
        // Continue timestamps monotonically from the newest entry when the clock went back.
        let last_ts = newest.map_or(0, |(_, _, ts)| ts);

        let mut records = 0u64;
        for k in db.scan_prefix([RECORD_PREFIX]).keys() {
            k.map_err(|e| sled_err("count records", e))?;
            records += 1;
        }

        // Our own handle on sled's data file, for the fsync sled's flush leaves out.
        let db_path = path.join("db");
        let db_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&db_path)
            .map_err(|e| io_err(&format!("open {}", db_path.display()), e))?;

        let shared = Arc::new(Shared {
            db,
            epoch: AtomicU64::new(epoch),
            last_lsn: AtomicU64::new(last_lsn),
            durable_lsn: AtomicU64::new(last_lsn),
            first_log_lsn: AtomicU64::new(first_log_lsn),
            records: AtomicU64::new(records),
            metrics: EngineMetrics::new(),
            history: Mutex::new(history),
            resyncing: AtomicBool::new(resyncing),
            durable_tx: watch::channel(last_lsn).0,
            applying: std::sync::RwLock::new(()),
        });

        let mut writer = Writer {
            last_group: 0,
            shared: shared.clone(),
            rx: None,
            max_group: config.max_group.max(1),
            retention: config.log_retention,
            path: path.clone(),
            db_file,
            synced_blobs: HashSet::new(),
            last_ts,
            failed: None,
            journal,
            recent: RecentRecords::new(RECENT_RECORDS),
        };
        // sled writes `conf` and creates `blobs/` without syncing them or the directory;
        // anything replayed becomes durable in sled here too.
        writer.checkpoint()?;
        sync_path(&path.join("conf"))?;
        sync_path(&path)?;

        let (tx, rx) = inbox::inbox();
        writer.rx = Some(rx);
        let handle = std::thread::Builder::new()
            .name("strata-engine-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| io_err("spawn writer thread", e))?;

        Ok(Arc::new(Engine {
            shared,
            tx,
            writer: Mutex::new(Some(handle)),
            closed: AtomicBool::new(false),
        }))
    }

    /// Applies a batch atomically, durably; resolves once flushed and fsynced.
    ///
    /// The batch is checked (non-empty, no key twice), then queued to the writer thread,
    /// which checks every precondition against the current state and applies all or
    /// nothing. Dropping the future does not cancel a queued batch.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Committed, EngineError> {
        validate_batch(&writes)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Write(Request { writes, reply }))
            .map_err(|_| EngineError::Closed)?;
        // The writer drops unanswered requests only when it stops.
        answer.await.map_err(|_| EngineError::Closed)?.open()
    }

    /// Reads one record.
    pub fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        let _whole = self.shared.read_whole();
        let value = self
            .shared
            .db
            .get(record_key(key))
            .map_err(|e| sled_err(&format!("get {key}"), e))?;
        value
            .map(|v| decode_record(v, &format_args!("record {key}")))
            .transpose()
    }

    /// Lists a collection in id order.
    ///
    /// Returns ids starting with `query.prefix` and greater than `query.after`, at most
    /// `query.limit` of them; `next` is the last id returned when more follow. A name
    /// that is not a valid collection holds no records, so it lists as empty.
    pub fn list(&self, collection: &str, query: &ListQuery) -> Result<ListPage, EngineError> {
        let empty = ListPage {
            items: vec![],
            next: None,
        };
        if query.limit == 0 || Key::check_collection(collection).is_err() {
            return Ok(empty);
        }
        let mut base = Vec::with_capacity(2 + collection.len() + query.prefix.len());
        base.push(RECORD_PREFIX);
        base.extend_from_slice(collection.as_bytes());
        base.push(b'/');
        let id_start = base.len();
        let mut with_prefix = base.clone();
        with_prefix.extend_from_slice(query.prefix.as_bytes());

        let start = match &query.after {
            Some(after) if after.as_bytes() >= query.prefix.as_bytes() => {
                let mut k = base;
                k.extend_from_slice(after.as_bytes());
                Bound::Excluded(k)
            }
            _ => Bound::Included(with_prefix.clone()),
        };

        let mut items = Vec::with_capacity(query.limit.min(1024));
        let mut more = false;
        let _whole = self.shared.read_whole();
        for kv in self
            .shared
            .db
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
        {
            let (k, v) = kv.map_err(|e| sled_err(&format!("list {collection}"), e))?;
            if !k.starts_with(&with_prefix) {
                break;
            }
            if items.len() == query.limit {
                more = true;
                break;
            }
            let id = std::str::from_utf8(&k[id_start..])
                .map_err(|_| EngineError::Corrupt(format!("record id in {collection} not UTF-8")))?
                .to_owned();
            let record = decode_record(v, &format_args!("record {collection}/{id}"))?;
            items.push((id, record));
        }
        let next = if more {
            items.last().map(|(id, _)| id.clone())
        } else {
            None
        };
        Ok(ListPage { items, next })
    }

    /// Reads durable log entries with `lsn >= from_lsn`, oldest first, at most
    /// `max_entries` — what a replica pulls to catch up.
    ///
    /// Only entries up to `durable_lsn` are returned (a replica must never get ahead of
    /// what the primary could lose). Each entry's checksum is verified. If the first
    /// entry returned has an LSN above `from_lsn` (or `from_lsn < first_log_lsn` in
    /// [`Engine::status`]), the entries in between were truncated and the replica needs a
    /// full resync.
    pub fn read_log(
        &self,
        from_lsn: u64,
        max_entries: usize,
    ) -> Result<Vec<LogEntry>, EngineError> {
        self.read_log_raw(from_lsn, max_entries)?
            .into_iter()
            .map(|(lsn, bytes)| {
                LogEntry::decode(&bytes).map_err(|e| match e {
                    EngineError::Corrupt(m) => EngineError::Corrupt(format!("lsn {lsn}: {m}")),
                    other => other,
                })
            })
            .collect()
    }

    /// LSN of the newest applied batch: every record read after this call reflects at
    /// least the writes up to it. What a cache fill records as its read LSN (cheap, unlike
    /// [`Engine::status`]).
    pub fn applied_lsn(&self) -> u64 {
        self.shared.last_lsn.load(Ordering::Acquire)
    }

    /// [`Engine::read_log`] without decoding: each durable entry's stored bytes, checked
    /// (format, checksum, the LSN inside matching its key) but not parsed, so a primary
    /// ships them as they are. `(lsn, bytes)`, oldest first; the same gap rule applies.
    pub fn read_log_raw(
        &self,
        from_lsn: u64,
        max_entries: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, EngineError> {
        let durable = self.shared.durable_lsn.load(Ordering::Acquire);
        let from = from_lsn.max(1);
        if from > durable || max_entries == 0 {
            return Ok(vec![]);
        }
        let mut out = Vec::with_capacity(max_entries.min(1024));
        // The first chunk whose last LSN is at or past `from` holds `from` (or, when the
        // log was truncated past it, starts later: the caller sees the gap).
        for kv in self.shared.db.range(log_key(from)..=log_key(u64::MAX)) {
            let (k, v) = kv.map_err(|e| sled_err("read log", e))?;
            let last = decode_log_key(&k)?;
            for (lsn, bytes) in log_chunk::entries(&v, last).map_err(|e| corrupt_log(last, e))? {
                if lsn > durable {
                    return Ok(out);
                }
                if lsn >= from {
                    out.push((lsn, bytes.to_vec()));
                    if out.len() == max_entries {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The current epoch (stored in metadata, 1 for a new database); stamped on every
    /// log entry so replicas can tell which primary wrote it.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// The epoch history: which epoch began after which LSN. Shipped to replicas so they
    /// can tell a diverged tail from a shared one.
    pub fn history(&self) -> History {
        match self.shared.history.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// True while a snapshot install is incomplete: the records are partial and this node
    /// must not serve reads as if it were at any LSN, nor be promoted.
    pub fn resyncing(&self) -> bool {
        self.shared.resyncing.load(Ordering::Acquire)
    }

    /// A receiver of the newest durable LSN, so log shippers and read-your-writes waits
    /// wake on new entries instead of polling.
    pub fn subscribe_durable(&self) -> watch::Receiver<u64> {
        self.shared.durable_tx.subscribe()
    }

    async fn repl(&self, op: ReplOp) -> Result<u64, EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Repl(op, reply))
            .map_err(|_| EngineError::Closed)?;
        answer.await.map_err(|_| EngineError::Closed)?
    }

    /// Applies entries shipped from the primary, in order, atomically and durably (one
    /// sled batch, one fsync, through the writer thread so it never races client
    /// writes). Refuses the whole call, applying nothing, when an entry is not the next
    /// LSN or carries another epoch than the history gives it. Returns the applied LSN.
    pub async fn apply_replicated(&self, entries: Vec<LogEntry>) -> Result<u64, EngineError> {
        self.repl(ReplOp::Apply(entries, Vec::new())).await
    }

    /// [`Engine::apply_replicated`] for entries that arrived encoded: `raw[i]` holds the
    /// bytes `entries[i]` was decoded from ([`LogEntry::decode`] is strict, so they are
    /// exactly its encoding) and is stored as the log entry as it is, saving a re-encode
    /// per entry on a catching-up replica.
    pub async fn apply_shipped(
        &self,
        entries: Vec<LogEntry>,
        raw: Vec<Vec<u8>>,
    ) -> Result<u64, EngineError> {
        if raw.len() != entries.len() {
            return Err(EngineError::State(
                "entries and their bytes differ in count".into(),
            ));
        }
        self.repl(ReplOp::Apply(entries, raw)).await
    }

    /// Adopts the primary's epoch history (durably) when a replica resumes streaming.
    pub async fn adopt_history(&self, history: History) -> Result<u64, EngineError> {
        self.repl(ReplOp::Adopt(history)).await
    }

    /// Begins a snapshot install tagged `tag_lsn`: durably flags it, adopts `history`,
    /// removes every record and log entry, and expects the log to continue at
    /// `tag_lsn + 1`. Until [`Engine::snapshot_end`] the node holds partial data.
    pub async fn snapshot_begin(&self, history: History, tag_lsn: u64) -> Result<u64, EngineError> {
        self.repl(ReplOp::SnapshotBegin(history, tag_lsn)).await
    }

    /// Stores one chunk of snapshot records (`collection/id`, record).
    pub async fn snapshot_chunk(&self, records: Vec<(String, Record)>) -> Result<u64, EngineError> {
        self.repl(ReplOp::SnapshotChunk(records)).await
    }

    /// Ends a snapshot install; returns the applied LSN.
    pub async fn snapshot_end(&self) -> Result<u64, EngineError> {
        self.repl(ReplOp::SnapshotEnd).await
    }

    /// Starts a new epoch after the last applied LSN and stores it durably in the
    /// history: what promoting a replica does. `node_tag` ([`state::node_tag`] of this
    /// node's name) makes the epoch unique to this node. Returns the new epoch.
    ///
    /// [`state::node_tag`]: super::replication::state::node_tag
    pub async fn promote(&self, node_tag: u32) -> Result<u64, EngineError> {
        self.repl(ReplOp::Promote(node_tag)).await
    }

    /// Up to `max_bytes` (at least one record) of records after `after` (a raw record key
    /// from a previous page; `None` to start), and the cursor for the next page. Each page
    /// is a short sled range read, so a snapshot being sent holds nothing open between
    /// pages: it never blocks writes or log truncation.
    pub fn snapshot_page(
        &self,
        after: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<SnapshotPage, EngineError> {
        let start = match after {
            Some(k) => Bound::Excluded(k.to_vec()),
            None => Bound::Included(vec![RECORD_PREFIX]),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self
            .shared
            .db
            .range::<Vec<u8>, _>((start, Bound::Excluded(vec![RECORD_PREFIX + 1])))
        {
            let (k, v) = kv.map_err(|e| sled_err("read snapshot", e))?;
            let key = std::str::from_utf8(&k[1..])
                .map_err(|_| EngineError::Corrupt("record key not UTF-8".into()))?
                .to_owned();
            bytes += k.len() + v.len();
            let record = decode_record(v, &format_args!("record {key}"))?;
            out.push((key, record));
            if bytes >= max_bytes {
                return Ok((out, Some(k.to_vec())));
            }
        }
        Ok((out, None))
    }

    /// SHA-256 over every record (key and stored bytes, in key order) and the record
    /// count: two nodes at the same LSN hold identical data exactly when these match.
    /// Reads everything: for tests and operators, not for hot paths.
    pub fn content_hash(&self) -> Result<(u64, String), EngineError> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut n = 0u64;
        for kv in self.shared.db.scan_prefix([RECORD_PREFIX]) {
            let (k, v) = kv.map_err(|e| sled_err("hash records", e))?;
            ctx.update(&(k.len() as u64).to_le_bytes());
            ctx.update(&k);
            ctx.update(&(v.len() as u64).to_le_bytes());
            ctx.update(&v);
            n += 1;
        }
        let hex = ctx
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        Ok((n, hex))
    }

    /// The engine's metrics; register clones of its fields with a Prometheus registry.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.shared.metrics
    }

    /// Current status.
    pub fn status(&self) -> EngineStatus {
        let s = &self.shared;
        EngineStatus {
            last_lsn: s.last_lsn.load(Ordering::Acquire),
            durable_lsn: s.durable_lsn.load(Ordering::Acquire),
            first_log_lsn: s.first_log_lsn.load(Ordering::Acquire),
            epoch: s.epoch.load(Ordering::Acquire),
            records: s.records.load(Ordering::Acquire),
            disk_bytes: s.db.size_on_disk().unwrap_or(0),
        }
    }

    /// Stops the writer after draining queued writes and makes everything durable.
    ///
    /// Later writes fail with [`EngineError::Closed`]; reads keep working. Blocks until
    /// the writer has finished (from async code, call it via `spawn_blocking`). Calling
    /// it again is a no-op returning `Ok`.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        self.closed.store(true, Ordering::Release);
        let handle = match self.writer.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(handle) = handle else {
            return Ok(());
        };
        // If the writer already died the send fails; join reports why.
        let _ = self.tx.send(Msg::Shutdown);
        match handle.join() {
            Ok(result) => result,
            Err(_) => Err(EngineError::Io("engine writer thread panicked".into())),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "storage engine shutdown on drop failed");
        }
    }
}

/// Opens sled, waiting up to [`LOCK_WAIT`] for its file lock. Sled releases the lock when
/// its last internal handle drops, and its background threads drop theirs a moment after
/// the engine that closed them is gone; an in-process reopen (tests, `strata restore`
/// checks) under load could otherwise fail with "could not acquire lock". Another live
/// process holding the directory still fails, after the wait, with sled's message.
fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db, EngineError> {
    const LOCK_WAIT: Duration = Duration::from_secs(3);
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(sled_err(&format!("open sled at {}", path.display()), e)),
        }
    }
}

/// The group-commit writer; lives on its own OS thread and is the only code that writes
/// to sled or flushes it.
struct Writer {
    shared: Arc<Shared>,
    rx: Option<inbox::Receiver<Msg>>,
    max_group: usize,
    retention: u64,
    path: PathBuf,
    db_file: File,
    /// Blob files already fsynced (sled names them by LSN and deletes them on GC).
    synced_blobs: HashSet<OsString>,
    /// Newest timestamp handed out, so timestamps never go backwards.
    last_ts: u64,
    /// Set when making a group durable failed: what reached the disk is then unknown, so
    /// the engine refuses further writes rather than acknowledge on top of it.
    failed: Option<String>,
    /// Size of the previous group: the concurrency the writer expects to see again.
    last_group: usize,
    /// Makes groups durable (see [`super::journal`]).
    journal: Journal,
    /// The states of records written or read lately, staged ones included: what a
    /// write's checks read instead of sled (see [`super::recent`]).
    recent: RecentRecords,
}

/// A group being assembled: its sled changes and the LSN the next client batch gets
/// (what it staged per record is in [`Writer::recent`]).
struct Stage {
    /// The group's sled changes in order: journaled, then applied.
    changes: Vec<Change>,
    /// The group's log entries, packed into chunks as they are staged.
    log: ChunkBuilder,
    next_lsn: u64,
    delta: i64,
    batches: u64,
    writes: u64,
}

impl Stage {
    /// An empty group that continues after `last_lsn`.
    fn after(last_lsn: u64) -> Self {
        Stage {
            changes: Vec::new(),
            log: ChunkBuilder::default(),
            next_lsn: last_lsn + 1,
            delta: 0,
            batches: 0,
            writes: 0,
        }
    }
}

/// Longest the writer holds a group open waiting for more writers (see [`Writer::run`]).
const COMMIT_WINDOW: Duration = Duration::from_micros(400);

impl Writer {
    fn run(mut self) -> Result<(), EngineError> {
        let Some(rx) = self.rx.take() else {
            return Err(EngineError::Io("writer started without a channel".into()));
        };
        // Messages taken from the inbox, in order. A replication message met while
        // gathering a group waits here until the group is committed, so everything is
        // applied in the order it was sent.
        let mut pending = VecDeque::new();
        loop {
            if pending.is_empty() && !rx.take(&mut pending, 1, None) {
                // The engine handle is gone without a shutdown message.
                return self.stop();
            }
            let mut group = Vec::new();
            match pending.pop_front() {
                Some(Msg::Write(req)) => group.push(req),
                Some(Msg::Repl(op, reply)) => {
                    let result = self.replicate(op);
                    let _ = reply.send(result);
                    self.truncate_log();
                    continue;
                }
                // Requests queued behind the shutdown are dropped with `pending`: their
                // callers see `Closed`, and nothing of them was applied.
                Some(Msg::Shutdown) => return self.stop(),
                None => continue,
            }
            self.gather(&mut group, &mut pending);
            // Adaptive commit window (PostgreSQL's commit_delay, self-tuning): when the last
            // group showed concurrent writers and fewer of them have arrived yet, wait a
            // moment for the rest so one journal write covers them all. A lone writer
            // (last group of 1) never waits. On a busy single core this is what lets the
            // HTTP side queue the next writes instead of the writer flushing each alone.
            // The inbox wakes the writer once, when the group is complete or the window
            // ends, not at every arrival.
            let target = self.last_group.min(self.max_group);
            if pending.is_empty() && self.last_group > 1 && group.len() < target {
                let deadline = Instant::now() + COMMIT_WINDOW;
                rx.take(&mut pending, target - group.len(), Some(deadline));
                self.gather(&mut group, &mut pending);
            }
            self.last_group = group.len();
            self.commit_group(group);
        }
    }

    /// Moves writes from the front of `pending` into `group`, up to the group limit,
    /// stopping at the first message that is not a write.
    fn gather(&self, group: &mut Vec<Request>, pending: &mut VecDeque<Msg>) {
        while group.len() < self.max_group {
            match pending.pop_front() {
                Some(Msg::Write(req)) => group.push(req),
                Some(other) => {
                    pending.push_front(other);
                    return;
                }
                None => return,
            }
        }
    }

    /// The writer's last act: make everything applied durable, unless writing already
    /// failed (then report that).
    fn stop(&mut self) -> Result<(), EngineError> {
        match &self.failed {
            Some(msg) => Err(EngineError::Io(msg.clone())),
            None => self.checkpoint(),
        }
    }

    /// Carries out one replication change; see [`ReplOp`] and the `Engine` methods.
    fn replicate(&mut self, op: ReplOp) -> Result<u64, EngineError> {
        if let Some(msg) = &self.failed {
            return Err(EngineError::Io(msg.clone()));
        }
        // Every one of these may change records behind the writer's memory of them.
        self.recent.clear();
        let result = match op {
            ReplOp::Apply(entries, raw) => self.apply_entries(entries, raw),
            ReplOp::Adopt(history) => self.set_history(history),
            ReplOp::Promote(node_tag) => {
                if self.shared.resyncing.load(Ordering::Acquire) {
                    return Err(EngineError::State(
                        "this node's snapshot install is incomplete; it cannot be promoted".into(),
                    ));
                }
                let last = self.shared.last_lsn.load(Ordering::Acquire);
                let history = self.history().promoted(last, node_tag);
                self.set_history(history)?;
                Ok(self.shared.epoch.load(Ordering::Acquire))
            }
            ReplOp::SnapshotBegin(history, tag) => self.snapshot_begin(history, tag),
            ReplOp::SnapshotChunk(records) => self.snapshot_chunk(records),
            ReplOp::SnapshotEnd => self.snapshot_end(),
        };
        if let Err(EngineError::Io(e)) = &result {
            let msg = format!("replication write failed, engine takes no more writes: {e}");
            tracing::error!("{msg}");
            self.failed = Some(msg);
        }
        result
    }

    fn history(&self) -> History {
        match self.shared.history.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Stores a new history durably and makes its current epoch the engine's.
    fn set_history(&mut self, history: History) -> Result<u64, EngineError> {
        let epoch = history.current();
        self.unjournaled()?;
        let mut batch = sled::Batch::default();
        batch.insert(META_HISTORY, history.encode());
        batch.insert(META_EPOCH, &epoch.to_be_bytes());
        self.shared
            .db
            .apply_batch(batch)
            .map_err(|e| sled_err("store epoch history", e))?;
        self.make_durable()?;
        match self.shared.history.lock() {
            Ok(mut h) => *h = history,
            Err(p) => *p.into_inner() = history,
        }
        self.shared.epoch.store(epoch, Ordering::Release);
        Ok(epoch)
    }

    /// Applies replicated entries in order as one atomic, durable sled batch. Every
    /// entry is checked first (next LSN, epoch the history gives it); on any refusal
    /// nothing is applied.
    fn apply_entries(
        &mut self,
        entries: Vec<LogEntry>,
        raw: Vec<Vec<u8>>,
    ) -> Result<u64, EngineError> {
        let mut follower = Follower {
            applied: self.shared.last_lsn.load(Ordering::Acquire),
            history: self.history(),
        };
        for e in &entries {
            follower.check(e.epoch, e.lsn)?;
            follower.applied(e.lsn);
        }
        let Some(last) = entries.last().map(|e| e.lsn) else {
            return Ok(follower.applied);
        };
        self.unjournaled()?;
        let db = &self.shared.db;
        let mut batch = sled::Batch::default();
        let mut exists: HashMap<Vec<u8>, bool> = HashMap::new();
        let mut delta = 0i64;
        let mut writes = 0u64;
        let mut raw = raw.into_iter();
        let mut chunks = ChunkBuilder::default();
        for e in &entries {
            for w in &e.writes {
                let mut rk = Vec::with_capacity(1 + w.key.len());
                rk.push(RECORD_PREFIX);
                rk.extend_from_slice(w.key.as_bytes());
                let existed = match exists.get(&rk) {
                    Some(x) => *x,
                    None => db
                        .contains_key(&rk)
                        .map_err(|err| sled_err("apply replicated entry", err))?,
                };
                match &w.value {
                    Some(r) => {
                        batch.insert(rk.as_slice(), encode_record(r));
                        delta += i64::from(!existed);
                    }
                    None => {
                        batch.remove(rk.as_slice());
                        delta -= i64::from(existed);
                    }
                }
                exists.insert(rk, w.value.is_some());
                writes += 1;
            }
            let full = match raw.next() {
                Some(bytes) => chunks.push(e.lsn, &bytes),
                None => chunks.push_with(e.lsn, |v| e.encode_into(v)),
            };
            if let Some((last, value)) = full {
                batch.insert(&log_key(last), value);
            }
            self.last_ts = self.last_ts.max(e.timestamp_ms);
        }
        if let Some((chunk_last, value)) = chunks.finish() {
            batch.insert(&log_key(chunk_last), value);
        }
        batch.insert(META_LAST_LSN, &last.to_be_bytes());
        db.apply_batch(batch)
            .map_err(|e| sled_err(&format!("apply replicated entries up to {last}"), e))?;
        self.shared.last_lsn.store(last, Ordering::Release);
        self.count_records(delta);
        self.make_durable()?;
        self.publish_durable(last);
        let m = &self.shared.metrics;
        m.groups.inc();
        m.batches.inc_by(entries.len() as u64);
        m.writes.inc_by(writes);
        Ok(last)
    }

    fn publish_durable(&self, lsn: u64) {
        self.shared.durable_lsn.store(lsn, Ordering::Release);
        self.shared.durable_tx.send_replace(lsn);
    }

    /// Starts a snapshot install tagged `tag`: flags it durably (a crash before the end
    /// means "start over"), removes every record and log entry, adopts the primary's
    /// history, and continues the log at `tag + 1` (entries after the tag arrive
    /// interleaved with the snapshot's pages).
    fn snapshot_begin(&mut self, history: History, tag: u64) -> Result<u64, EngineError> {
        self.unjournaled()?;
        let shared = self.shared.clone();
        let db = &shared.db;
        db.insert(META_RESYNC, &[1u8][..])
            .map_err(|e| sled_err("flag snapshot install", e))?;
        self.shared.resyncing.store(true, Ordering::Release);
        self.make_durable()?;
        for prefix in [RECORD_PREFIX, LOG_PREFIX] {
            loop {
                let mut batch = sled::Batch::default();
                let mut n = 0;
                for k in db.scan_prefix([prefix]).keys().take(10_000) {
                    batch.remove(k.map_err(|e| sled_err("clear for snapshot", e))?);
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                db.apply_batch(batch)
                    .map_err(|e| sled_err("clear for snapshot", e))?;
            }
        }
        db.insert(META_LAST_LSN, &tag.to_be_bytes())
            .map_err(|e| sled_err("set last_lsn to the snapshot tag", e))?;
        self.shared.records.store(0, Ordering::Release);
        self.shared.first_log_lsn.store(tag + 1, Ordering::Release);
        self.shared.last_lsn.store(tag, Ordering::Release);
        self.set_history(history)?;
        self.publish_durable(tag);
        Ok(tag)
    }

    /// Stores one chunk of snapshot records (made durable with the snapshot's end).
    fn snapshot_chunk(&mut self, records: Vec<(String, Record)>) -> Result<u64, EngineError> {
        if !self.shared.resyncing.load(Ordering::Acquire) {
            return Err(EngineError::State(
                "snapshot records without a snapshot begin".into(),
            ));
        }
        self.unjournaled()?;
        let db = &self.shared.db;
        let mut batch = sled::Batch::default();
        let mut added = 0i64;
        for (key, r) in &records {
            let mut rk = Vec::with_capacity(1 + key.len());
            rk.push(RECORD_PREFIX);
            rk.extend_from_slice(key.as_bytes());
            if !db
                .contains_key(&rk)
                .map_err(|e| sled_err("install snapshot", e))?
            {
                added += 1;
            }
            batch.insert(rk, encode_record(r));
        }
        db.apply_batch(batch)
            .map_err(|e| sled_err("install snapshot chunk", e))?;
        self.count_records(added);
        Ok(0)
    }

    /// Ends a snapshot install: every page is in; the log entries applied alongside
    /// carry it forward. Returns the applied LSN.
    fn snapshot_end(&mut self) -> Result<u64, EngineError> {
        if !self.shared.resyncing.load(Ordering::Acquire) {
            return Err(EngineError::State("snapshot end without a begin".into()));
        }
        self.unjournaled()?;
        self.shared
            .db
            .remove(META_RESYNC)
            .map_err(|e| sled_err("finish snapshot", e))?;
        self.make_durable()?;
        self.shared.resyncing.store(false, Ordering::Release);
        Ok(self.shared.last_lsn.load(Ordering::Acquire))
    }

    /// Commits a group: each client batch is checked and staged in order (later batches
    /// see earlier ones through the group's overlay), then the whole group — records,
    /// every batch's log entry and `last_lsn` — becomes ONE journal record, made durable
    /// once and then applied to sled. A group is all-or-nothing on disk, which is
    /// stronger than each batch being atomic.
    fn commit_group(&mut self, group: Vec<Request>) {
        let mut stage = Stage::after(self.shared.last_lsn.load(Ordering::Acquire));
        let mut answers = Vec::with_capacity(group.len());
        for req in group {
            let result = match &self.failed {
                Some(msg) => Err(EngineError::Io(msg.clone())),
                None => self.stage(&mut stage, req.writes),
            };
            answers.push((req.reply, result));
        }
        self.recent.end_group();
        if stage.batches > 0 {
            let last = stage.next_lsn - 1;
            if let Some((chunk_last, value)) = stage.log.finish() {
                stage
                    .changes
                    .push((log_key(chunk_last).to_vec(), Some(value)));
            }
            stage
                .changes
                .push((META_LAST_LSN.to_vec(), Some(last.to_be_bytes().to_vec())));
            let old_first = self.shared.first_log_lsn.load(Ordering::Acquire);
            let new_first = self.stage_truncation(&mut stage);
            if let Some(first) = new_first {
                // Advance before removing so readers never expect a removed entry.
                self.shared.first_log_lsn.store(first, Ordering::Release);
            }
            let outcome = self.commit_changes(&stage.changes, last).map(|()| {
                self.shared.last_lsn.store(last, Ordering::Release);
                self.count_records(stage.delta);
            });
            let m = &self.shared.metrics;
            m.groups.inc();
            m.group_size.observe(stage.batches as f64);
            match outcome {
                Ok(()) => {
                    self.publish_durable(last);
                    m.batches.inc_by(stage.batches);
                    m.writes.inc_by(stage.writes);
                }
                Err(e) => {
                    if new_first.is_some() {
                        self.shared
                            .first_log_lsn
                            .store(old_first, Ordering::Release);
                    }
                    let msg =
                        format!("making writes durable failed, engine takes no more writes: {e}");
                    tracing::error!("{msg}");
                    for (_, result) in &mut answers {
                        if result.is_ok() {
                            *result = Err(EngineError::Io(msg.clone()));
                        }
                    }
                    self.failed = Some(msg);
                }
            }
        }
        // One wake for the whole group (see `relay`). A caller may have gone away; its
        // batch stays committed regardless.
        relay::deliver(answers);
    }

    fn count_records(&self, delta: i64) {
        if delta >= 0 {
            self.shared
                .records
                .fetch_add(delta as u64, Ordering::AcqRel);
        } else {
            self.shared
                .records
                .fetch_sub(delta.unsigned_abs(), Ordering::AcqRel);
        }
    }

    /// Checks one client batch's preconditions against the stored state as the group has
    /// changed it so far, and stages its records and log entry. Stages nothing when a
    /// precondition fails.
    fn stage(&mut self, stage: &mut Stage, writes: Vec<Write>) -> Result<Committed, EngineError> {
        let db = &self.shared.db;
        let mut current = Vec::with_capacity(writes.len());
        for (index, w) in writes.iter().enumerate() {
            let rk = record_key(&w.key);
            let cur = match self.recent.get(&rk) {
                Some(known) => known,
                None => {
                    let read = db
                        .get(&rk)
                        .map_err(|e| sled_err(&format!("get {}", w.key), e))?
                        .map(|v| decode_record(v, &format_args!("record {}", w.key)))
                        .transpose()?
                        .map(|r| RecordStamp {
                            lsn: r.lsn,
                            created_ms: r.created_ms,
                        });
                    self.recent.set(&rk, read);
                    read
                }
            };
            let ok = match w.precondition {
                Precondition::None => true,
                Precondition::Exists => cur.is_some(),
                Precondition::Absent => cur.is_none(),
                Precondition::Version(v) => cur.as_ref().is_some_and(|r| r.lsn == v),
            };
            if !ok {
                self.shared.metrics.precondition_failures.inc();
                return Err(EngineError::PreconditionFailed {
                    index,
                    key: w.key.clone(),
                    current: cur.map(|r| r.lsn),
                });
            }
            current.push((rk, cur));
        }

        let lsn = stage.next_lsn;
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let ts = now_ms().max(self.last_ts);

        let mut results = Vec::with_capacity(writes.len());
        let mut logged = Vec::with_capacity(writes.len());
        for (w, (rk, cur)) in writes.iter().zip(current) {
            let existed = cur.is_some();
            let record = match &w.op {
                WriteOp::Put(body) => {
                    let record = Record {
                        body: body.clone(),
                        lsn,
                        created_ms: cur.map_or(ts, |r| r.created_ms),
                        updated_ms: ts,
                    };
                    stage
                        .changes
                        .push((rk.clone(), Some(encode_record(&record))));
                    if !existed {
                        stage.delta += 1;
                    }
                    Some(record)
                }
                WriteOp::Delete => {
                    stage.changes.push((rk.clone(), None));
                    if existed {
                        stage.delta -= 1;
                    }
                    None
                }
            };
            let stamp = record.as_ref().map(|r| RecordStamp {
                lsn,
                created_ms: r.created_ms,
            });
            self.recent.set(&rk, stamp);
            logged.push(LoggedWrite {
                key: w.key.joined(),
                value: record.clone(),
            });
            results.push(WriteResult {
                created: !existed && record.is_some(),
                record,
            });
        }
        let entry = LogEntry {
            lsn,
            epoch,
            timestamp_ms: ts,
            writes: logged,
        };
        if let Some((last, value)) = stage.log.push_with(lsn, |v| entry.encode_into(v)) {
            stage.changes.push((log_key(last).to_vec(), Some(value)));
        }
        stage.next_lsn += 1;
        stage.batches += 1;
        stage.writes += writes.len() as u64;
        self.last_ts = ts;
        Ok(Committed {
            lsn,
            epoch,
            results,
        })
    }

    /// Makes a group's changes durable in the journal, then applies them to sled. Readers
    /// wait out the apply, so they see the group whole or not at all.
    fn commit_changes(&mut self, changes: &[Change], last: u64) -> Result<(), EngineError> {
        if self.journal.is_full() {
            self.checkpoint()?;
        }
        let started = Instant::now();
        self.journal.append(changes).map_err(journal_err)?;
        self.shared
            .metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        let db = &self.shared.db;
        let _applying = self
            .shared
            .applying
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for (k, v) in changes {
            match v {
                Some(v) => db.insert(k.as_slice(), v.as_slice()).map(drop),
                None => db.remove(k.as_slice()).map(drop),
            }
            .map_err(|e| sled_err(&format!("apply group ending at lsn {last}"), e))?;
        }
        Ok(())
    }

    /// Makes sled hold everything durably, then retires the journal's records.
    fn checkpoint(&mut self) -> Result<(), EngineError> {
        self.make_durable()?;
        self.journal.checkpointed().map_err(journal_err)
    }

    /// Call before any sled change the journal does not carry (replication, snapshots,
    /// epochs): a replay after a crash must never apply older journal records over it.
    fn unjournaled(&mut self) -> Result<(), EngineError> {
        if self.journal.has_records() {
            self.checkpoint()
        } else {
            Ok(())
        }
    }

    /// `Db::flush` (sync_file_range only), then fsync new blob files, the blob directory
    /// and the data file: sled then holds everything applied so far durably.
    fn make_durable(&mut self) -> Result<(), EngineError> {
        let started = Instant::now();
        self.shared.db.flush().map_err(|e| sled_err("flush", e))?;
        self.sync_blobs()?;
        self.db_file
            .sync_data()
            .map_err(|e| io_err("fsync sled data file", e))?;
        self.shared
            .metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// sled writes a node bigger than a quarter segment (~128 KiB) to `blobs/<lsn>` with
    /// plain writes and never syncs it; fsync every blob file not synced yet, and the
    /// directory when new ones appeared.
    fn sync_blobs(&mut self) -> Result<(), EngineError> {
        let dir = self.path.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list sled blobs", e)),
        };
        let mut present = HashMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err("list sled blobs", e))?;
            present.insert(entry.file_name(), entry.path());
        }
        let mut new_files = false;
        for (name, path) in &present {
            if self.synced_blobs.contains(name) {
                continue;
            }
            match File::open(path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Garbage-collected by sled between listing and opening.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&format!("fsync blob {}", path.display()), e)),
            }
            self.synced_blobs.insert(name.clone());
            new_files = true;
        }
        self.synced_blobs.retain(|n| present.contains_key(n));
        if new_files {
            sync_path(&dir)?;
        }
        Ok(())
    }

    /// Truncates the log outside a group (after applying replicated entries, which have
    /// no group batch to ride on): one small batch removing the chunks that
    /// [`Writer::stage_truncation`] finds out of retention. The removal becomes durable
    /// with the next fsync; losing it in a crash only delays it.
    fn truncate_log(&mut self) {
        let mut stage = Stage::after(self.shared.last_lsn.load(Ordering::Acquire));
        let first = self.shared.first_log_lsn.load(Ordering::Acquire);
        let Some(end) = self.stage_truncation(&mut stage) else {
            return;
        };
        let mut batch = sled::Batch::default();
        for (k, _) in stage.changes {
            batch.remove(k);
        }
        if let Err(e) = self.unjournaled() {
            tracing::warn!(error = %e, "log truncation failed; will retry");
            return;
        }
        // Advance first_log_lsn before removing so readers never expect a removed entry.
        self.shared.first_log_lsn.store(end, Ordering::Release);
        if let Err(e) = self.shared.db.apply_batch(batch) {
            tracing::warn!(error = %e, "log truncation failed; will retry");
            self.shared.first_log_lsn.store(first, Ordering::Release);
        }
    }

    /// Adds the removal of log chunks that fell wholly out of retention to the group's
    /// batch, so truncation rides on the group's one `apply_batch` instead of paying
    /// sled's per-batch IO-buffer roll again. Returns the new first LSN to publish once
    /// applied. A chunk goes only when its last entry is past retention, so the log keeps
    /// up to one chunk more than `retention` entries.
    fn stage_truncation(&self, stage: &mut Stage) -> Option<u64> {
        let last = stage.next_lsn - 1;
        // Never past what was durable before this group: an entry must exist on disk at
        // least once, or a follower reading the log would see a gap.
        let before_group = self.shared.last_lsn.load(Ordering::Acquire) + 1;
        let cutoff = last.checked_sub(self.retention)?.min(before_group);
        let first = self.shared.first_log_lsn.load(Ordering::Acquire);
        if first >= cutoff {
            return None;
        }
        // Chunks are keyed by their last LSN: every key below `cutoff` is a whole chunk
        // out of retention. A failed read only delays truncation to a later group.
        let mut end = None;
        for k in self
            .shared
            .db
            .range(log_key(first)..log_key(cutoff))
            .keys()
            .take(TRUNCATE_CHUNKS)
        {
            let Ok(k) = k else { break };
            let Ok(chunk_last) = decode_log_key(&k) else {
                break;
            };
            stage.changes.push((k.to_vec(), None));
            end = Some(chunk_last + 1);
        }
        end
    }
}

impl Engine {
    /// Registers the engine's metrics with the node's registry: the histograms are shared
    /// handles, the gauges are computed from [`Engine::status`] at scrape time.
    pub fn register_metrics(self: &Arc<Self>, metrics: &crate::metrics::Metrics) {
        let m = self.metrics();
        metrics.register(
            "storage_group_commit_size",
            "Client batches made durable by one synchronous journal write",
            m.group_size.clone(),
        );
        metrics.register(
            "storage_flush_seconds",
            "Time making one group commit durable took (one synchronous journal write)",
            m.flush_seconds.clone(),
        );
        metrics.register(
            "storage_batches",
            "Write batches committed",
            m.batches.clone(),
        );
        metrics.register(
            "storage_writes",
            "Individual writes committed",
            m.writes.clone(),
        );
        let weak = Arc::downgrade(self);
        let gauge = |f: fn(&EngineStatus) -> u64| {
            let weak = weak.clone();
            move || {
                weak.upgrade()
                    .map_or(0, |e| i64::try_from(f(&e.status())).unwrap_or(i64::MAX))
            }
        };
        metrics.gauge_fn("storage_records", "Records stored", gauge(|s| s.records));
        metrics.gauge_fn(
            "storage_disk_bytes",
            "Bytes the database occupies on disk",
            gauge(|s| s.disk_bytes),
        );
        metrics.gauge_fn(
            "storage_last_lsn",
            "Newest applied log sequence number",
            gauge(|s| s.last_lsn),
        );
        metrics.gauge_fn(
            "storage_durable_lsn",
            "Newest durable log sequence number",
            gauge(|s| s.durable_lsn),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> EngineConfig {
        EngineConfig {
            path: dir.join("data"),
            log_retention: 1_000_000,
            max_group: 128,
            cache_bytes: 16 << 20,
        }
    }

    fn open(dir: &Path) -> Arc<Engine> {
        Engine::open(config(dir)).expect("open engine")
    }

    fn key(c: &str, i: &str) -> Key {
        Key::new(c, i).expect("valid key")
    }

    fn put(k: &Key, body: &str, precondition: Precondition) -> Write {
        Write {
            key: k.clone(),
            op: WriteOp::Put(Bytes::copy_from_slice(body.as_bytes())),
            precondition,
        }
    }

    fn del(k: &Key, precondition: Precondition) -> Write {
        Write {
            key: k.clone(),
            op: WriteOp::Delete,
            precondition,
        }
    }

    #[tokio::test]
    async fn put_get_delete() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let k = key("notes", "a");
        assert_eq!(engine.get(&k).unwrap(), None);

        let c = engine
            .write(vec![put(&k, "{\"v\":1}", Precondition::None)])
            .await
            .unwrap();
        assert_eq!(c.lsn, 1);
        assert_eq!(c.epoch, 1);
        assert!(c.results[0].created);
        let r1 = engine.get(&k).unwrap().unwrap();
        assert_eq!(r1.body, Bytes::from_static(b"{\"v\":1}"));
        assert_eq!(r1.lsn, 1);
        assert_eq!(Some(&r1), c.results[0].record.as_ref());
        assert_eq!(engine.status().records, 1);

        let c = engine
            .write(vec![put(&k, "{\"v\":2}", Precondition::None)])
            .await
            .unwrap();
        assert_eq!(c.lsn, 2);
        assert!(!c.results[0].created);
        let r2 = engine.get(&k).unwrap().unwrap();
        assert_eq!(r2.body, Bytes::from_static(b"{\"v\":2}"));
        assert_eq!(r2.lsn, 2);
        assert_eq!(r2.created_ms, r1.created_ms, "created_ms survives updates");
        assert!(r2.updated_ms >= r1.updated_ms);
        assert_eq!(engine.status().records, 1);

        let c = engine
            .write(vec![del(&k, Precondition::None)])
            .await
            .unwrap();
        assert_eq!(c.lsn, 3);
        assert_eq!(
            c.results[0],
            WriteResult {
                record: None,
                created: false
            }
        );
        assert_eq!(engine.get(&k).unwrap(), None);
        assert_eq!(engine.status().records, 0);

        // Deleting an absent key without a precondition is allowed (and logged).
        let c = engine
            .write(vec![del(&k, Precondition::None)])
            .await
            .unwrap();
        assert_eq!(c.lsn, 4);
        assert_eq!(
            c.results[0],
            WriteResult {
                record: None,
                created: false
            }
        );
        let st = engine.status();
        assert_eq!(
            (st.last_lsn, st.durable_lsn, st.records, st.epoch),
            (4, 4, 0, 1)
        );
        assert!(st.disk_bytes > 0);
        engine.shutdown().unwrap();
    }

    #[tokio::test]
    async fn invalid_batches() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let k = key("c", "x");
        assert!(matches!(
            engine.write(vec![]).await,
            Err(EngineError::InvalidBatch(_))
        ));
        let dup = vec![
            put(&k, "1", Precondition::None),
            del(&k, Precondition::None),
        ];
        assert!(matches!(
            engine.write(dup).await,
            Err(EngineError::InvalidBatch(_))
        ));
        assert_eq!(engine.status().last_lsn, 0);
    }

    #[tokio::test]
    async fn preconditions() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let k = key("c", "k");

        let fail = |r: Result<Committed, EngineError>, want_current: Option<u64>| match r {
            Err(EngineError::PreconditionFailed {
                index,
                key,
                current,
            }) => {
                assert_eq!(index, 0);
                assert_eq!(key, k);
                assert_eq!(current, want_current);
            }
            other => panic!("expected precondition failure, got {other:?}"),
        };

        // Absent key.
        fail(
            engine.write(vec![put(&k, "1", Precondition::Exists)]).await,
            None,
        );
        fail(
            engine
                .write(vec![put(&k, "1", Precondition::Version(1))])
                .await,
            None,
        );
        fail(
            engine.write(vec![del(&k, Precondition::Exists)]).await,
            None,
        );
        let c = engine
            .write(vec![put(&k, "1", Precondition::Absent)])
            .await
            .unwrap();
        assert_eq!(c.lsn, 1);

        // Present at version 1.
        fail(
            engine.write(vec![put(&k, "2", Precondition::Absent)]).await,
            Some(1),
        );
        fail(
            engine
                .write(vec![put(&k, "2", Precondition::Version(7))])
                .await,
            Some(1),
        );
        let c = engine
            .write(vec![put(&k, "2", Precondition::Exists)])
            .await
            .unwrap();
        assert_eq!(c.lsn, 2);
        fail(
            engine
                .write(vec![put(&k, "3", Precondition::Version(1))])
                .await,
            Some(2),
        );
        let c = engine
            .write(vec![put(&k, "3", Precondition::Version(2))])
            .await
            .unwrap();
        assert_eq!(c.lsn, 3);
        fail(
            engine.write(vec![del(&k, Precondition::Version(2))]).await,
            Some(3),
        );
        let c = engine
            .write(vec![del(&k, Precondition::Version(3))])
            .await
            .unwrap();
        assert_eq!(c.lsn, 4);
        assert_eq!(engine.metrics().precondition_failures.get(), 7);
        assert_eq!(
            engine.read_log(1, 100).unwrap().len(),
            4,
            "failures are not logged"
        );
    }

    #[tokio::test]
    async fn batch_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let (a, b, c) = (key("c", "a"), key("c", "b"), key("c", "c"));
        engine
            .write(vec![put(&a, "a1", Precondition::None)])
            .await
            .unwrap();

        let batch = vec![
            put(&b, "b1", Precondition::Absent),
            put(&a, "a2", Precondition::Version(1)),
            put(&c, "c1", Precondition::Exists), // fails: c is absent
        ];
        match engine.write(batch).await {
            Err(EngineError::PreconditionFailed {
                index: 2,
                key,
                current: None,
            }) => {
                assert_eq!(key, c)
            }
            other => panic!("expected failure at index 2, got {other:?}"),
        }
        assert_eq!(engine.get(&b).unwrap(), None);
        assert_eq!(
            engine.get(&a).unwrap().unwrap().body,
            Bytes::from_static(b"a1")
        );
        let st = engine.status();
        assert_eq!((st.last_lsn, st.records), (1, 1));
        assert_eq!(
            engine.read_log(1, 100).unwrap().len(),
            1,
            "no log entry written"
        );

        // The same batch with a satisfiable precondition applies as one entry.
        let batch = vec![
            put(&b, "b1", Precondition::Absent),
            put(&a, "a2", Precondition::Version(1)),
            put(&c, "c1", Precondition::Absent),
        ];
        let done = engine.write(batch).await.unwrap();
        assert_eq!(done.lsn, 2);
        let created: Vec<bool> = done.results.iter().map(|r| r.created).collect();
        assert_eq!(created, [true, false, true]);
        for k in [&a, &b, &c] {
            assert_eq!(engine.get(k).unwrap().unwrap().lsn, 2);
        }
        assert_eq!(engine.status().records, 3);
    }

    #[tokio::test]
    async fn list_pagination() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let mut writes = vec![];
        for i in 0..25 {
            writes.push(put(
                &key("items", &format!("a{i:02}")),
                "{}",
                Precondition::None,
            ));
        }
        for i in 0..5 {
            writes.push(put(
                &key("items", &format!("b{i}")),
                "{}",
                Precondition::None,
            ));
        }
        // Neighbouring collections must not leak into the listing.
        writes.push(put(&key("item", "a00"), "{}", Precondition::None));
        writes.push(put(&key("items-x", "a00"), "{}", Precondition::None));
        writes.push(put(&key("itemsz", "a00"), "{}", Precondition::None));
        engine.write(writes).await.unwrap();

        let ids = |p: &ListPage| p.items.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
        let q = |prefix: &str, after: Option<&str>, limit| ListQuery {
            prefix: prefix.into(),
            after: after.map(Into::into),
            limit,
        };

        // Whole collection, pages of 10: 30 items.
        let mut all = vec![];
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = engine.list("items", &q("", after.as_deref(), 10)).unwrap();
            pages += 1;
            all.extend(ids(&page));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(all.len(), 30);
        assert!(all.windows(2).all(|w| w[0] < w[1]), "id order");
        assert_eq!(pages, 3, "exactly 30 items: the third page has no next");

        // Prefix + limit.
        let page = engine.list("items", &q("a", None, 10)).unwrap();
        assert_eq!(ids(&page).first().map(String::as_str), Some("a00"));
        assert_eq!(page.next.as_deref(), Some("a09"));
        let page = engine.list("items", &q("a", Some("a19"), 10)).unwrap();
        assert_eq!(ids(&page), ["a20", "a21", "a22", "a23", "a24"]);
        assert_eq!(page.next, None);
        let page = engine.list("items", &q("a", Some("a14"), 10)).unwrap();
        assert_eq!(page.items.len(), 10);
        assert_eq!(page.next, None, "nothing follows a24 within the prefix");
        let page = engine.list("items", &q("b", None, 100)).unwrap();
        assert_eq!(ids(&page), ["b0", "b1", "b2", "b3", "b4"]);
        let page = engine.list("items", &q("a1", None, 100)).unwrap();
        assert_eq!(page.items.len(), 10);
        // `after` below the prefix starts at the prefix; above it yields nothing.
        let page = engine.list("items", &q("b", Some("a99"), 2)).unwrap();
        assert_eq!(ids(&page), ["b0", "b1"]);
        assert_eq!(page.next.as_deref(), Some("b1"));
        assert!(engine
            .list("items", &q("a", Some("b"), 10))
            .unwrap()
            .items
            .is_empty());
        // Edge cases.
        assert!(engine
            .list("items", &q("", None, 0))
            .unwrap()
            .items
            .is_empty());
        assert!(engine
            .list("nothing", &q("", None, 10))
            .unwrap()
            .items
            .is_empty());
        assert!(engine
            .list("bad/name", &q("", None, 10))
            .unwrap()
            .items
            .is_empty());
        assert_eq!(
            ids(&engine.list("item", &q("", None, 10)).unwrap()),
            ["a00"]
        );
    }

    #[tokio::test]
    async fn log_entries_match_records() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let (a, b) = (key("c", "a"), key("c", "b"));
        let mut lsns = vec![];
        lsns.push(
            engine
                .write(vec![put(&a, "a1", Precondition::None)])
                .await
                .unwrap()
                .lsn,
        );
        lsns.push(
            engine
                .write(vec![
                    put(&b, "b1", Precondition::None),
                    put(&a, "a2", Precondition::None),
                ])
                .await
                .unwrap()
                .lsn,
        );
        lsns.push(
            engine
                .write(vec![del(&b, Precondition::Exists)])
                .await
                .unwrap()
                .lsn,
        );
        assert_eq!(lsns, [1, 2, 3]);

        let log = engine.read_log(0, 100).unwrap();
        assert_eq!(log.iter().map(|e| e.lsn).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(log.iter().all(|e| e.epoch == 1));
        assert!(log
            .windows(2)
            .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms));
        assert_eq!(log[1].writes.len(), 2);
        assert_eq!(log[1].writes[0].key, "c/b");
        assert_eq!(
            log[1].writes[1].value.as_ref(),
            engine.get(&a).unwrap().as_ref()
        );
        assert_eq!(
            log[2].writes,
            [LoggedWrite {
                key: "c/b".into(),
                value: None
            }]
        );

        // Replaying the log reproduces the records.
        let mut replay = std::collections::BTreeMap::new();
        for e in &log {
            for w in &e.writes {
                match &w.value {
                    Some(r) => replay.insert(w.key.clone(), r.clone()),
                    None => replay.remove(&w.key),
                };
            }
        }
        assert_eq!(replay.len(), 1);
        assert_eq!(Some(&replay["c/a"]), engine.get(&a).unwrap().as_ref());

        // Paging through read_log.
        assert_eq!(engine.read_log(2, 1).unwrap()[0].lsn, 2);
        assert!(engine.read_log(4, 10).unwrap().is_empty());
        assert!(engine.read_log(1, 0).unwrap().is_empty());

        // Encode/decode round trip, and a flipped byte fails the checksum.
        let bytes = log[1].encode();
        assert_eq!(LogEntry::decode(&bytes).unwrap(), log[1]);
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(matches!(
            LogEntry::decode(&bad),
            Err(EngineError::Corrupt(_))
        ));
        for cut in 0..bytes.len() {
            assert!(matches!(
                LogEntry::decode(&bytes[..cut]),
                Err(EngineError::Corrupt(_))
            ));
        }
    }

    /// A crash after acknowledging but before sled wrote anything: only the journal has
    /// the groups. Copying the journal of a running engine next to an empty database is
    /// that state; opening it must replay every group (records, log, LSN) and nothing of
    /// a retired cycle.
    #[tokio::test]
    async fn groups_only_in_the_journal_are_replayed_on_open() {
        let (live, crashed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (key("c", "a"), key("c", "b"));
        let engine = open(live.path());
        for i in 0..4 {
            engine
                .write(vec![put(&a, &format!("{i}"), Precondition::None)])
                .await
                .unwrap();
        }
        engine
            .write(vec![
                put(&b, "b", Precondition::None),
                del(&a, Precondition::Exists),
            ])
            .await
            .unwrap();
        engine
            .write(vec![put(&a, "again", Precondition::Absent)])
            .await
            .unwrap();
        let data = |d: &tempfile::TempDir| config(d.path()).path;
        std::fs::create_dir_all(data(&crashed)).unwrap();
        std::fs::copy(
            data(&live).join(JOURNAL_FILE),
            data(&crashed).join(JOURNAL_FILE),
        )
        .unwrap();
        let want: Vec<_> = engine.read_log(1, 100).unwrap();
        let want_a = engine.get(&a).unwrap().unwrap();
        engine.shutdown().unwrap();

        let replayed = open(crashed.path());
        let st = replayed.status();
        assert_eq!((st.last_lsn, st.durable_lsn, st.records), (6, 6, 2));
        assert_eq!(replayed.get(&a).unwrap(), Some(want_a));
        assert_eq!(
            replayed.get(&b).unwrap().map(|r| r.body),
            Some(Bytes::from_static(b"b"))
        );
        assert_eq!(replayed.read_log(1, 100).unwrap(), want);
        // The replay was checkpointed: a second open replays nothing over later writes.
        replayed
            .write(vec![put(&b, "later", Precondition::None)])
            .await
            .unwrap();
        replayed.shutdown().unwrap();
        drop(replayed);
        let again = open(crashed.path());
        assert_eq!(
            again.get(&b).unwrap().map(|r| (r.body, r.lsn)),
            Some((Bytes::from_static(b"later"), 7))
        );
    }

    /// A group goes to sled as separate inserts; the apply lock must still keep a reader
    /// from seeing half of a batch. A listing racing batches that set two records to the
    /// same value must always find them equal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_never_sees_half_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let (a, b) = (key("pair", "a"), key("pair", "b"));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (engine, done) = (engine.clone(), done.clone());
            std::thread::spawn(move || {
                let query = ListQuery {
                    prefix: String::new(),
                    after: None,
                    limit: 10,
                };
                let mut seen = 0;
                while !done.load(Ordering::Acquire) {
                    let page = engine.list("pair", &query).unwrap();
                    if let [(_, ra), (_, rb)] = page.items.as_slice() {
                        assert_eq!(ra.body, rb.body, "a listing saw half a batch");
                        seen += 1;
                    }
                }
                seen
            })
        };
        for i in 0..300 {
            let v = format!("{i}");
            engine
                .write(vec![
                    put(&a, &v, Precondition::None),
                    put(&b, &v, Precondition::None),
                ])
                .await
                .unwrap();
        }
        done.store(true, Ordering::Release);
        assert!(reader.join().unwrap() > 0, "the reader listed the pair");
    }

    #[tokio::test]
    async fn reopen_keeps_state_and_lsn_continues() {
        let dir = tempfile::tempdir().unwrap();
        let k = key("c", "persist");
        let created_ms;
        {
            let engine = open(dir.path());
            for i in 0..5 {
                engine
                    .write(vec![put(&k, &format!("{i}"), Precondition::None)])
                    .await
                    .unwrap();
            }
            engine
                .write(vec![put(&key("c", "other"), "o", Precondition::None)])
                .await
                .unwrap();
            created_ms = engine.get(&k).unwrap().unwrap().created_ms;
            engine.shutdown().unwrap();
            engine.shutdown().unwrap(); // twice is fine
            let late = engine
                .write(vec![put(&k, "late", Precondition::None)])
                .await;
            assert!(matches!(late, Err(EngineError::Closed)));
            assert_eq!(
                engine.get(&k).unwrap().unwrap().lsn,
                5,
                "reads survive shutdown"
            );
        }
        {
            let engine = open(dir.path());
            let st = engine.status();
            assert_eq!((st.last_lsn, st.durable_lsn, st.first_log_lsn), (6, 6, 1));
            assert_eq!((st.records, st.epoch), (2, 1));
            let r = engine.get(&k).unwrap().unwrap();
            assert_eq!(
                (r.body, r.lsn, r.created_ms),
                (Bytes::from_static(b"4"), 5, created_ms)
            );
            let c = engine
                .write(vec![put(&k, "5", Precondition::Version(5))])
                .await
                .unwrap();
            assert_eq!(c.lsn, 7);
            assert_eq!(c.results[0].record.as_ref().unwrap().created_ms, created_ms);
            assert_eq!(engine.read_log(1, 100).unwrap().len(), 7);
            // Dropped without shutdown: Drop drains and syncs.
        }
        let engine = open(dir.path());
        assert_eq!(engine.status().last_lsn, 7);
        assert_eq!(engine.get(&k).unwrap().unwrap().lsn, 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_are_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let mut tasks = vec![];
        for t in 0..50 {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let mut lsns = vec![];
                for i in 0..20 {
                    let k = key("load", &format!("t{t:02}-{i:02}"));
                    let c = engine
                        .write(vec![put(&k, "{}", Precondition::Absent)])
                        .await
                        .unwrap();
                    lsns.push(c.lsn);
                }
                assert!(
                    lsns.windows(2).all(|w| w[0] < w[1]),
                    "a task's writes are ordered"
                );
                lsns
            }));
        }
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(
            all,
            (1..=1000).collect::<Vec<u64>>(),
            "every LSN used exactly once"
        );

        let st = engine.status();
        assert_eq!(
            (st.last_lsn, st.durable_lsn, st.records),
            (1000, 1000, 1000)
        );
        let page = engine
            .list(
                "load",
                &ListQuery {
                    limit: 2000,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(page.items.len(), 1000);
        let m = engine.metrics();
        assert_eq!(m.batches.get(), 1000);
        assert_eq!(m.writes.get(), 1000);
        let groups = m.groups.get();
        assert!(
            groups < 1000,
            "group commit grouped nothing: {groups} groups"
        );
        eprintln!("1000 batches in {groups} group commits");
    }

    fn log_keys(engine: &Engine) -> usize {
        engine.shared.db.scan_prefix([LOG_PREFIX]).keys().count()
    }

    /// A replicated apply packs its entries into few chunks; reads start at any LSN
    /// inside one, stop at `max_entries`, survive a reopen, and retention drops whole
    /// chunks only. Bare entries (the format before chunks) read as before.
    #[tokio::test]
    async fn log_chunks_read_from_any_lsn_and_truncate_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let p = open(&tmp.path().join("p"));
        let pad = "x".repeat(150);
        for i in 0..400 {
            let k = key("c", &format!("k{}", i % 50));
            p.write(vec![put(&k, &format!("\"{pad}{i}\""), Precondition::None)])
                .await
                .unwrap();
        }
        let shipped = p.read_log(1, 1000).unwrap();
        assert_eq!(shipped.len(), 400);

        let rdir = tmp.path().join("r");
        let r = Engine::open(EngineConfig {
            log_retention: 150,
            ..config(&rdir)
        })
        .unwrap();
        r.apply_replicated(shipped[..140].to_vec()).await.unwrap();
        let chunks = log_keys(&r);
        assert!(
            (2..=4).contains(&chunks),
            "140 entries of ~220 bytes in {chunks} chunks"
        );
        for from in [1, 2, 77, 139, 140] {
            let got = r.read_log(from, 7).unwrap();
            let want: Vec<_> = shipped[from as usize - 1..140]
                .iter()
                .take(7)
                .cloned()
                .collect();
            assert_eq!(got, want, "from {from}");
        }
        assert_eq!(r.read_log_raw(141, 10).unwrap(), vec![]);
        assert_eq!(r.content_hash().unwrap().0, 50);

        // Past retention: only whole chunks go, and what is left still reads in order.
        r.apply_replicated(shipped[140..].to_vec()).await.unwrap();
        r.shutdown().unwrap();
        let st = r.status();
        assert_eq!(st.last_lsn, 400);
        assert!(
            st.first_log_lsn > 1 && st.first_log_lsn <= 400 - 150,
            "first log lsn {}",
            st.first_log_lsn
        );
        let first = st.first_log_lsn;
        let rest = r.read_log(0, 1000).unwrap();
        assert_eq!(rest.first().map(|e| e.lsn), Some(first));
        assert_eq!(rest.len() as u64, 400 - first + 1);
        drop(r);

        let r = Engine::open(config(&rdir)).unwrap();
        let st = r.status();
        assert_eq!((st.first_log_lsn, st.last_lsn), (first, 400));
        assert_eq!(r.read_log(first, 1000).unwrap(), rest);
        assert_eq!(r.content_hash().unwrap(), p.content_hash().unwrap());
        r.shutdown().unwrap();
        drop(r);

        // The primary wrote one group per write (one chunk each); store them as the
        // format before chunks did, a bare entry per key, and read them back.
        let db = &p.shared.db;
        for (lsn, bytes) in p.read_log_raw(1, 1000).unwrap() {
            db.insert(log_key(lsn), bytes).unwrap();
        }
        assert_eq!(p.read_log(1, 1000).unwrap(), shipped);
    }

    /// The raw log read a primary ships from gives exactly the stored encodings, and a
    /// replica storing those bytes as they came holds the same log as one re-encoding.
    #[tokio::test]
    async fn raw_log_reads_are_the_encodings_and_apply_as_shipped() {
        let tmp = tempfile::tempdir().unwrap();
        let p = open(&tmp.path().join("p"));
        for i in 0..20 {
            let k = key("c", &format!("k{}", i % 7));
            let w = if i % 5 == 4 {
                del(&k, Precondition::None)
            } else {
                put(&k, &format!("{{\"i\":{i}}}"), Precondition::None)
            };
            let _ = p.write(vec![w]).await;
        }
        let decoded = p.read_log(1, 100).unwrap();
        let raw = p.read_log_raw(1, 100).unwrap();
        assert_eq!(raw.len(), decoded.len());
        for ((lsn, bytes), e) in raw.iter().zip(&decoded) {
            assert_eq!((*lsn, bytes.clone()), (e.lsn, e.encode()));
        }
        assert_eq!(p.read_log_raw(3, 2).unwrap()[0].0, 3);
        let r = open(&tmp.path().join("r"));
        let bytes: Vec<Vec<u8>> = raw.into_iter().map(|(_, b)| b).collect();
        assert!(r
            .apply_shipped(decoded.clone(), bytes[1..].to_vec())
            .await
            .is_err());
        r.apply_shipped(decoded, bytes).await.unwrap();
        assert_eq!(r.content_hash().unwrap(), p.content_hash().unwrap());
        assert_eq!(
            r.read_log_raw(1, 100).unwrap(),
            p.read_log_raw(1, 100).unwrap()
        );
    }

    #[tokio::test]
    async fn log_retention_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(EngineConfig {
            log_retention: 10,
            ..config(dir.path())
        })
        .unwrap();
        let k = key("c", "k");
        for i in 0..50 {
            engine
                .write(vec![put(&k, &format!("{i}"), Precondition::None)])
                .await
                .unwrap();
        }
        // The writer truncates right after answering each group, before it takes the
        // next message, so after shutdown the log is exactly `40..=50`.
        engine.shutdown().unwrap();
        let st = engine.status();
        assert_eq!((st.last_lsn, st.first_log_lsn), (50, 40));
        let log = engine.read_log(0, 1000).unwrap();
        assert_eq!(
            log.len(),
            11,
            "retention entries behind the newest, plus the newest"
        );
        assert_eq!(log.first().map(|e| e.lsn), Some(40));
        assert_eq!(log.last().map(|e| e.lsn), Some(50));
        drop(engine);

        let engine = Engine::open(EngineConfig {
            log_retention: 10,
            ..config(dir.path())
        })
        .unwrap();
        let st = engine.status();
        assert_eq!((st.last_lsn, st.first_log_lsn), (50, 40));
    }

    #[tokio::test]
    async fn large_values_round_trip_through_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let k = key("big", "one");
        let body = format!("\"{}\"", "x".repeat(600 * 1024));
        {
            let engine = open(dir.path());
            engine
                .write(vec![put(&k, &body, Precondition::None)])
                .await
                .unwrap();
            assert_eq!(engine.get(&k).unwrap().unwrap().body.len(), body.len());
            engine.shutdown().unwrap();
        }
        // sled spills nodes over ~128 KiB to `blobs/`; those are what `sync_blobs` fsyncs.
        let blobs = std::fs::read_dir(dir.path().join("data/blobs"))
            .unwrap()
            .count();
        assert!(blobs > 0, "expected sled to write a blob file");
        let engine = open(dir.path());
        assert_eq!(
            engine.get(&k).unwrap().unwrap().body,
            Bytes::from(body.clone())
        );
        assert_eq!(
            engine.read_log(1, 1).unwrap()[0].writes[0]
                .value
                .as_ref()
                .unwrap()
                .body
                .len(),
            body.len()
        );
    }

    #[tokio::test]
    async fn writes_check_what_replication_installed_not_what_they_remember() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let (k, gone) = (key("c", "k"), key("c", "gone"));
        for id in [&k, &gone] {
            engine
                .write(vec![put(id, "mine", Precondition::None)])
                .await
                .unwrap();
        }
        // A snapshot from another primary replaces every record: k at version 7, and
        // `gone` not at all.
        let h = History::from_pairs(&[(1, 0), (2, 5)]).unwrap();
        engine.snapshot_begin(h, 9).await.unwrap();
        let theirs = Record {
            body: Bytes::from_static(b"theirs"),
            lsn: 7,
            created_ms: 1,
            updated_ms: 2,
        };
        engine
            .snapshot_chunk(vec![(k.to_string(), theirs)])
            .await
            .unwrap();
        engine.snapshot_end().await.unwrap();

        let c = engine
            .write(vec![put(&k, "next", Precondition::Version(7))])
            .await
            .unwrap();
        assert!(!c.results[0].created);
        assert_eq!(c.results[0].record.as_ref().unwrap().created_ms, 1);
        let c = engine
            .write(vec![put(&gone, "again", Precondition::Absent)])
            .await
            .unwrap();
        assert!(c.results[0].created);
        assert_eq!(engine.status().records, 2);
    }

    #[tokio::test]
    async fn corrupt_values_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        let k = key("c", "k");
        engine
            .write(vec![put(&k, "one", Precondition::None)])
            .await
            .unwrap();
        engine
            .write(vec![put(&k, "two", Precondition::None)])
            .await
            .unwrap();
        let db = &engine.shared.db;

        // A flipped byte in a stored log entry: checksum mismatch.
        let mut v = db.get(log_key(2)).unwrap().unwrap().to_vec();
        let last = v.len() - 1;
        v[last] ^= 1;
        db.insert(log_key(2), v).unwrap();
        assert_eq!(engine.read_log(1, 1).unwrap().len(), 1, "entry 1 is fine");
        assert!(matches!(
            engine.read_log(1, 10),
            Err(EngineError::Corrupt(_))
        ));

        // Garbage and truncated values.
        for garbage in [&b""[..], b"\x01", b"\x07abc", b"\x01\x00\x00\x00\x00"] {
            db.insert(log_key(1), garbage).unwrap();
            assert!(matches!(
                engine.read_log(1, 1),
                Err(EngineError::Corrupt(_))
            ));
            db.insert(record_key(&k), garbage).unwrap();
            assert!(matches!(engine.get(&k), Err(EngineError::Corrupt(_))));
            let all = ListQuery {
                limit: 10,
                ..Default::default()
            };
            assert!(matches!(
                engine.list("c", &all),
                Err(EngineError::Corrupt(_))
            ));
            // The writer reports it too, and stays up. (It reads only records it has not
            // written or read since it opened: one it knows, it knows exactly.)
            let unseen = key("c", "unseen");
            db.insert(record_key(&unseen), garbage).unwrap();
            let w = engine
                .write(vec![put(&unseen, "x", Precondition::None)])
                .await;
            assert!(matches!(w, Err(EngineError::Corrupt(_))));
        }
        let other = key("c", "other");
        assert!(engine
            .write(vec![put(&other, "ok", Precondition::None)])
            .await
            .is_ok());
        // Corrupt metadata refuses to open rather than guessing.
        db.insert(META_LAST_LSN, &b"xx"[..]).unwrap();
        engine.shutdown().unwrap();
        drop(engine);
        assert!(matches!(
            Engine::open(config(dir.path())),
            Err(EngineError::Corrupt(_))
        ));
    }
}
