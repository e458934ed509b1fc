//! The embedded storage engine: records, the replication log and group commit on sled.
//!
//! STUB: the interface is fixed; the implementation is being written (see the engine task).

use std::path::PathBuf;
use std::sync::Arc;

use super::{Committed, Key, ListPage, ListQuery, Record, Write};

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
}

/// A snapshot of the engine's state for status pages and metrics.
#[derive(Clone, Debug, Default)]
pub struct EngineStatus {
    /// LSN of the newest applied entry.
    pub last_lsn: u64,
    /// LSN of the newest entry known durable.
    pub durable_lsn: u64,
    /// Oldest LSN still in the log.
    pub first_log_lsn: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Number of records.
    pub records: u64,
    /// Bytes on disk.
    pub disk_bytes: u64,
}

/// The engine handle.
pub struct Engine {}

impl Engine {
    /// Opens (or creates) the database and starts the group-commit writer.
    pub fn open(_config: EngineConfig) -> Result<Arc<Engine>, EngineError> {
        Err(EngineError::Io("engine not implemented yet".into()))
    }

    /// Applies a batch atomically, durably; resolves once flushed and fsynced.
    pub async fn write(&self, _writes: Vec<Write>) -> Result<Committed, EngineError> {
        Err(EngineError::Closed)
    }

    /// Reads one record.
    pub fn get(&self, _key: &Key) -> Result<Option<Record>, EngineError> {
        Ok(None)
    }

    /// Lists a collection in id order.
    pub fn list(&self, _collection: &str, _query: &ListQuery) -> Result<ListPage, EngineError> {
        Ok(ListPage {
            items: vec![],
            next: None,
        })
    }

    /// Current status.
    pub fn status(&self) -> EngineStatus {
        EngineStatus::default()
    }

    /// Stops the writer after draining queued writes and makes everything durable.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

impl Engine {
    /// Registers the engine's metrics (stub).
    pub fn register_metrics(self: &Arc<Self>, _metrics: &crate::metrics::Metrics) {}
}
