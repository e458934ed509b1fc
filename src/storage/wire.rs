//! Conversions between the storage vocabulary ([`Key`], [`Record`], [`Write`], ...) and its
//! wire form in [`protocol`](super::protocol). Pure, like the protocol: the server and the
//! client both translate here, so the two directions cannot drift apart.
//!
//! Everything coming from the wire is parsed into checked types (a key string becomes a
//! [`Key`]) or refused; nothing from a peer is trusted.

use bytes::Bytes;

use super::protocol::{
    ErrorKind, WireError, WirePrecondition, WireRecord, WireWrite, WireWriteResult,
};
use super::store::StoreError;
use super::{Committed, Key, ListPage, Precondition, Record, Write, WriteOp, WriteResult};

/// A record for the wire.
pub fn record_to_wire(r: &Record) -> WireRecord {
    WireRecord {
        body: r.body.to_vec(),
        lsn: r.lsn,
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
    }
}

/// A record from the wire.
pub fn record_from_wire(r: WireRecord) -> Record {
    Record {
        body: Bytes::from(r.body),
        lsn: r.lsn,
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
    }
}

/// A write for the wire.
pub fn write_to_wire(w: &Write) -> WireWrite {
    WireWrite {
        key: w.key.joined(),
        body: match &w.op {
            WriteOp::Put(b) => Some(b.to_vec()),
            WriteOp::Delete => None,
        },
        precondition: match w.precondition {
            Precondition::None => WirePrecondition::None,
            Precondition::Exists => WirePrecondition::Exists,
            Precondition::Absent => WirePrecondition::Absent,
            Precondition::Version(v) => WirePrecondition::Version(v),
        },
    }
}

/// A write from the wire; the key is validated like one from an HTTP request.
pub fn write_from_wire(w: WireWrite) -> Result<Write, String> {
    let key = Key::parse(&w.key).map_err(|e| format!("key {:?}: {e}", w.key))?;
    Ok(Write {
        key,
        op: match w.body {
            Some(b) => WriteOp::Put(Bytes::from(b)),
            None => WriteOp::Delete,
        },
        precondition: match w.precondition {
            WirePrecondition::None => Precondition::None,
            WirePrecondition::Exists => Precondition::Exists,
            WirePrecondition::Absent => Precondition::Absent,
            WirePrecondition::Version(v) => Precondition::Version(v),
        },
    })
}

/// A committed batch's per-write results for the wire.
pub fn results_to_wire(c: &Committed) -> Vec<WireWriteResult> {
    c.results
        .iter()
        .map(|r| WireWriteResult {
            record: r.record.as_ref().map(record_to_wire),
            created: r.created,
        })
        .collect()
}

/// A committed batch from the wire.
pub fn committed_from_wire(lsn: u64, epoch: u64, results: Vec<WireWriteResult>) -> Committed {
    Committed {
        lsn,
        epoch,
        results: results
            .into_iter()
            .map(|r| WriteResult {
                record: r.record.map(record_from_wire),
                created: r.created,
            })
            .collect(),
    }
}

/// A listing page from the wire.
pub fn page_from_wire(items: Vec<(String, WireRecord)>, next: Option<String>) -> ListPage {
    ListPage {
        items: items
            .into_iter()
            .map(|(id, r)| (id, record_from_wire(r)))
            .collect(),
        next,
    }
}

/// A failure for the wire, keeping what the client needs to answer precisely.
pub fn error_to_wire(e: &StoreError) -> WireError {
    let plain = |kind| WireError {
        kind,
        message: e.to_string(),
        index: None,
        key: None,
        current: None,
    };
    match e {
        StoreError::PreconditionFailed {
            index,
            key,
            current,
        } => WireError {
            kind: ErrorKind::PreconditionFailed,
            message: e.to_string(),
            index: u32::try_from(*index).ok(),
            key: Some(key.to_string()),
            current: *current,
        },
        StoreError::InvalidBatch(m) => WireError {
            message: m.clone(),
            ..plain(ErrorKind::InvalidBatch)
        },
        StoreError::Unavailable(m) | StoreError::OutcomeUnknown(m) => WireError {
            message: m.clone(),
            ..plain(ErrorKind::Unavailable)
        },
        StoreError::ReadOnly(m) => WireError {
            message: m.clone(),
            ..plain(ErrorKind::ReadOnly)
        },
        StoreError::Internal(m) => WireError {
            message: m.clone(),
            ..plain(ErrorKind::Internal)
        },
        StoreError::Behind(m) => WireError {
            message: m.clone(),
            ..plain(ErrorKind::Behind)
        },
    }
}

/// A failure from the wire.
pub fn error_from_wire(e: WireError) -> StoreError {
    match e.kind {
        ErrorKind::PreconditionFailed => {
            match e.key.as_deref().map(Key::parse) {
                Some(Ok(key)) => StoreError::PreconditionFailed {
                    index: e.index.map_or(0, |i| i as usize),
                    key,
                    current: e.current,
                },
                // A server that names no valid key is not one we understand.
                _ => StoreError::Internal(format!("malformed precondition failure: {}", e.message)),
            }
        }
        ErrorKind::InvalidBatch | ErrorKind::InvalidKey => StoreError::InvalidBatch(e.message),
        ErrorKind::ReadOnly => StoreError::ReadOnly(e.message),
        ErrorKind::Unavailable => StoreError::Unavailable(e.message),
        ErrorKind::Behind => StoreError::Behind(e.message),
        ErrorKind::Internal | ErrorKind::StaleEpoch => StoreError::Internal(e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_errors_round_trip() {
        let w = Write {
            key: Key::new("c", "i").unwrap(),
            op: WriteOp::Put(Bytes::from_static(b"{}")),
            precondition: Precondition::Version(4),
        };
        assert_eq!(write_from_wire(write_to_wire(&w)).unwrap(), w);
        let bad = WireWrite {
            key: "../etc".into(),
            body: None,
            precondition: WirePrecondition::None,
        };
        assert!(write_from_wire(bad).is_err());

        let e = StoreError::PreconditionFailed {
            index: 2,
            key: Key::new("c", "i").unwrap(),
            current: Some(9),
        };
        match error_from_wire(error_to_wire(&e)) {
            StoreError::PreconditionFailed {
                index: 2,
                key,
                current: Some(9),
            } => assert_eq!(key.to_string(), "c/i"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            error_from_wire(error_to_wire(&StoreError::InvalidBatch("x".into()))),
            StoreError::InvalidBatch(m) if m == "x"
        ));
    }
}
