//! How the replication log is packed into sled values: many entries per value.
//!
//! With one sled key per log entry, the log cost as much sled work as the records it
//! describes: an insert per entry on every write and on every replicated apply, and a
//! remove per entry when retention dropped it. Sled's batch apply was 60% of a
//! catching-up replica's time, half of it for log keys. A chunk instead holds the entries
//! of one group commit (or one replicated apply), cut at about [`CHUNK_BYTES`], under the
//! key of its **last** LSN, so that
//!
//! - a forward range read from `lsn` finds the chunk holding `lsn` first;
//! - truncation removes whole chunks whose last LSN is below the cutoff;
//! - the newest LSN is the last key, read without its value.
//!
//! A chunk value is `[CHUNK_FORMAT]` then per entry `[len u32 LE][entry]`, in LSN order
//! with no gaps. Each entry is exactly the bytes [`LogEntry::encode`] produced, with its
//! own checksum, so a primary ships what it stored without re-encoding. A value that
//! starts with [`ENTRY_FORMAT`] instead is one bare entry, as databases written before
//! chunks stored the log; it reads as a chunk of one.
//!
//! Pure: no sled, no I/O, so the format is unit- and property-tested here.
//!
//! [`LogEntry::encode`]: super::engine::LogEntry::encode

/// First byte of an encoded log entry (the entry's own format version).
pub const ENTRY_FORMAT: u8 = 1;
/// An entry's format byte and CRC-32 of the rest; the checksummed payload follows.
pub const ENTRY_HEADER: usize = 1 + 4;
/// Where the entry's LSN sits: after the header and the epoch (u64 LE).
const ENTRY_LSN_AT: usize = ENTRY_HEADER + 8;

/// First byte of a chunk value.
pub const CHUNK_FORMAT: u8 = 2;
/// A chunk is closed once it holds this many bytes. Large enough that a chunk's key costs
/// sled little per entry (~100 small entries), small enough that sled keeps it inline in
/// its leaf pages rather than in a blob file of its own (those start at ~128 KiB).
pub const CHUNK_BYTES: usize = 16 * 1024;

/// A stored log value that is not what the engine wrote: the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CorruptLog(pub String);

/// Writes the CRC-32 of `entry[ENTRY_HEADER..]` into its header: the last step of
/// encoding an entry.
pub fn seal(entry: &mut [u8]) {
    if entry.len() >= ENTRY_HEADER {
        let crc = crc32fast::hash(&entry[ENTRY_HEADER..]);
        entry[1..ENTRY_HEADER].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Checks an encoded entry's format byte and checksum and returns its LSN, without
/// parsing the rest: what the log reader verifies before shipping bytes as they are.
pub fn check_entry(entry: &[u8]) -> Result<u64, CorruptLog> {
    if entry.len() < ENTRY_LSN_AT + 8 {
        return Err(CorruptLog(format!("entry of {} bytes", entry.len())));
    }
    if entry[0] != ENTRY_FORMAT {
        return Err(CorruptLog(format!("unknown entry format {}", entry[0])));
    }
    let stored = u32::from_le_bytes([entry[1], entry[2], entry[3], entry[4]]);
    let actual = crc32fast::hash(&entry[ENTRY_HEADER..]);
    if stored != actual {
        return Err(CorruptLog(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&entry[ENTRY_LSN_AT..ENTRY_LSN_AT + 8]);
    Ok(u64::from_le_bytes(lsn))
}

/// Packs consecutive entries into chunks. Push entries in LSN order; each full chunk
/// comes back as `(last LSN, value)` for the caller to store, and [`ChunkBuilder::finish`]
/// returns the partial one at the end of a group.
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    value: Vec<u8>,
    last: u64,
}

impl ChunkBuilder {
    /// Appends one entry (bytes as [`check_entry`] accepts them) with LSN `lsn`.
    pub fn push(&mut self, lsn: u64, entry: &[u8]) -> Option<(u64, Vec<u8>)> {
        self.push_with(lsn, |v| v.extend_from_slice(entry))
    }

    /// Appends one entry written by `encode` straight into the chunk (no copy of the
    /// entry): `encode` must append exactly one sealed entry to the vector it is given.
    pub fn push_with(
        &mut self,
        lsn: u64,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Option<(u64, Vec<u8>)> {
        if self.value.is_empty() {
            self.value.reserve(CHUNK_BYTES + 256);
            self.value.push(CHUNK_FORMAT);
        }
        let len_at = self.value.len();
        self.value.extend_from_slice(&[0; 4]);
        encode(&mut self.value);
        // Entries are far below 4 GiB (frames and bodies are capped long before).
        let len = u32::try_from(self.value.len() - len_at - 4).unwrap_or(u32::MAX);
        self.value[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        self.last = lsn;
        if self.value.len() >= CHUNK_BYTES {
            self.finish()
        } else {
            None
        }
    }

    /// The chunk built so far, if it holds any entry; the builder starts afresh.
    pub fn finish(&mut self) -> Option<(u64, Vec<u8>)> {
        if self.value.is_empty() {
            return None;
        }
        Some((self.last, std::mem::take(&mut self.value)))
    }
}

/// The entries of a stored chunk value, oldest first, as `(lsn, entry bytes)`, each
/// checked with [`check_entry`]. `last_lsn` is the LSN of the chunk's key: the entries
/// must be consecutive and end exactly there, or the value is [`CorruptLog`].
pub fn entries(value: &[u8], last_lsn: u64) -> Result<Vec<(u64, &[u8])>, CorruptLog> {
    let mut out = Vec::new();
    match value.first() {
        Some(&ENTRY_FORMAT) => out.push((check_entry(value)?, value)),
        Some(&CHUNK_FORMAT) => {
            let mut rest = &value[1..];
            while !rest.is_empty() {
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    return Err(CorruptLog(format!(
                        "chunk ends inside a length ({} bytes left)",
                        rest.len()
                    )));
                };
                let len = u32::from_le_bytes(*len) as usize;
                if len > tail.len() {
                    return Err(CorruptLog(format!(
                        "entry of {len} bytes with {} left in the chunk",
                        tail.len()
                    )));
                }
                let (entry, tail) = tail.split_at(len);
                let lsn = check_entry(entry)?;
                if let Some(&(prev, _)) = out.last() {
                    if prev.checked_add(1) != Some(lsn) {
                        return Err(CorruptLog(format!("entry {lsn} follows entry {prev}")));
                    }
                }
                out.push((lsn, entry));
                rest = tail;
            }
        }
        Some(other) => return Err(CorruptLog(format!("unknown log value format {other}"))),
        None => return Err(CorruptLog("empty log value".into())),
    }
    match out.last() {
        Some(&(lsn, _)) if lsn == last_lsn => Ok(out),
        Some(&(lsn, _)) => Err(CorruptLog(format!(
            "value under LSN {last_lsn} ends with entry {lsn}"
        ))),
        None => Err(CorruptLog("chunk without entries".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal well-formed entry: header, epoch, lsn, then `pad` payload bytes.
    fn entry(lsn: u64, pad: usize) -> Vec<u8> {
        let mut v = vec![ENTRY_FORMAT, 0, 0, 0, 0];
        v.extend_from_slice(&7u64.to_le_bytes());
        v.extend_from_slice(&lsn.to_le_bytes());
        v.extend(std::iter::repeat_n(0xab, pad));
        seal(&mut v);
        v
    }

    fn build(first: u64, sizes: &[usize]) -> Vec<(u64, Vec<u8>)> {
        let mut b = ChunkBuilder::default();
        let mut chunks = Vec::new();
        for (i, &pad) in sizes.iter().enumerate() {
            let lsn = first + i as u64;
            chunks.extend(b.push(lsn, &entry(lsn, pad)));
        }
        chunks.extend(b.finish());
        chunks
    }

    #[test]
    fn a_bare_entry_reads_as_a_chunk_of_one() {
        let e = entry(9, 3);
        assert_eq!(entries(&e, 9).unwrap(), vec![(9, &e[..])]);
        assert!(entries(&e, 10).is_err(), "key and entry disagree");
    }

    #[test]
    fn chunks_close_at_the_size_and_keep_every_entry() {
        let chunks = build(5, &[CHUNK_BYTES / 3; 7]);
        assert!(chunks.len() >= 2);
        let mut next = 5;
        for (last, value) in &chunks {
            for (lsn, bytes) in entries(value, *last).unwrap() {
                assert_eq!(lsn, next);
                assert_eq!(bytes, entry(lsn, CHUNK_BYTES / 3));
                next += 1;
            }
        }
        assert_eq!(next, 12);
        assert!(ChunkBuilder::default().finish().is_none());
    }

    #[test]
    fn damage_is_reported_not_hidden() {
        let (last, value) = build(1, &[10, 10, 10]).remove(0);
        // A flipped payload byte, a cut value, a gap and garbage.
        let mut flipped = value.clone();
        let end = flipped.len() - 1;
        flipped[end] ^= 1;
        assert!(entries(&flipped, last).is_err());
        assert!(entries(&value[..value.len() - 3], last).is_err());
        let mut gap = ChunkBuilder::default();
        gap.push(1, &entry(1, 0));
        gap.push(3, &entry(3, 0));
        let (glast, gvalue) = gap.finish().unwrap();
        assert!(entries(&gvalue, glast).is_err());
        for garbage in [&b""[..], b"\x02", b"\x02\x01\x00", b"\x09abc", b"\x01\x00"] {
            assert!(entries(garbage, 1).is_err(), "{garbage:?}");
        }
        assert_eq!(entries(&value, last).unwrap().len(), 3);
    }

    proptest! {
        #[test]
        fn any_sizes_round_trip(first in 1u64..1_000_000, sizes in prop::collection::vec(0usize..9000, 1..40)) {
            let chunks = build(first, &sizes);
            let mut next = first;
            for (last, value) in &chunks {
                let got = entries(value, *last).unwrap();
                prop_assert_eq!(got[0].0, next);
                next = last + 1;
            }
            prop_assert_eq!(next, first + sizes.len() as u64);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), last in any::<u64>()) {
            let _ = entries(&bytes, last);
            let _ = check_entry(&bytes);
        }
    }
}
