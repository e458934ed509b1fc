//! The storage wire protocol: length-prefixed frames carrying bincode 2 messages.
//!
//! Pure: no I/O here, so every part can be unit-tested, property-tested and fuzzed. The
//! connection code reads bytes into a buffer and asks [`decode_frame`] for whole messages;
//! it writes what [`encode_frame`] returns.
//!
//! ```text
//! frame    = length:u32be payload[length]        (length ≤ the configured maximum)
//! payload  = bincode(Message)
//! ```
//!
//! A connection opens with a handshake that proves both sides know the cluster secret
//! without sending it (HMAC-SHA256 challenge–response in both directions):
//!
//! ```text
//! client → Hello { magic, version, client_nonce, purpose }
//! server → Challenge { version, server_nonce, server_proof = H(secret, "server" ‖ cn ‖ sn) }
//! client → Auth { client_proof = H(secret, "client" ‖ sn ‖ cn) }
//! server → Welcome { node, epoch, role }   or   Refused { reason }
//! ```
//!
//! After that, the client sends `Request { id, .. }` frames without waiting for answers
//! (pipelining) and the server answers `Response { id, .. }` in any order.

use bincode::{Decode, Encode};
use ring::hmac;

/// First bytes of every Hello: anything else is not a Strata peer.
pub const MAGIC: [u8; 8] = *b"STRATA\x00\x01";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Hard ceiling on a frame's payload, whatever the config says.
pub const MAX_FRAME_CEILING: usize = 64 << 20;
/// Length of each side's random challenge.
pub const NONCE_LEN: usize = 32;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_CEILING>()
}

/// Everything that can go wrong reading a peer's bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message arrived that the protocol state does not allow.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// The peer is not a Strata node or speaks another version.
    #[error("peer speaks {0}")]
    Version(String),
    /// The peer could not prove knowledge of the cluster secret.
    #[error("authentication failed: {0}")]
    Auth(&'static str),
}

/// Why a connection is being opened; the server may refuse purposes it does not serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Purpose {
    /// An app making requests.
    Client,
    /// A replica that will subscribe to the log.
    Replica,
    /// An app following the change feed (keys and LSNs only) to keep its cache coherent.
    Feed,
}

/// A stored record on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WireRecord {
    /// The JSON body.
    pub body: Vec<u8>,
    /// Version = LSN of the write that produced it.
    pub lsn: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Last write time, ms since the Unix epoch.
    pub updated_ms: u64,
}

/// A write precondition on the wire (mirrors `storage::Precondition`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum WirePrecondition {
    /// None.
    None,
    /// Must exist.
    Exists,
    /// Must not exist.
    Absent,
    /// Must be at this version.
    Version(u64),
}

/// One write on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WireWrite {
    /// `collection/id`.
    pub key: String,
    /// New body, or `None` to delete.
    pub body: Option<Vec<u8>>,
    /// Condition.
    pub precondition: WirePrecondition,
}

/// One write's result on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WireWriteResult {
    /// The record after the write (`None` after a delete).
    pub record: Option<WireRecord>,
    /// Whether the write created the key.
    pub created: bool,
}

/// Storage status on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WireStatus {
    /// Node name.
    pub node: String,
    /// "primary" or "replica".
    pub role: String,
    /// Current epoch.
    pub epoch: u64,
    /// Newest applied LSN.
    pub last_lsn: u64,
    /// Newest durable LSN.
    pub durable_lsn: u64,
    /// Records stored.
    pub records: u64,
}

/// What kind of failure a request met, so the client maps it without parsing text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ErrorKind {
    /// A precondition did not hold.
    PreconditionFailed,
    /// The batch was invalid.
    InvalidBatch,
    /// A key did not validate.
    InvalidKey,
    /// This node does not take writes (a replica); the message names the primary.
    ReadOnly,
    /// The node is shutting down.
    Unavailable,
    /// Storage failed.
    Internal,
    /// The request carries an older epoch than the node's.
    StaleEpoch,
    /// A read asked for a consistency token this replica did not reach in time; the
    /// client goes to the primary instead.
    Behind,
}

/// A failed request.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WireError {
    /// The kind, for the client's mapping.
    pub kind: ErrorKind,
    /// For a human.
    pub message: String,
    /// Index of the offending write in a batch, when there is one.
    pub index: Option<u32>,
    /// The offending key, when there is one.
    pub key: Option<String>,
    /// Its current version, for precondition failures.
    pub current: Option<u64>,
}

/// Requests a client may make.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Request {
    /// Read one record.
    Get {
        /// `collection/id`.
        key: String,
    },
    /// List a collection.
    List {
        /// The collection.
        collection: String,
        /// Id prefix.
        prefix: String,
        /// Cursor: ids strictly after this.
        after: Option<String>,
        /// Most items.
        limit: u32,
    },
    /// Apply a batch atomically and durably.
    Write {
        /// The writes.
        writes: Vec<WireWrite>,
    },
    /// The node's status.
    Status,
    /// A read (`Get` or `List`) to be answered only once this node has applied
    /// `min_lsn` of epoch `min_epoch` or later; waits up to `wait_ms`, then answers
    /// [`ErrorKind::Behind`]. Read-your-writes on replicas.
    AtLeast {
        /// Epoch of the token.
        min_epoch: u64,
        /// LSN of the token.
        min_lsn: u64,
        /// Longest wait, milliseconds (the server caps it).
        wait_ms: u32,
        /// The read itself.
        read: Box<Request>,
    },
    /// Replication state: role, applied LSN, lag; what read routing decides on.
    ReplStatus,
    /// A hash of every record, for comparing nodes (tests, operators).
    ContentHash,
    /// Read one record and say at which applied LSN it was read, so a cache can tell a
    /// fill from before an invalidation (answered with [`Response::RecordAt`]).
    GetAt {
        /// `collection/id`.
        key: String,
    },
}

/// Answers to requests.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    /// Answer to Get.
    Record(Option<WireRecord>),
    /// Answer to List.
    Page {
        /// `(id, record)` in id order.
        items: Vec<(String, WireRecord)>,
        /// Cursor for the next page.
        next: Option<String>,
    },
    /// Answer to Write.
    Committed {
        /// LSN of the batch.
        lsn: u64,
        /// Epoch of the batch.
        epoch: u64,
        /// Per-write results.
        results: Vec<WireWriteResult>,
    },
    /// Answer to Status.
    Status(WireStatus),
    /// The request failed.
    Error(WireError),
    /// Answer to ReplStatus.
    ReplStatus(WireReplStatus),
    /// Answer to ContentHash.
    ContentHash {
        /// Applied LSN when the hash was taken (records may be newer if writes race).
        lsn: u64,
        /// Number of records.
        records: u64,
        /// Hex SHA-256 over keys and stored records in key order.
        hash: String,
    },
    /// Answer to GetAt.
    RecordAt {
        /// The record, `None` if absent.
        record: Option<WireRecord>,
        /// The node's applied LSN just before the read: the value reflects every write up
        /// to here (and maybe later ones).
        read_lsn: u64,
    },
}

/// A node's replication state on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WireReplStatus {
    /// "primary", "replica" or "fenced".
    pub role: String,
    /// Current epoch.
    pub epoch: u64,
    /// Newest applied (durable) LSN.
    pub applied_lsn: u64,
    /// Newest LSN the primary reported (a primary: its own).
    pub primary_lsn: u64,
    /// How far behind, in milliseconds: time since it last held everything it knew the
    /// primary had (0 when caught up; grows while disconnected).
    pub lag_ms: u64,
    /// Whether it can serve reads as of `applied_lsn` (no snapshot install under way).
    pub ready: bool,
    /// The primary it follows (a replica) — where writes belong.
    pub primary: Option<String>,
}

/// Every message either side may send. New variants go at the end so older peers fail
/// cleanly on what they do not know (the replication stream extends this).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Message {
    /// Client's opening.
    Hello {
        /// Must equal [`MAGIC`].
        magic: [u8; 8],
        /// Highest version the client speaks.
        version: u16,
        /// Client's random challenge.
        client_nonce: [u8; NONCE_LEN],
        /// What the connection is for.
        purpose: Purpose,
    },
    /// Server's challenge and its own proof.
    Challenge {
        /// Version the server will speak.
        version: u16,
        /// Server's random challenge.
        server_nonce: [u8; NONCE_LEN],
        /// `H(secret, "server" ‖ client_nonce ‖ server_nonce)`.
        server_proof: Vec<u8>,
    },
    /// Client's proof.
    Auth {
        /// `H(secret, "client" ‖ server_nonce ‖ client_nonce)`.
        client_proof: Vec<u8>,
    },
    /// Handshake accepted.
    Welcome {
        /// Server's node name.
        node: String,
        /// Server's epoch.
        epoch: u64,
        /// "primary" or "replica".
        role: String,
    },
    /// Handshake refused; the server closes after this.
    Refused {
        /// Why.
        reason: String,
    },
    /// A request, tagged for out-of-order answers.
    Request {
        /// Chosen by the client; echoed in the response.
        id: u64,
        /// The request.
        body: Request,
    },
    /// A response to the request with the same id.
    Response {
        /// The request's id.
        id: u64,
        /// The answer.
        body: Response,
    },
    /// Replica → primary, first message after Welcome on a `Purpose::Replica` link:
    /// where the replica stands, so the primary can resume, snapshot or refuse.
    Subscribe {
        /// The replica's node name, for the primary's status page.
        node: String,
        /// The replica's epoch history, `(epoch, after_lsn)` pairs.
        history: Vec<(u64, u64)>,
        /// Newest LSN it applied durably.
        applied_lsn: u64,
        /// True when its last snapshot install did not finish.
        needs_snapshot: bool,
    },
    /// Primary → replica: the log follows from `from_lsn`; adopt this history.
    StreamStart {
        /// The primary's epoch history.
        history: Vec<(u64, u64)>,
        /// First LSN that will be sent.
        from_lsn: u64,
    },
    /// Primary → replica: log entries, consecutive, each as `LogEntry::encode` (checksummed).
    Entries {
        /// The primary's newest durable LSN when sent (for lag).
        primary_lsn: u64,
        /// The encoded entries, oldest first.
        entries: Vec<Vec<u8>>,
    },
    /// Primary → replica: a snapshot follows; drop everything, adopt this history.
    SnapshotBegin {
        /// The primary's epoch history.
        history: Vec<(u64, u64)>,
        /// Durable LSN before the first record was read: the log resumes after it.
        tag_lsn: u64,
    },
    /// Primary → replica: a page of records (`collection/id`, record).
    SnapshotChunk {
        /// The records.
        records: Vec<(String, WireRecord)>,
    },
    /// Primary → replica: the snapshot is complete.
    SnapshotEnd {
        /// Durable LSN after the last record was read: the replica is consistent once it
        /// has applied up to here.
        end_lsn: u64,
    },
    /// Replica → primary: everything up to `applied_lsn` is durable here.
    Ack {
        /// Newest LSN applied durably.
        applied_lsn: u64,
    },
    /// Primary → replica when idle: still here, and at this LSN.
    Heartbeat {
        /// The primary's newest durable LSN.
        primary_lsn: u64,
    },
    /// App → storage, first message after Welcome on a `Purpose::Feed` link: send the keys
    /// changed after `after_lsn` of `epoch` (`epoch` 0: a fresh subscriber).
    FeedSubscribe {
        /// The newest LSN whose changes the app has applied.
        after_lsn: u64,
        /// The epoch those LSNs belong to.
        epoch: u64,
        /// How often to send a heartbeat when idle, milliseconds (the server clamps it).
        heartbeat_ms: u32,
    },
    /// Storage → app: changes follow from `after_lsn + 1`. `resumed` is false when the feed
    /// could not continue where the app asked (new subscriber, other epoch, log truncated):
    /// the app must then drop everything it cached from before `after_lsn`.
    FeedStart {
        /// The source's epoch.
        epoch: u64,
        /// Changes after this LSN follow.
        after_lsn: u64,
        /// Whether the feed continues exactly where the app asked.
        resumed: bool,
    },
    /// Storage → app: consecutive log entries as `(lsn, changed keys)`, oldest first.
    FeedChanges {
        /// The source's durable LSN when the batch was read: the app has caught up with
        /// the source once it has applied this far. Sent with no changes as the heartbeat.
        source_lsn: u64,
        /// How far the source itself is behind the primary, in milliseconds (0 on the
        /// primary; a replica's replication lag), so an app following a replica counts
        /// that lag against its `max_staleness` too.
        source_lag_ms: u64,
        /// `(lsn, ["collection/id", ...])` per log entry.
        changes: Vec<(u64, Vec<String>)>,
    },
}

/// Encodes a message as one frame (length prefix included).
pub fn encode_frame(msg: &Message) -> Vec<u8> {
    // Room for a typical request or answer (a small record and its key), so encoding
    // does not grow the vector five times on the way there.
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&[0; 4]);
    // Encoding into a Vec cannot fail for these types except on the size limit, which a
    // message we build ourselves never reaches; fall back to an empty payload if it did.
    if bincode::encode_into_std_write(msg, &mut out, bincode_config()).is_err() {
        out.truncate(4);
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Tries to take one whole frame from the front of `buf`. `Ok(None)` means "need more
/// bytes"; on `Ok(Some(_))` the frame's bytes have been removed from `buf`.
pub fn decode_frame(
    buf: &mut bytes::BytesMut,
    max_frame: usize,
) -> Result<Option<Message>, ProtocolError> {
    let max = max_frame.min(MAX_FRAME_CEILING);
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(ProtocolError::FrameTooLarge { len, max });
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    let frame = buf.split_to(4 + len);
    let (msg, used) = bincode::decode_from_slice::<Message, _>(&frame[4..], bincode_config())
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if used != len {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes after the message",
            len - used
        )));
    }
    Ok(Some(msg))
}

/// The handshake's proof: HMAC-SHA256 keyed by the cluster secret over a side label and
/// both nonces, so a proof is useless on another connection or for the other direction.
pub fn proof(
    secret: &[u8],
    side: &'static str,
    first: &[u8; NONCE_LEN],
    second: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(side.as_bytes());
    ctx.update(first);
    ctx.update(second);
    ctx.sign().as_ref().to_vec()
}

/// Checks a peer's proof in constant time.
pub fn verify_proof(
    secret: &[u8],
    side: &'static str,
    first: &[u8; NONCE_LEN],
    second: &[u8; NONCE_LEN],
    presented: &[u8],
) -> Result<(), ProtocolError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut msg = Vec::with_capacity(side.len() + 2 * NONCE_LEN);
    msg.extend_from_slice(side.as_bytes());
    msg.extend_from_slice(first);
    msg.extend_from_slice(second);
    hmac::verify(&key, &msg, presented).map_err(|_| ProtocolError::Auth("wrong cluster secret"))
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::Rng::fill(&mut rand::thread_rng(), &mut n[..]);
    n
}

/// Checks a Hello's magic and version; returns the version both sides will speak.
pub fn check_hello(magic: &[u8; 8], version: u16) -> Result<u16, ProtocolError> {
    if *magic != MAGIC {
        return Err(ProtocolError::Version(
            "no Strata protocol (bad magic)".into(),
        ));
    }
    if version < VERSION {
        return Err(ProtocolError::Version(format!(
            "version {version}; this node needs {VERSION}"
        )));
    }
    Ok(VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;

    fn sample() -> Vec<Message> {
        let rec = WireRecord {
            body: b"{\"a\":1}".to_vec(),
            lsn: 7,
            created_ms: 1,
            updated_ms: 2,
        };
        vec![
            Message::Hello {
                magic: MAGIC,
                version: VERSION,
                client_nonce: [3; NONCE_LEN],
                purpose: Purpose::Client,
            },
            Message::Request {
                id: 9,
                body: Request::Write {
                    writes: vec![WireWrite {
                        key: "c/i".into(),
                        body: Some(b"{}".to_vec()),
                        precondition: WirePrecondition::Version(4),
                    }],
                },
            },
            Message::Response {
                id: 9,
                body: Response::Page {
                    items: vec![("i".into(), rec.clone())],
                    next: Some("i".into()),
                },
            },
            Message::Response {
                id: 10,
                body: Response::Error(WireError {
                    kind: ErrorKind::PreconditionFailed,
                    message: "no".into(),
                    index: Some(0),
                    key: Some("c/i".into()),
                    current: None,
                }),
            },
        ]
    }

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let msgs = sample();
        let mut all = Vec::new();
        for m in &msgs {
            all.extend(encode_frame(m));
        }
        // Feed the bytes one at a time: every message comes out once, in order.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in all {
            buf.extend_from_slice(&[b]);
            while let Some(m) = decode_frame(&mut buf, 1 << 20).unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
    }

    #[test]
    fn oversize_and_garbage_are_errors() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(matches!(
            decode_frame(&mut buf, 1 << 20),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xfe, 0xfe, 0xfe][..]);
        assert!(matches!(
            decode_frame(&mut buf, 1 << 20),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn proofs_bind_secret_side_and_nonces() {
        let (a, b) = ([1; NONCE_LEN], [2; NONCE_LEN]);
        let p = proof(b"secret", "client", &a, &b);
        assert!(verify_proof(b"secret", "client", &a, &b, &p).is_ok());
        assert!(verify_proof(b"other", "client", &a, &b, &p).is_err());
        assert!(verify_proof(b"secret", "server", &a, &b, &p).is_err());
        assert!(verify_proof(b"secret", "client", &b, &a, &p).is_err());
    }

    #[test]
    fn hello_checks() {
        assert_eq!(check_hello(&MAGIC, VERSION), Ok(VERSION));
        assert!(check_hello(b"GET / HT", 1).is_err());
        assert!(check_hello(&MAGIC, 0).is_err());
    }

    fn arb_record() -> impl Strategy<Value = WireRecord> {
        (
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(body, lsn, created_ms, updated_ms)| WireRecord {
                body,
                lsn,
                created_ms,
                updated_ms,
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), "[a-z]{1,8}/[a-z0-9]{1,8}").prop_map(|(id, key)| Message::Request {
                id,
                body: Request::Get { key }
            }),
            (any::<u64>(), proptest::option::of(arb_record())).prop_map(|(id, r)| {
                Message::Response {
                    id,
                    body: Response::Record(r),
                }
            }),
            (
                any::<u64>(),
                "[a-z]{1,8}",
                ".{0,8}",
                proptest::option::of(".{0,8}"),
                any::<u32>()
            )
                .prop_map(|(id, collection, prefix, after, limit)| Message::Request {
                    id,
                    body: Request::List {
                        collection,
                        prefix,
                        after,
                        limit
                    }
                }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(proptest::option::of(arb_record()), 0..4)
            )
                .prop_map(|(lsn, epoch, recs)| Message::Response {
                    id: lsn ^ epoch,
                    body: Response::Committed {
                        lsn,
                        epoch,
                        results: recs
                            .into_iter()
                            .map(|record| WireWriteResult {
                                created: record.is_some(),
                                record
                            })
                            .collect(),
                    }
                }),
            ".{0,40}".prop_map(|reason| Message::Refused { reason }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in arb_message()) {
            let mut buf = BytesMut::from(&encode_frame(&m)[..]);
            prop_assert_eq!(decode_frame(&mut buf, MAX_FRAME_CEILING).unwrap(), Some(m));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                match decode_frame(&mut buf, 1 << 16) {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}
