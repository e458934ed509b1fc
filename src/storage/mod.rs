//! Storage: the types every storage backend speaks, and the backends themselves.
//!
//! The data API talks to storage only through [`Store`], so the same handlers serve the
//! embedded engine (stage 1) and a remote storage server (stage 2). The types here are the
//! vocabulary of both: a key, a stored record, a batch of writes with preconditions, and
//! what a committed batch reports back.
//!
//! | module | owns |
//! |---|---|
//! | [`engine`] | sled: records, the log, group commit (every sled call lives there) |
//! | [`log_chunk`] | how log entries are packed into sled values; pure |
//! | [`protocol`] | frames and messages of the storage protocol; pure, fuzzable |
//! | [`wire`] | conversions between this vocabulary and the protocol's messages; pure |
//! | [`conn`] | the protocol's I/O edge: frame reading with deadlines, the handshake |
//! | [`feed`] | the change feed apps follow to keep their caches coherent (keys and LSNs only) |
//! | [`replication`] | log shipping: the sender on a primary, the follower on a replica, the pure state machine |
//! | [`server`] | the storage role: serves the engine to apps over TCP/TLS |
//! | [`client`] | the app's pool of connections to a storage server |
//! | [`store`] | [`Store`], the one handle the data API uses, and [`StoreError`] |

pub mod backup;
pub mod client;
pub mod conn;
pub mod engine;
pub mod feed;
pub mod inbox;
pub mod journal;
pub mod log_chunk;
pub mod protocol;
pub mod recent;
pub mod relay;
pub mod replication;
pub mod server;
pub mod store;
pub mod wire;

use bytes::Bytes;

pub use client::ReadConsistency;
pub use engine::{Engine, EngineConfig, EngineError, EngineStatus};
pub use store::{Store, StoreError};

/// Longest collection name, in bytes. Keeps keys short and listing cheap.
pub const MAX_COLLECTION_LEN: usize = 64;
/// Longest record id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A record's address: `collection/id`. Both parts are validated on construction, so a
/// `Key` in hand is always safe to store and to print in a URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    collection: String,
    id: String,
}

/// Why a collection name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Empty or longer than the limit.
    #[error("{what} must be 1 to {max} bytes long")]
    Length {
        /// "collection" or "id".
        what: &'static str,
        /// The limit that applies.
        max: usize,
    },
    /// A character outside `[A-Za-z0-9._~-]`, or a leading dot.
    #[error(
        "{what} may contain only letters, digits, '-', '_', '.', '~' and may not start with '.'"
    )]
    Charset {
        /// "collection" or "id".
        what: &'static str,
    },
}

fn check_part(what: &'static str, s: &str, max: usize) -> Result<(), KeyError> {
    if s.is_empty() || s.len() > max {
        return Err(KeyError::Length { what, max });
    }
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
    if s.starts_with('.') || !s.bytes().all(ok_char) {
        return Err(KeyError::Charset { what });
    }
    Ok(())
}

impl Key {
    /// Builds a key after checking both parts against the charset and length rules.
    pub fn new(collection: &str, id: &str) -> Result<Self, KeyError> {
        Self::check_collection(collection)?;
        check_part("id", id, MAX_ID_LEN)?;
        Ok(Key {
            collection: collection.to_owned(),
            id: id.to_owned(),
        })
    }

    /// Checks a collection name on its own (listing takes no id).
    pub fn check_collection(collection: &str) -> Result<(), KeyError> {
        check_part("collection", collection, MAX_COLLECTION_LEN)
    }

    /// `collection/id`, as [`Display`](std::fmt::Display) writes it and [`Key::parse`]
    /// reads it, without `fmt`: the storage client sends one per request.
    pub fn joined(&self) -> String {
        let mut s = String::with_capacity(self.collection.len() + 1 + self.id.len());
        s.push_str(&self.collection);
        s.push('/');
        s.push_str(&self.id);
        s
    }

    /// Parses the stored `collection/id` form.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        match s.split_once('/') {
            Some((c, i)) => Key::new(c, i),
            None => Err(KeyError::Length {
                what: "id",
                max: MAX_ID_LEN,
            }),
        }
    }

    /// The collection part.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// The id part.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.collection, self.id)
    }
}

/// A stored record as readers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The JSON body exactly as it was written.
    pub body: Bytes,
    /// The LSN of the write that produced this body. It doubles as the record's version:
    /// unique per key for all time and monotonic, so it is the ETag (`"<lsn>"`) and the
    /// value `If-Match` compares against.
    pub lsn: u64,
    /// When the record was first created (ms since the Unix epoch).
    pub created_ms: u64,
    /// When the record was last written (ms since the Unix epoch).
    pub updated_ms: u64,
}

impl Record {
    /// The strong ETag for this version, quoted as HTTP wants it.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.lsn)
    }
}

/// What must hold about a key's current state for a write to apply. The HTTP conditional
/// headers map onto this (`If-Match` → `Version`, `If-None-Match: *` → `Absent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precondition {
    /// No condition.
    #[default]
    None,
    /// The record must exist (DELETE, PATCH without If-Match).
    Exists,
    /// The record must not exist (create-only).
    Absent,
    /// The record must exist at exactly this version (LSN).
    Version(u64),
}

/// One change within a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Create or replace the record with this JSON body.
    Put(Bytes),
    /// Remove the record.
    Delete,
}

/// A single write: key, change, and the condition it is applied under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// Which record.
    pub key: Key,
    /// What to do to it.
    pub op: WriteOp,
    /// What must hold first.
    pub precondition: Precondition,
}

/// What happened to one write of a committed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResult {
    /// The record as stored after the write, `None` after a delete.
    pub record: Option<Record>,
    /// True when the key did not exist before (a PUT that created).
    pub created: bool,
}

/// A batch that is durable (acknowledged only after its group is durable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The LSN of the log entry that holds the whole batch.
    pub lsn: u64,
    /// The epoch the batch was written in.
    pub epoch: u64,
    /// One result per write, in the batch's order.
    pub results: Vec<WriteResult>,
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListPage {
    /// `(id, record)` in id order.
    pub items: Vec<(String, Record)>,
    /// Pass as `after` to get the next page; `None` at the end.
    pub next: Option<String>,
}

/// Which records a listing returns.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ListQuery {
    /// Only ids starting with this.
    pub prefix: String,
    /// Only ids strictly greater than this (the cursor).
    pub after: Option<String>,
    /// At most this many items.
    pub limit: usize,
}

#[cfg(test)]
mod key_tests {
    use super::Key;

    #[test]
    fn joined_is_display_and_parses_back() {
        let k = Key::new("users", "alice.b-c~1").unwrap();
        assert_eq!(k.joined(), k.to_string());
        assert_eq!(Key::parse(&k.joined()).unwrap(), k);
    }
}
