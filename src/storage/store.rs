//! [`Store`]: the one handle the data API uses to reach storage, whichever kind it is, and
//! [`StoreError`]: what can go wrong, in terms an HTTP handler can act on.

use std::sync::Arc;

use super::client::{ReadConsistency, RemoteStore};
use super::{Committed, Engine, EngineError, Key, ListPage, ListQuery, Record, Write};

/// Storage as the app sees it. An enum rather than a trait object: the set of backends is
/// closed (embedded, remote) and static dispatch keeps the hot path direct.
#[derive(Clone)]
pub enum Store {
    /// The sled engine in this process.
    Embedded(Arc<Engine>),
    /// A storage server reached over the network.
    Remote(Arc<RemoteStore>),
}

/// Why a storage operation failed. The same for every backend, so a handler answers the
/// same way whether storage is in this process or on another machine.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
    /// The batch itself is invalid (empty, the same key twice, too large to send).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// Storage cannot be reached or is shutting down; nothing was applied and the request
    /// may be retried (HTTP 503 with `Retry-After`).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A write was sent but no answer came back: it may or may not have been applied
    /// (HTTP 504). Never retried automatically, since a retry could apply it twice.
    #[error("outcome of the write unknown: {0}")]
    OutcomeUnknown(String),
    /// The storage node takes no writes (a replica); the message names the primary.
    #[error("storage is read-only: {0}")]
    ReadOnly(String),
    /// Storage failed in a way the client cannot fix (I/O, corruption, a protocol bug).
    #[error("storage failure: {0}")]
    Internal(String),
    /// A replica had not reached a read's consistency token in time; the client reads
    /// from the primary instead (never shown to HTTP clients).
    #[error("replica behind the consistency token: {0}")]
    Behind(String),
}

impl From<EngineError> for StoreError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::PreconditionFailed {
                index,
                key,
                current,
            } => StoreError::PreconditionFailed {
                index,
                key,
                current,
            },
            EngineError::InvalidBatch(m) => StoreError::InvalidBatch(m),
            EngineError::Closed => StoreError::Unavailable("storage is shutting down".into()),
            other => StoreError::Internal(other.to_string()),
        }
    }
}

impl Store {
    /// Reads one record.
    pub async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        match self {
            Store::Embedded(e) => Ok(e.get(key)?),
            Store::Remote(r) => r.get(key).await,
        }
    }

    /// Reads one record for a GET: replicas may serve it, as `consistency` allows.
    /// (`get` always reads the primary: read-modify-write paths need the newest state.)
    pub async fn read(
        &self,
        key: &Key,
        consistency: ReadConsistency,
    ) -> Result<Option<Record>, StoreError> {
        match self {
            Store::Embedded(e) => Ok(e.get(key)?),
            Store::Remote(r) => r.read(key, consistency).await,
        }
    }

    /// Reads one record as [`Store::read`] does, with the LSN it was read at: the value
    /// reflects every write up to that LSN. What cache fills carry through the LSN gate.
    pub async fn read_at(
        &self,
        key: &Key,
        consistency: ReadConsistency,
    ) -> Result<(Option<Record>, u64), StoreError> {
        match self {
            Store::Embedded(e) => {
                let lsn = e.applied_lsn();
                Ok((e.get(key)?, lsn))
            }
            Store::Remote(r) => r.read_at(key, consistency).await,
        }
    }

    /// Lists a collection, from a replica when `consistency` allows.
    pub async fn list_with(
        &self,
        collection: &str,
        query: &ListQuery,
        consistency: ReadConsistency,
    ) -> Result<ListPage, StoreError> {
        match self {
            Store::Embedded(e) => Ok(e.list(collection, query)?),
            Store::Remote(r) => r.list_with(collection, query, consistency).await,
        }
    }

    /// Lists a collection in id order.
    pub async fn list(&self, collection: &str, query: &ListQuery) -> Result<ListPage, StoreError> {
        match self {
            Store::Embedded(e) => Ok(e.list(collection, query)?),
            Store::Remote(r) => r.list(collection, query).await,
        }
    }

    /// Applies a batch atomically and durably.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Committed, StoreError> {
        match self {
            Store::Embedded(e) => Ok(e.write(writes).await?),
            Store::Remote(r) => r.write(writes).await,
        }
    }

    /// Whether storage can serve now, and if not why.
    pub fn ready(&self) -> Result<(), String> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Remote(r) => r.ready(),
        }
    }

    /// Status for `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        match self {
            Store::Embedded(e) => {
                let s = e.status();
                serde_json::json!({
                    "kind": "embedded",
                    "last_lsn": s.last_lsn,
                    "durable_lsn": s.durable_lsn,
                    "first_log_lsn": s.first_log_lsn,
                    "epoch": s.epoch,
                    "records": s.records,
                    "disk_bytes": s.disk_bytes,
                })
            }
            Store::Remote(r) => r.status(),
        }
    }
}
