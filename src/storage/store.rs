//! [`Store`]: the one handle the data API uses to reach storage, whichever kind it is.

use std::sync::Arc;

use super::{Committed, Engine, EngineError, Key, ListPage, ListQuery, Record, Write};

/// Storage as the app sees it. An enum rather than a trait object: the set of backends is
/// closed (embedded now, remote with stage 2) and static dispatch keeps the hot path direct.
#[derive(Clone)]
pub enum Store {
    /// The sled engine in this process.
    Embedded(Arc<Engine>),
}

impl Store {
    /// Reads one record.
    pub async fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        match self {
            Store::Embedded(e) => e.get(key),
        }
    }

    /// Lists a collection in id order.
    pub async fn list(&self, collection: &str, query: &ListQuery) -> Result<ListPage, EngineError> {
        match self {
            Store::Embedded(e) => e.list(collection, query),
        }
    }

    /// Applies a batch atomically and durably.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Committed, EngineError> {
        match self {
            Store::Embedded(e) => e.write(writes).await,
        }
    }

    /// Whether storage can serve now, and if not why.
    pub fn ready(&self) -> Result<(), String> {
        Ok(())
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
        }
    }
}
