//! The replication state machine, pure: no I/O, no clocks, no sled.
//!
//! Two decisions live here so they can be property-tested on their own:
//!
//! - [`plan`]: on the primary, what a subscribing replica gets — the log from where it
//!   stopped, a snapshot (its position fell out of the log, or its tail diverged from this
//!   primary's history), or a refusal (the replica has seen a newer epoch than ours, so we
//!   are a deposed primary and must not ship anything).
//! - [`Follower::check`]: on the replica, whether an incoming entry may be applied — the
//!   next LSN exactly, from the epoch the adopted history says owns that LSN.
//!
//! # Epoch history
//!
//! A [`History`] lists which epoch began after which LSN: `[(1, 0), (2, 200)]` says LSNs
//! `1..=200` were written in epoch 1 and everything after 200 in epoch 2. A promotion
//! appends `(current + 1, last_lsn)`. Two nodes agree on a prefix of the log exactly when
//! their histories agree on the epoch of every LSN of it; a node whose last entry is
//! `(epoch e, lsn l)` holds a tail another history does not contain when that history
//! ends epoch `e` before `l` (or never had epoch `e`).

/// One line of an epoch history: `epoch` began after `after_lsn`, so its first entry is
/// `after_lsn + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: u64,
    /// The last LSN of the previous epoch.
    pub after_lsn: u64,
}

/// Which epoch wrote which LSNs; see the module docs. Never empty: a new database starts
/// with `[(1, 0)]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History(Vec<EpochStart>);

/// Why a history from a peer or from disk is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// No line at all.
    #[error("an epoch history needs at least one line")]
    Empty,
    /// Epochs must strictly increase and their start LSNs must not go backwards.
    #[error("epoch history out of order at line {0}")]
    Order(usize),
}

impl History {
    /// The history of a new database: epoch 1 from the start.
    pub fn initial() -> Self {
        History(vec![EpochStart {
            epoch: 1,
            after_lsn: 0,
        }])
    }

    /// Checks and wraps lines (from disk or from a peer: never trusted as they come).
    pub fn new(lines: Vec<EpochStart>) -> Result<Self, HistoryError> {
        if lines.is_empty() {
            return Err(HistoryError::Empty);
        }
        for (i, w) in lines.windows(2).enumerate() {
            if w[1].epoch <= w[0].epoch || w[1].after_lsn < w[0].after_lsn {
                return Err(HistoryError::Order(i + 1));
            }
        }
        Ok(History(lines))
    }

    /// The lines, oldest first.
    pub fn lines(&self) -> &[EpochStart] {
        &self.0
    }

    /// The newest epoch: the one new writes are stamped with.
    pub fn current(&self) -> u64 {
        self.0.last().map_or(1, |l| l.epoch)
    }

    /// The epoch that wrote `lsn` according to this history; `None` for LSN 0 (nothing)
    /// or an LSN before the first line.
    pub fn epoch_of(&self, lsn: u64) -> Option<u64> {
        if lsn == 0 {
            return None;
        }
        self.0
            .iter()
            .rev()
            .find(|l| l.after_lsn < lsn)
            .map(|l| l.epoch)
    }

    /// The last LSN of `epoch` here: `None` when this history never had that epoch,
    /// `Some(u64::MAX)` for the current one (still growing).
    pub fn end_of(&self, epoch: u64) -> Option<u64> {
        let i = self.0.iter().position(|l| l.epoch == epoch)?;
        Some(self.0.get(i + 1).map_or(u64::MAX, |next| next.after_lsn))
    }

    /// This history with a new epoch starting after `last_lsn`: what a promotion by the
    /// node with tag `node` ([`node_tag`]) writes.
    ///
    /// An epoch is `term << 32 | node`: the new term is one above the current one, so the
    /// new epoch is above every epoch this node has seen, and the node's tag in the low
    /// bits keeps two promotions that could not see each other (a partition, an operator
    /// promoting two replicas) from ever naming the same epoch. Were the names equal, two
    /// primaries promoted at the same LSN would hold identical histories and accept each
    /// other's diverged writes as a shared log; distinct, each one's tail is a divergence
    /// to the other, and the lower of the two is fenced when they meet.
    ///
    /// Epochs this node learnt of but that began after `last_lsn` (it was lagging behind
    /// their primary) are dropped: it holds none of their entries, and keeping their line
    /// would make later LSNs ambiguous. The new epoch is still above all of them.
    pub fn promoted(&self, last_lsn: u64, node: u32) -> History {
        let term = (self.current() >> 32).saturating_add(1);
        let epoch = (term << 32) | u64::from(node);
        let mut lines: Vec<EpochStart> = self
            .0
            .iter()
            .copied()
            .filter(|l| l.after_lsn <= last_lsn)
            .collect();
        lines.push(EpochStart {
            epoch,
            after_lsn: last_lsn,
        });
        History(lines)
    }

    /// Whether a node holding `1..=lsn` under history `mine` holds only entries this
    /// history also contains (same epoch for its last entry, which this history has not
    /// ended before `lsn`).
    pub fn contains_position(&self, mine: &History, lsn: u64) -> bool {
        let Some(epoch) = mine.epoch_of(lsn) else {
            return true; // nothing held: trivially a prefix
        };
        // Both must have started that epoch at the same place, too.
        let line = |h: &History| h.0.iter().find(|l| l.epoch == epoch).copied();
        if line(self) != line(mine) {
            return false;
        }
        match self.end_of(epoch) {
            Some(end) => lsn <= end,
            None => false,
        }
    }

    /// Encodes as stored under the `history` metadata key: `(epoch, after_lsn)` pairs,
    /// u64 big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.0.len() * 16);
        for l in &self.0 {
            v.extend_from_slice(&l.epoch.to_be_bytes());
            v.extend_from_slice(&l.after_lsn.to_be_bytes());
        }
        v
    }

    /// Parses [`History::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<History, HistoryError> {
        if bytes.len() % 16 != 0 {
            return Err(HistoryError::Empty);
        }
        let mut lines = Vec::with_capacity(bytes.len() / 16);
        for c in bytes.chunks_exact(16) {
            let mut e = [0u8; 8];
            let mut a = [0u8; 8];
            e.copy_from_slice(&c[..8]);
            a.copy_from_slice(&c[8..]);
            lines.push(EpochStart {
                epoch: u64::from_be_bytes(e),
                after_lsn: u64::from_be_bytes(a),
            });
        }
        History::new(lines)
    }

    /// As `(epoch, after_lsn)` pairs, for the wire.
    pub fn to_pairs(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|l| (l.epoch, l.after_lsn)).collect()
    }

    /// From `(epoch, after_lsn)` pairs off the wire, checked.
    pub fn from_pairs(pairs: &[(u64, u64)]) -> Result<History, HistoryError> {
        History::new(
            pairs
                .iter()
                .map(|&(epoch, after_lsn)| EpochStart { epoch, after_lsn })
                .collect(),
        )
    }
}

/// The tag a node stamps into the low 32 bits of the epochs it starts (see
/// [`History::promoted`]): the first four bytes of SHA-256 of its `[node] name`, so node
/// names must be unique in a fleet (they are how status pages tell nodes apart anyway).
pub fn node_tag(name: &str) -> u32 {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut b = [0u8; 4];
    b.copy_from_slice(&d.as_ref()[..4]);
    u32::from_be_bytes(b)
}

/// Where a subscribing replica stands, as it reports itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaPosition {
    /// The replica's history (its current epoch is the newest it has seen).
    pub history: History,
    /// The newest LSN it applied durably.
    pub applied_lsn: u64,
    /// True when an earlier snapshot install did not finish: its data is partial.
    pub needs_snapshot: bool,
}

/// What the primary knows of itself when a replica subscribes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryPosition {
    /// The primary's history.
    pub history: History,
    /// Oldest LSN still in its log.
    pub first_log_lsn: u64,
    /// Newest durable LSN.
    pub durable_lsn: u64,
}

/// The primary's answer to a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Stream the log from `from_lsn` (the replica's applied LSN + 1).
    Resume {
        /// First LSN to send.
        from_lsn: u64,
    },
    /// Send a snapshot of the records, then the log after it.
    Snapshot {
        /// Why, for the logs.
        reason: SnapshotReason,
    },
    /// Send nothing: the replica knows a newer epoch than ours.
    Refuse {
        /// The replica's newer epoch.
        replica_epoch: u64,
    },
}

/// Why a replica must be rebuilt from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotReason {
    /// The entries after its position were truncated from the log.
    BehindRetention,
    /// Its tail holds entries this primary's history does not contain.
    Diverged,
    /// Its last snapshot install did not finish.
    Incomplete,
}

impl std::fmt::Display for SnapshotReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotReason::BehindRetention => "its position is no longer in the log",
            SnapshotReason::Diverged => "its log diverged from this primary's history",
            SnapshotReason::Incomplete => "its previous snapshot install did not finish",
        })
    }
}

/// Decides how to serve a subscribing replica; see the module docs.
pub fn plan(primary: &PrimaryPosition, replica: &ReplicaPosition) -> Plan {
    let replica_epoch = replica.history.current();
    if replica_epoch > primary.history.current() {
        return Plan::Refuse { replica_epoch };
    }
    if replica.needs_snapshot {
        return Plan::Snapshot {
            reason: SnapshotReason::Incomplete,
        };
    }
    let lsn = replica.applied_lsn;
    if lsn > primary.durable_lsn || !primary.history.contains_position(&replica.history, lsn) {
        return Plan::Snapshot {
            reason: SnapshotReason::Diverged,
        };
    }
    // The log holds first_log_lsn..=durable; the replica needs lsn+1 onwards. When it is
    // fully caught up (lsn == durable) nothing is needed from the log yet.
    if lsn < primary.durable_lsn && lsn + 1 < primary.first_log_lsn {
        return Plan::Snapshot {
            reason: SnapshotReason::BehindRetention,
        };
    }
    if lsn == primary.durable_lsn && lsn + 1 < primary.first_log_lsn {
        // Caught up but the log is empty beyond: the next entry will be lsn+1, fine.
        return Plan::Resume { from_lsn: lsn + 1 };
    }
    Plan::Resume { from_lsn: lsn + 1 }
}

/// Why a replica refused an entry. Nothing of a refused entry is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryRefused {
    /// Not the next LSN.
    #[error("entry {got} out of order: expected {expected}")]
    OutOfOrder {
        /// The LSN that would be next.
        expected: u64,
        /// The LSN received.
        got: u64,
    },
    /// Stamped with an epoch the adopted history does not give to that LSN (an older
    /// primary's entry, or a forged one).
    #[error("entry {lsn} has epoch {got}, but the history gives that LSN to epoch {expected}")]
    WrongEpoch {
        /// The entry's LSN.
        lsn: u64,
        /// The epoch the history expects.
        expected: u64,
        /// The epoch on the entry.
        got: u64,
    },
}

/// The replica's side: its applied LSN and the history adopted from its primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Follower {
    /// The newest LSN applied.
    pub applied: u64,
    /// The adopted history.
    pub history: History,
}

impl Follower {
    /// Whether an entry `(epoch, lsn)` may be applied next.
    pub fn check(&self, epoch: u64, lsn: u64) -> Result<(), EntryRefused> {
        let expected = self.applied + 1;
        if lsn != expected {
            return Err(EntryRefused::OutOfOrder { expected, got: lsn });
        }
        let want = self.history.epoch_of(lsn).unwrap_or(0);
        if epoch != want {
            return Err(EntryRefused::WrongEpoch {
                lsn,
                expected: want,
                got: epoch,
            });
        }
        Ok(())
    }

    /// Records an applied entry (after [`Follower::check`] passed).
    pub fn applied(&mut self, lsn: u64) {
        self.applied = lsn;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(pairs: &[(u64, u64)]) -> History {
        History::from_pairs(pairs).unwrap()
    }

    fn primary(pairs: &[(u64, u64)], first: u64, durable: u64) -> PrimaryPosition {
        PrimaryPosition {
            history: h(pairs),
            first_log_lsn: first,
            durable_lsn: durable,
        }
    }

    fn replica(pairs: &[(u64, u64)], lsn: u64) -> ReplicaPosition {
        ReplicaPosition {
            history: h(pairs),
            applied_lsn: lsn,
            needs_snapshot: false,
        }
    }

    #[test]
    fn history_basics() {
        let x = h(&[(1, 0), (2, 200), (4, 300)]);
        assert_eq!(x.epoch_of(0), None);
        assert_eq!(x.epoch_of(1), Some(1));
        assert_eq!(x.epoch_of(200), Some(1));
        assert_eq!(x.epoch_of(201), Some(2));
        assert_eq!(x.epoch_of(301), Some(4));
        assert_eq!(x.end_of(1), Some(200));
        assert_eq!(x.end_of(3), None);
        assert_eq!(x.end_of(4), Some(u64::MAX));
        assert_eq!(History::decode(&x.encode()).unwrap(), x);
        assert!(History::from_pairs(&[]).is_err());
        assert!(History::from_pairs(&[(2, 0), (1, 5)]).is_err());
        assert!(History::from_pairs(&[(1, 5), (2, 4)]).is_err());
        assert_eq!(x.promoted(350, 7).current(), 1 << 32 | 7);
        // A lagging replica promoted: the epoch it never received entries of is dropped.
        assert_eq!(
            x.promoted(250, 9),
            h(&[(1, 0), (2, 200), (1 << 32 | 9, 250)]),
            "epoch 4 began after 300, beyond this node's log"
        );
    }

    #[test]
    fn plans() {
        let p = primary(&[(1, 0)], 1, 100);
        assert_eq!(
            plan(&p, &replica(&[(1, 0)], 0)),
            Plan::Resume { from_lsn: 1 }
        );
        assert_eq!(
            plan(&p, &replica(&[(1, 0)], 60)),
            Plan::Resume { from_lsn: 61 }
        );
        assert_eq!(
            plan(&p, &replica(&[(1, 0)], 100)),
            Plan::Resume { from_lsn: 101 }
        );
        // Truncated past the replica.
        let p = primary(&[(1, 0)], 50, 100);
        assert!(matches!(
            plan(&p, &replica(&[(1, 0)], 10)),
            Plan::Snapshot {
                reason: SnapshotReason::BehindRetention
            }
        ));
        assert_eq!(
            plan(&p, &replica(&[(1, 0)], 49)),
            Plan::Resume { from_lsn: 50 }
        );
        // Replica ahead of the primary in the same epoch: its tail is not ours.
        assert!(matches!(
            plan(&p, &replica(&[(1, 0)], 101)),
            Plan::Snapshot {
                reason: SnapshotReason::Diverged
            }
        ));
        // Old primary rejoining: it wrote 201..=210 in epoch 1, the new primary ended
        // epoch 1 at 200.
        let p = primary(&[(1, 0), (2, 200)], 1, 260);
        assert!(matches!(
            plan(&p, &replica(&[(1, 0)], 210)),
            Plan::Snapshot {
                reason: SnapshotReason::Diverged
            }
        ));
        assert_eq!(
            plan(&p, &replica(&[(1, 0)], 200)),
            Plan::Resume { from_lsn: 201 }
        );
        // A replica that knows epoch 3 fences an epoch-2 primary.
        assert_eq!(
            plan(&p, &replica(&[(1, 0), (3, 100)], 100)),
            Plan::Refuse { replica_epoch: 3 }
        );
        let mut r = replica(&[(1, 0)], 5);
        r.needs_snapshot = true;
        assert!(matches!(plan(&p, &r), Plan::Snapshot { .. }));
    }

    #[test]
    fn follower_checks_order_and_epoch() {
        let f = Follower {
            applied: 200,
            history: h(&[(1, 0), (2, 200)]),
        };
        assert!(f.check(2, 201).is_ok());
        assert!(matches!(
            f.check(1, 201),
            Err(EntryRefused::WrongEpoch { .. })
        ));
        assert!(matches!(
            f.check(2, 203),
            Err(EntryRefused::OutOfOrder { .. })
        ));
        assert!(matches!(
            f.check(2, 200),
            Err(EntryRefused::OutOfOrder { .. })
        ));
    }

    /// A model of a cluster: nodes with logs of (epoch) per LSN; random writes on the
    /// primary, promotions of a replica, replicas following via [`plan`] and
    /// [`Follower::check`]. After every step: a replica's log is always a prefix of its
    /// primary's (never keeps a diverged tail), and applied LSNs only go back through a
    /// snapshot.
    #[derive(Clone, Debug)]
    struct Node {
        log: Vec<u64>, // epoch of LSN i+1
        history: History,
        first: u64,
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u8),
        Sync(usize, u8),
        Promote(usize),
        Truncate(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..20).prop_map(Op::Write),
            4 => (0usize..3, 1u8..30).prop_map(|(n, k)| Op::Sync(n, k)),
            1 => (0usize..3).prop_map(Op::Promote),
            1 => (1u8..10).prop_map(Op::Truncate),
        ]
    }

    fn sync(p: &Node, r: &mut Node, max: usize) -> bool {
        let pos = ReplicaPosition {
            history: r.history.clone(),
            applied_lsn: r.log.len() as u64,
            needs_snapshot: false,
        };
        let pp = PrimaryPosition {
            history: p.history.clone(),
            first_log_lsn: p.first,
            durable_lsn: p.log.len() as u64,
        };
        match plan(&pp, &pos) {
            Plan::Refuse { .. } => false,
            Plan::Snapshot { .. } => {
                // Snapshot: the replica becomes the primary's state at that LSN.
                r.log = p.log.clone();
                r.history = p.history.clone();
                r.first = r.log.len() as u64 + 1;
                true
            }
            Plan::Resume { from_lsn } => {
                assert_eq!(from_lsn, r.log.len() as u64 + 1);
                assert!(from_lsn >= p.first || from_lsn > p.log.len() as u64);
                r.history = p.history.clone();
                let mut f = Follower {
                    applied: r.log.len() as u64,
                    history: r.history.clone(),
                };
                for lsn in from_lsn..=(p.log.len() as u64).min(from_lsn + max as u64) {
                    let epoch = p.log[(lsn - 1) as usize];
                    f.check(epoch, lsn)
                        .expect("a consistent stream is accepted");
                    r.log.push(epoch);
                    f.applied(lsn);
                }
                true
            }
        }
    }

    proptest! {
        #[test]
        fn replicas_only_ever_hold_a_prefix_of_their_primary(ops in proptest::collection::vec(op(), 1..60)) {
            // Node 0 starts as primary; 1..=3 replicas.
            let fresh = Node { log: vec![], history: History::initial(), first: 1 };
            let mut nodes = [fresh.clone(), fresh.clone(), fresh.clone(), fresh];
            let mut primary = 0usize;
            for op in ops {
                match op {
                    Op::Write(n) => {
                        let e = nodes[primary].history.current();
                        for _ in 0..n { nodes[primary].log.push(e); }
                    }
                    Op::Truncate(n) => {
                        let p = &mut nodes[primary];
                        p.first = (p.first + n as u64).min(p.log.len() as u64 + 1);
                    }
                    Op::Sync(i, k) => {
                        let r = (primary + 1 + i) % 4;
                        let p = nodes[primary].clone();
                        let before = nodes[r].log.clone();
                        if sync(&p, &mut nodes[r], k as usize) {
                            let after = &nodes[r].log;
                            prop_assert!(p.log.starts_with(after), "replica holds a prefix");
                            if after.len() < before.len() || !after.starts_with(&before) {
                                // Only a snapshot may rewrite: it equals the primary.
                                prop_assert_eq!(after, &p.log);
                            }
                        }
                    }
                    Op::Promote(i) => {
                        // The old primary keeps its (possibly longer) log: it diverges.
                        // An operator promotes a replica that followed the current
                        // primary (same epoch), as the failover procedure says.
                        let r = (primary + 1 + i) % 4;
                        if nodes[r].history.current() != nodes[primary].history.current() {
                            continue;
                        }
                        let last = nodes[r].log.len() as u64;
                        nodes[r].history = nodes[r].history.promoted(last, r as u32);
                        primary = r;
                    }
                }
            }
            // In the end every node can rejoin the final primary and match it exactly.
            let p = nodes[primary].clone();
            for (r, node) in nodes.iter().enumerate() {
                if r == primary { continue; }
                let mut node = node.clone();
                let mut rounds = 0;
                while node.log != p.log && rounds < 1000 {
                    if !sync(&p, &mut node, 50) {
                        // Fenced: a node that knows a newer epoch than the primary.
                        prop_assert!(node.history.current() > p.history.current());
                        break;
                    }
                    rounds += 1;
                }
                if node.history.current() <= p.history.current() {
                    prop_assert_eq!(&node.log, &p.log);
                }
            }
        }

        /// Two promotions that cannot see each other (same history, any LSNs, two
        /// nodes) never name the same epoch, both are above everything before, and a
        /// replica holding one's writes is never offered the other's log to resume on.
        #[test]
        fn independent_promotions_never_collide(
            before in proptest::collection::vec((1u64..4, 0u64..50), 0..4),
            a in 0u64..200, b in 0u64..200, wa in 1u64..20, wb in 1u64..20,
            ta in any::<u32>(), tb in any::<u32>(),
        ) {
            prop_assume!(ta != tb);
            let mut base = History::initial();
            for (bump, gap) in before {
                let after = base.lines().last().map_or(0, |l| l.after_lsn) + gap;
                let epoch = base.current() + (bump << 32);
                base = History::from_pairs(&[base.to_pairs(), vec![(epoch, after)]].concat()).unwrap();
            }
            let start = base.lines().last().map_or(0, |l| l.after_lsn);
            let (a, b) = (start + a, start + b);
            let ha = base.promoted(a, ta);
            let hb = base.promoted(b, tb);
            prop_assert_ne!(ha.current(), hb.current());
            prop_assert!(ha.current() > base.current() && hb.current() > base.current());
            // Each wrote at least one entry in its own epoch.
            let (la, lb) = (a + wa, b + wb);
            prop_assert!(!hb.contains_position(&ha, la));
            prop_assert!(!ha.contains_position(&hb, lb));
            let p = PrimaryPosition { history: hb.clone(), first_log_lsn: 1, durable_lsn: lb.max(la) };
            let r = ReplicaPosition { history: ha.clone(), applied_lsn: la, needs_snapshot: false };
            let resumes = matches!(plan(&p, &r), Plan::Resume { .. });
            prop_assert!(!resumes, "a diverged replica must not resume");
        }
    }
}
