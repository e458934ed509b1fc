//! Backups: a consistent copy of a node's data as one file, taken while the node serves
//! (best from a replica, so the primary does no extra work), and restored into a fresh
//! data directory with `strata restore`.
//!
//! The file is the replication snapshot stream written down: a magic line, then protocol
//! frames — `SnapshotBegin{history, tag}`, record pages (`SnapshotChunk`) with the log
//! entries after the tag interleaved (`Entries`), `SnapshotEnd{end}` — and finally the
//! SHA-256 of everything before it. Pages are read while writes go on; since every log
//! entry sets whole values, replaying the entries up to `end` over the pages gives exactly
//! the data as of LSN `end` (the argument is the one in `replication::send_snapshot`).
//! Restoring uses the same engine calls a replica's snapshot install does, so a restored
//! directory can start as a primary or resume following its primary from `end`.
//!
//! Integrity: a truncated or altered file fails the checksum or the frame decoder, and the
//! restore is built in a temporary directory renamed into place only when complete.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::engine::{Engine, EngineConfig, EngineError, LogEntry};
use super::protocol::{self, Message, MAX_FRAME_CEILING};
use super::replication::state::History;
use super::{wire, Key};

/// The file's first bytes: what it is and the format version.
pub const MAGIC: &[u8; 16] = b"STRATA-BACKUP-1\n";
/// Bytes of records (or log entries) per frame.
const PAGE_BYTES: usize = 256 * 1024;
/// Log entries per read while catching up.
const LOG_BATCH: usize = 1024;
/// How long the backup waits for the last records it read to become durable.
const DURABLE_WAIT: Duration = Duration::from_secs(30);
/// How long a chunk may wait for the client to take it before the backup is abandoned
/// (a stalled download must not keep a producer alive forever).
const CLIENT_STALL: Duration = Duration::from_secs(60);

/// Why a backup could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The engine failed (reading pages or the log; applying on restore).
    #[error("storage: {0}")]
    Engine(#[from] EngineError),
    /// The log no longer holds an entry the backup needs (retention passed it while the
    /// pages were read): take the backup again, or raise `node.log_retention`.
    #[error("the log no longer holds LSN {0}; take the backup again")]
    LogTruncated(u64),
    /// The node's data is partial (a replica installing a snapshot).
    #[error("this node is installing a snapshot; its data is partial")]
    Resyncing,
    /// Records read were not made durable in time.
    #[error("records read were not durable within {0:?}")]
    NotDurable(Duration),
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a complete, intact Strata backup.
    #[error("not a valid backup: {0}")]
    Invalid(String),
    /// The restore target already holds something.
    #[error("{0} exists and is not empty; restore into a new directory")]
    TargetNotEmpty(PathBuf),
}

fn invalid(why: impl Into<String>) -> BackupError {
    BackupError::Invalid(why.into())
}

/// Starts a backup of `engine` and returns the stream of its bytes, or why it cannot start
/// (the node's data is partial). The producer stops when the receiver is dropped (the
/// client went away). An `Err` item means the backup failed part-way: the bytes sent so
/// far lack the trailer, so no restore accepts them.
pub fn spawn(
    engine: Arc<Engine>,
) -> Result<mpsc::Receiver<Result<Bytes, BackupError>>, BackupError> {
    if engine.resyncing() {
        return Err(BackupError::Resyncing);
    }
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut out = Sink {
            tx: tx.clone(),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
        };
        if let Err(e) = produce(&engine, &mut out).await {
            tracing::warn!(error = %e, "backup failed");
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(rx)
}

/// Where backup bytes go: the channel, and the running checksum.
struct Sink {
    tx: mpsc::Sender<Result<Bytes, BackupError>>,
    hash: ring::digest::Context,
}

impl Sink {
    /// Sends bytes; `false` when the receiver is gone or stalled (stop quietly: the
    /// client never gets the trailer, so what it has cannot be restored).
    async fn send(&mut self, bytes: Vec<u8>) -> bool {
        self.hash.update(&bytes);
        match tokio::time::timeout(CLIENT_STALL, self.tx.send(Ok(Bytes::from(bytes)))).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!("backup abandoned: the client took nothing for {CLIENT_STALL:?}");
                false
            }
        }
    }
}

async fn produce(engine: &Engine, out: &mut Sink) -> Result<(), BackupError> {
    if engine.resyncing() {
        return Err(BackupError::Resyncing);
    }
    let tag = engine.status().durable_lsn;
    if !out.send(MAGIC.to_vec()).await {
        return Ok(());
    }
    let begin = Message::SnapshotBegin {
        history: engine.history().to_pairs(),
        tag_lsn: tag,
    };
    if !out.send(protocol::encode_frame(&begin)).await {
        return Ok(());
    }
    let mut next = tag + 1;
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        // Entries durable before this page is read go first (see the module doc).
        let Some(n) = send_entries(engine, out, next, engine.status().durable_lsn).await? else {
            return Ok(());
        };
        next = n;
        let (page, more) = engine.snapshot_page(cursor.as_deref(), PAGE_BYTES)?;
        if !page.is_empty() {
            let records = page
                .iter()
                .map(|(k, r)| (k.clone(), wire::record_to_wire(r)))
                .collect();
            if !out
                .send(protocol::encode_frame(&Message::SnapshotChunk { records }))
                .await
            {
                return Ok(());
            }
        }
        match more {
            Some(k) => cursor = Some(k),
            None => break,
        }
    }
    // Pages may hold records applied but not yet durable: wait for them to be, so the
    // backup never holds what the node could still lose.
    let end = engine.status().last_lsn;
    let mut durable = engine.subscribe_durable();
    match tokio::time::timeout(DURABLE_WAIT, durable.wait_for(|d| *d >= end)).await {
        Ok(Ok(_)) => {}
        _ => return Err(BackupError::NotDurable(DURABLE_WAIT)),
    }
    if send_entries(engine, out, next, end).await?.is_none() {
        return Ok(());
    }
    let end_frame = protocol::encode_frame(&Message::SnapshotEnd { end_lsn: end });
    if !out.send(end_frame).await {
        return Ok(());
    }
    let digest = std::mem::replace(
        &mut out.hash,
        ring::digest::Context::new(&ring::digest::SHA256),
    )
    .finish();
    let trailer = Ok(Bytes::copy_from_slice(digest.as_ref()));
    let _ = tokio::time::timeout(CLIENT_STALL, out.tx.send(trailer)).await;
    tracing::info!(tag, end_lsn = end, "backup sent");
    Ok(())
}

/// Sends log entries `next..=upto`; returns the next LSN to send, or `None` when the
/// receiver went away.
async fn send_entries(
    engine: &Engine,
    out: &mut Sink,
    mut next: u64,
    upto: u64,
) -> Result<Option<u64>, BackupError> {
    while next <= upto {
        let entries = engine.read_log(next, LOG_BATCH)?;
        if entries.first().map(|e| e.lsn) != Some(next) {
            return Err(BackupError::LogTruncated(next));
        }
        let mut frame = Vec::new();
        let mut bytes = 0;
        for e in entries.into_iter().take_while(|e| e.lsn <= upto) {
            next = e.lsn + 1;
            let enc = e.encode();
            bytes += enc.len();
            frame.push(enc);
            if bytes >= PAGE_BYTES {
                break;
            }
        }
        let msg = Message::Entries {
            primary_lsn: upto,
            entries: frame,
        };
        if !out.send(protocol::encode_frame(&msg)).await {
            return Ok(None);
        }
    }
    Ok(Some(next))
}

/// What a restore built.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restored {
    /// The data directory now holding the data.
    pub data_dir: PathBuf,
    /// The LSN the data is at (the backup's end).
    pub lsn: u64,
    /// The epoch the data ends in.
    pub epoch: u64,
    /// Records restored.
    pub records: u64,
    /// SHA-256 over every record, as `Engine::content_hash`: equal on two nodes at the same
    /// LSN exactly when they hold the same data.
    pub content_hash: String,
}

/// Restores the backup read from `input` into `data_dir`, which must not exist or be
/// empty. Builds in a sibling temporary directory and renames it into place only once
/// the whole file checked out, so a failed restore leaves nothing behind.
pub async fn restore(
    mut input: impl Read + Send + 'static,
    data_dir: &Path,
    log_retention: u64,
) -> Result<Restored, BackupError> {
    if data_dir.exists()
        && std::fs::read_dir(data_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(BackupError::TargetNotEmpty(data_dir.to_path_buf()));
    }
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let tmp = data_dir.with_file_name(format!(".{name}.restoring-{}", std::process::id()));
    let io = |what: String| move |source| BackupError::Io { what, source };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(format!("removing {}", tmp.display())))?;
    }
    let engine = Engine::open(EngineConfig {
        path: tmp.clone(),
        log_retention,
        max_group: 1024,
        cache_bytes: 64 << 20,
    })?;
    // Reading the file is blocking I/O: a thread feeds chunks through a channel.
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    std::thread::spawn(move || loop {
        let mut buf = vec![0u8; 1 << 20];
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx.blocking_send(Ok(buf)).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                break;
            }
        }
    });
    let result = apply(&engine, &mut rx).await;
    let closed = {
        let e = engine.clone();
        tokio::task::spawn_blocking(move || e.shutdown())
            .await
            .map_err(|e| invalid(format!("engine shutdown: {e}")))
    };
    let outcome = match (result, closed) {
        (Ok(r), Ok(Ok(()))) => Ok(r),
        (Err(e), _) => Err(e),
        (_, Ok(Err(e))) => Err(e.into()),
        (_, Err(e)) => Err(e),
    };
    let (lsn, epoch, records, content_hash) = match outcome {
        Ok(v) => v,
        Err(e) => {
            drop(engine);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    drop(engine);
    if data_dir.exists() {
        std::fs::remove_dir(data_dir).map_err(io(format!("replacing {}", data_dir.display())))?;
    }
    std::fs::rename(&tmp, data_dir).map_err(io(format!(
        "moving {} to {}",
        tmp.display(),
        data_dir.display()
    )))?;
    Ok(Restored {
        data_dir: data_dir.to_path_buf(),
        lsn,
        epoch,
        records,
        content_hash,
    })
}

/// Decodes the stream and applies it: returns (lsn, epoch, records, content hash).
async fn apply(
    engine: &Engine,
    rx: &mut mpsc::Receiver<std::io::Result<Vec<u8>>>,
) -> Result<(u64, u64, u64, String), BackupError> {
    let mut buf = BytesMut::new();
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut magic_seen = false;
    let mut tag: Option<u64> = None;
    let mut end: Option<u64> = None;
    let mut eof = false;
    loop {
        // Frames, until the buffer holds no whole one.
        loop {
            if !magic_seen {
                if buf.len() < MAGIC.len() {
                    break;
                }
                if &buf[..MAGIC.len()] != MAGIC {
                    return Err(invalid("it does not start with the Strata backup header"));
                }
                hash.update(&buf[..MAGIC.len()]);
                let _ = buf.split_to(MAGIC.len());
                magic_seen = true;
                continue;
            }
            if end.is_some() {
                break; // only the trailer is left
            }
            // Hash the frame's bytes before the decoder consumes them (it takes exactly
            // the length prefix plus the length it names, or nothing).
            if buf.len() >= 4 {
                let n = 4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if buf.len() >= n {
                    hash.update(&buf[..n]);
                }
            }
            let Some(msg) = protocol::decode_frame(&mut buf, MAX_FRAME_CEILING)
                .map_err(|e| invalid(format!("frame: {e}")))?
            else {
                break;
            };
            match msg {
                Message::SnapshotBegin { history, tag_lsn } if tag.is_none() => {
                    let history = History::from_pairs(&history)
                        .map_err(|e| invalid(format!("epoch history: {e}")))?;
                    engine.snapshot_begin(history, tag_lsn).await?;
                    tag = Some(tag_lsn);
                }
                Message::SnapshotChunk { records } if tag.is_some() => {
                    let mut page = Vec::with_capacity(records.len());
                    for (key, r) in records {
                        Key::parse(&key).map_err(|e| invalid(format!("key {key:?}: {e}")))?;
                        page.push((key, wire::record_from_wire(r)));
                    }
                    engine.snapshot_chunk(page).await?;
                }
                Message::Entries { entries, .. } if tag.is_some() => {
                    let batch = entries
                        .iter()
                        .map(|b| LogEntry::decode(b))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| invalid(format!("log entry: {e}")))?;
                    if !batch.is_empty() {
                        engine.apply_replicated(batch).await?;
                    }
                }
                Message::SnapshotEnd { end_lsn } if tag.is_some_and(|t| end_lsn >= t) => {
                    end = Some(end_lsn);
                }
                other => return Err(invalid(format!("unexpected {} here", frame_name(&other)))),
            }
        }
        if eof {
            break;
        }
        match rx.recv().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => {
                return Err(BackupError::Io {
                    what: "reading the backup".into(),
                    source: e,
                })
            }
            None => eof = true,
        }
    }
    let Some(end) = end else {
        return Err(invalid(if magic_seen {
            "it ends before the snapshot does (truncated)"
        } else {
            "it does not start with the Strata backup header"
        }));
    };
    let digest = hash.finish();
    if buf.len() != digest.as_ref().len() || buf[..] != *digest.as_ref() {
        return Err(invalid(
            "its checksum does not match (truncated or altered)",
        ));
    }
    let applied = engine.snapshot_end().await?;
    if applied != end {
        return Err(invalid(format!(
            "it ends at LSN {end} but its entries reach {applied}"
        )));
    }
    let (records, content_hash) = engine.content_hash()?;
    Ok((applied, engine.epoch(), records, content_hash))
}

fn frame_name(m: &Message) -> &'static str {
    match m {
        Message::SnapshotBegin { .. } => "snapshot begin",
        Message::SnapshotChunk { .. } => "record page",
        Message::Entries { .. } => "log entries",
        Message::SnapshotEnd { .. } => "snapshot end",
        _ => "protocol message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(frames: &[Message], trailer: bool) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for f in frames {
            out.extend(protocol::encode_frame(f));
        }
        if trailer {
            let d = ring::digest::digest(&ring::digest::SHA256, &out);
            out.extend_from_slice(d.as_ref());
        }
        out
    }

    async fn restore_bytes(bytes: Vec<u8>) -> (Result<Restored, BackupError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("data");
        let r = restore(std::io::Cursor::new(bytes), &target, 1000).await;
        (r, dir)
    }

    #[tokio::test]
    async fn an_empty_snapshot_restores_to_lsn_zero() {
        let frames = [
            Message::SnapshotBegin {
                history: History::initial().to_pairs(),
                tag_lsn: 0,
            },
            Message::SnapshotEnd { end_lsn: 0 },
        ];
        let (r, dir) = restore_bytes(file(&frames, true)).await;
        let r = r.expect("restores");
        assert_eq!((r.lsn, r.records), (0, 0));
        assert!(dir.path().join("data").is_dir());
    }

    #[tokio::test]
    async fn frames_out_of_order_or_missing_are_refused_and_leave_nothing() {
        let begin = Message::SnapshotBegin {
            history: History::initial().to_pairs(),
            tag_lsn: 0,
        };
        let cases: [(Vec<Message>, bool, &str); 5] = [
            // Entries before the snapshot began.
            (
                vec![Message::Entries {
                    primary_lsn: 0,
                    entries: vec![],
                }],
                true,
                "unexpected log entries",
            ),
            // Two beginnings.
            (
                vec![begin.clone(), begin.clone()],
                true,
                "unexpected snapshot begin",
            ),
            // No end (the trailer then reads as a bogus frame).
            (vec![begin.clone()], true, "not a valid backup"),
            // Cut off after the beginning.
            (vec![begin.clone()], false, "truncated"),
            // No trailer.
            (
                vec![begin, Message::SnapshotEnd { end_lsn: 0 }],
                false,
                "checksum",
            ),
        ];
        for (frames, trailer, why) in cases {
            let (r, dir) = restore_bytes(file(&frames, trailer)).await;
            let err = r.expect_err("refused").to_string();
            assert!(err.contains(why), "{err} (wanted {why})");
            let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read dir").collect();
            assert!(left.is_empty(), "a refused restore left {left:?}");
        }
    }

    #[tokio::test]
    async fn a_non_empty_target_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("keep"), b"precious").expect("write");
        let r = restore(std::io::Cursor::new(Vec::new()), dir.path(), 1000).await;
        assert!(matches!(r, Err(BackupError::TargetNotEmpty(_))));
        assert_eq!(
            std::fs::read(dir.path().join("keep")).expect("still there"),
            b"precious"
        );
    }
}
