//! The commit journal: what makes a group commit durable without flushing sled.
//!
//! sled 0.34 is expensive to make durable per group. `apply_batch` seals and writes its IO
//! buffer twice to frame the batch atomically, and `flush` writes it again; each write goes
//! through sled's IO thread pool, which wakes all seven of its threads, and waits on the
//! disk (`sync_file_range`). On the stage 2 PUT benchmark that was 29 context switches
//! and ~350 µs of CPU per group. The journal replaces all of it with one synchronous write
//! of a file the engine owns (`O_DIRECT | O_DSYNC` where the file system allows it, else
//! `pwrite` + `fdatasync`):
//!
//! 1. the writer appends the group's sled changes (every insert and remove, in order) to
//!    the journal as one record and syncs it;
//! 2. only then applies them to sled, as plain inserts that sled persists in the
//!    background;
//! 3. and acknowledges.
//!
//! After a crash, [`Journal::open`] returns the records written since the last
//! checkpoint and the engine applies them again before anything else. The changes are
//! absolute (a key's new bytes, or its removal), so applying them in order over whatever
//! part of them sled kept gives exactly the state after the last record.
//!
//! A **checkpoint** makes sled durable (its flush and an fsync), then starts a new
//! *cycle*: the header names it and records of older cycles stop counting, so the file is
//! reused from its start. The engine checkpoints when the journal is full and before any
//! sled change the journal does not carry (replication, snapshots, epochs): replaying
//! older records over such a change would undo it.
//!
//! # File layout
//!
//! Two header slots (at 0 and 512; a checkpoint writes the one its cycle picks, so a torn
//! header write leaves the other intact), then records from [`RECORDS_AT`]:
//! `[len u32 LE][cycle u64 LE][crc32 u32 LE][payload: len bytes]`, the CRC over cycle and
//! payload. A payload is `[count u32]` then per change `[1][klen u32][key][vlen u32][value]`
//! (insert) or `[2][klen u32][key]` (remove). Reading stops at the first record that is
//! torn, of another cycle, or past the end. The file grows in zero-filled steps ahead of
//! the records, so making a record durable rarely has to write the file's size as well.
//!
//! Encoding and decoding are pure; [`Journal`] is the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where records start: after the two header slots, on a page boundary.
pub const RECORDS_AT: u64 = 4096;
/// Size of a header slot.
const SLOT: u64 = 512;
/// A header: magic, cycle, CRC of the two.
const MAGIC: &[u8; 8] = b"STRJRNL1";
const HEADER_LEN: usize = 8 + 8 + 4;
/// A record's header: length, cycle, CRC.
const RECORD_HEAD: usize = 4 + 8 + 4;
/// How far the file is zero-filled ahead of the record being written.
const GROW_STEP: u64 = 1 << 20;

/// One sled change: a key's new value, or its removal.
pub type Change = (Vec<u8>, Option<Vec<u8>>);

/// A journal file that cannot be used; the message says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the file failed.
    #[error("{0}: {1}")]
    Io(&'static str, io::Error),
    /// A group too large for one record (4 GiB).
    #[error("a group of {0} bytes is too large for one journal record")]
    TooLarge(usize),
    /// A record passed its checksum but does not decode: written by something else.
    #[error("journal record at offset {0} is malformed: {1}")]
    Malformed(u64, &'static str),
}

/// Appends `changes` to `out` as one record payload.
fn encode_changes(changes: &[Change], out: &mut Vec<u8>) {
    out.extend_from_slice(&(changes.len() as u32).to_le_bytes());
    for (key, value) in changes {
        out.push(if value.is_some() { 1 } else { 2 });
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        if let Some(v) = value {
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
    }
}

/// Decodes a record payload written by [`encode_changes`].
fn decode_changes(mut p: &[u8]) -> Result<Vec<Change>, &'static str> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
        if p.len() < n {
            return Err("truncated");
        }
        let (head, rest) = p.split_at(n);
        *p = rest;
        Ok(head)
    }
    fn len(p: &mut &[u8]) -> Result<usize, &'static str> {
        let b = take(p, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let count = len(&mut p)?;
    let mut changes = Vec::with_capacity(count.min(p.len() / 5));
    for _ in 0..count {
        let kind = take(&mut p, 1)?[0];
        let klen = len(&mut p)?;
        let key = take(&mut p, klen)?.to_vec();
        let value = match kind {
            1 => {
                let vlen = len(&mut p)?;
                Some(take(&mut p, vlen)?.to_vec())
            }
            2 => None,
            _ => return Err("unknown change kind"),
        };
        changes.push((key, value));
    }
    if !p.is_empty() {
        return Err("bytes after the last change");
    }
    Ok(changes)
}

fn header(cycle: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&cycle.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The cycle a header slot names, if it is a whole header.
fn read_header(h: &[u8]) -> Option<u64> {
    if h.len() < HEADER_LEN || &h[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    let cycle = u64::from_le_bytes(h[8..16].try_into().ok()?);
    (crc32fast::hash(&h[..16]) == crc).then_some(cycle)
}

fn record_crc(cycle: u64, payload: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&cycle.to_le_bytes());
    c.update(payload);
    c.finalize()
}

/// Frames `changes` as one record of `cycle` into `out` (cleared first): the payload is
/// encoded in place after room for the head, which is filled in last.
fn frame_record(cycle: u64, changes: &[Change], out: &mut Vec<u8>) -> Result<(), JournalError> {
    out.clear();
    out.extend_from_slice(&[0; RECORD_HEAD]);
    encode_changes(changes, out);
    let len = out.len() - RECORD_HEAD;
    let len32 = u32::try_from(len).map_err(|_| JournalError::TooLarge(len))?;
    let crc = record_crc(cycle, &out[RECORD_HEAD..]);
    out[..4].copy_from_slice(&len32.to_le_bytes());
    out[4..12].copy_from_slice(&cycle.to_le_bytes());
    out[12..RECORD_HEAD].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Splits the records of `cycle` off the front of `bytes` (the file from [`RECORDS_AT`]):
/// their payloads, and where the next record goes. Stops at the first record that does
/// not check out; that and everything after it is garbage from an older cycle or a torn
/// write.
fn scan_records(bytes: &[u8], cycle: u64) -> (Vec<&[u8]>, usize) {
    let mut at = 0;
    let mut payloads = Vec::new();
    while bytes.len() - at >= RECORD_HEAD {
        let h = &bytes[at..at + RECORD_HEAD];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let rec_cycle = u64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let start = at + RECORD_HEAD;
        if len == 0 || rec_cycle != cycle || bytes.len() - start < len {
            break;
        }
        let payload = &bytes[start..start + len];
        if record_crc(cycle, payload) != crc {
            break;
        }
        payloads.push(payload);
        at = start + len;
    }
    (payloads, at)
}

/// The unit of direct I/O: record writes start and end on these boundaries.
const PAGE: usize = 4096;

/// Record writes that bypass the page cache and are durable when they return
/// (`O_DIRECT | O_DSYNC`): one syscall per group instead of `pwrite` + `fdatasync`, and
/// ~20 µs less CPU per group on a virtio disk (BENCHMARKS.md). A write covers whole
/// pages, so the partial page at the end of the records is kept to be written again,
/// completed, by the next record.
struct DirectWriter {
    file: File,
    /// Reused; its page-aligned region (see [`aligned`]) starts with the bytes of the
    /// records' partial last page.
    buf: Vec<u8>,
}

/// The page-aligned region of `buf` holding `pages` pages, growing `buf` (and keeping the
/// region's first page) when it is too small. `O_DIRECT` needs aligned memory; slicing an
/// over-allocated `Vec` at its aligned offset gets it without unsafe code.
fn aligned(buf: &mut Vec<u8>, pages: usize) -> &mut [u8] {
    let need = (pages + 1) * PAGE;
    if buf.len() < need {
        let mut grown = vec![0u8; need.max(2 * buf.len())];
        if !buf.is_empty() {
            let (from, to) = (
                buf.as_ptr().align_offset(PAGE),
                grown.as_ptr().align_offset(PAGE),
            );
            grown[to..to + PAGE].copy_from_slice(&buf[from..from + PAGE]);
        }
        *buf = grown;
    }
    let at = buf.as_ptr().align_offset(PAGE);
    &mut buf[at..at + pages * PAGE]
}

impl DirectWriter {
    /// Opens `path` for direct, synchronous writes; `None` where the file system does
    /// not support them (tmpfs), and the journal then writes through the page cache.
    fn open(path: &Path) -> Option<DirectWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
            .ok()?;
        Some(DirectWriter {
            file,
            buf: Vec::new(),
        })
    }

    /// Keeps `tail` (the records' bytes from the start of their partial last page) for
    /// the next write.
    fn keep_tail(&mut self, tail: &[u8]) {
        aligned(&mut self.buf, 1)[..tail.len()].copy_from_slice(tail);
    }

    /// Writes `record` at `end`, rewriting the partial page before it; durable on return.
    fn write(&mut self, record: &[u8], end: u64) -> io::Result<()> {
        let start = end - end % PAGE as u64;
        let lead = (end - start) as usize;
        let total = lead + record.len();
        let buf = aligned(&mut self.buf, total.div_ceil(PAGE));
        buf[lead..total].copy_from_slice(record);
        buf[total..].fill(0);
        self.file.write_all_at(buf, start)?;
        // The new partial page moves to the front for the next record.
        let last = total - total % PAGE;
        buf.copy_within(last..total, 0);
        Ok(())
    }
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectWriter")
    }
}

/// The journal file of one engine.
#[derive(Debug)]
pub struct Journal {
    file: File,
    /// Direct, synchronous record writes where the file system allows them.
    direct: Option<DirectWriter>,
    cycle: u64,
    /// Where the next record goes.
    end: u64,
    /// How far the file is allocated and zero-filled.
    filled: u64,
    /// Past this, [`Journal::is_full`] asks for a checkpoint.
    limit: u64,
    /// Reused record buffer (a group's record is tens of KiB).
    buf: Vec<u8>,
}

impl Journal {
    /// Opens or creates the journal at `path` and returns it with the change lists of the
    /// records written since the last checkpoint, oldest first: what the engine must
    /// apply to sled again before it serves anything. `limit` bounds the file (and so
    /// the work of a replay).
    pub fn open(path: &Path, limit: u64) -> Result<(Journal, Vec<Vec<Change>>), JournalError> {
        Self::open_with(path, limit, true)
    }

    /// [`Journal::open`], with direct writes only if `direct` (tests cover both ways).
    fn open_with(
        path: &Path,
        limit: u64,
        direct: bool,
    ) -> Result<(Journal, Vec<Vec<Change>>), JournalError> {
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| JournalError::Io("open the journal", e))?;
        let bytes = std::fs::read(path).map_err(|e| JournalError::Io("read the journal", e))?;
        let slot = |at: u64| bytes.get(at as usize..).and_then(read_header);
        let cycle = slot(0).into_iter().chain(slot(SLOT)).max();
        let mut journal = Journal {
            file,
            direct: direct.then(|| DirectWriter::open(path)).flatten(),
            cycle: cycle.unwrap_or(0),
            end: RECORDS_AT,
            filled: bytes.len() as u64,
            limit: limit.max(RECORDS_AT + GROW_STEP),
            buf: Vec::new(),
        };
        let mut replay = Vec::new();
        match cycle {
            Some(cycle) if bytes.len() as u64 > RECORDS_AT => {
                let records = &bytes[RECORDS_AT as usize..];
                let (payloads, _) = scan_records(records, cycle);
                let mut at = RECORDS_AT;
                for p in payloads {
                    replay.push(decode_changes(p).map_err(|m| JournalError::Malformed(at, m))?);
                    at += (RECORD_HEAD + p.len()) as u64;
                }
                journal.end = at;
                let page = (at - at % PAGE as u64) as usize;
                if let Some(d) = journal.direct.as_mut() {
                    d.keep_tail(&bytes[page..at as usize]);
                }
            }
            Some(_) => {}
            None => {
                // New (or never checkpointed): start cycle 1 so that zeroes never match.
                journal.checkpointed()?;
                if !existed {
                    if let Some(dir) = path.parent() {
                        File::open(dir)
                            .and_then(|d| d.sync_all())
                            .map_err(|e| JournalError::Io("sync the journal's directory", e))?;
                    }
                }
            }
        }
        Ok((journal, replay))
    }

    /// True when records have been written since the last checkpoint.
    pub fn has_records(&self) -> bool {
        self.end > RECORDS_AT
    }

    /// True when the journal has reached its size bound: checkpoint before appending.
    pub fn is_full(&self) -> bool {
        self.end >= self.limit
    }

    /// Writes one record of `changes` and makes it durable.
    pub fn append(&mut self, changes: &[Change]) -> Result<(), JournalError> {
        let mut record = std::mem::take(&mut self.buf);
        let written = frame_record(self.cycle, changes, &mut record)
            .and_then(|()| self.write_record(&record));
        self.buf = record;
        written
    }

    fn write_record(&mut self, record: &[u8]) -> Result<(), JournalError> {
        let end = self.end + record.len() as u64;
        if end > self.filled {
            // Zero-fill ahead so that later records overwrite allocated blocks: making them
            // durable then writes the data alone, not the file's size and extents too.
            let from = self.filled.max(RECORDS_AT);
            let upto = end.div_ceil(GROW_STEP) * GROW_STEP;
            let zeros = vec![0u8; (upto - from) as usize];
            self.file
                .write_all_at(&zeros, from)
                .map_err(|e| JournalError::Io("grow the journal", e))?;
            if self.direct.is_some() {
                // Written back now, once per step: a direct write over dirty cached pages
                // would first have to write them out itself.
                self.file
                    .sync_data()
                    .map_err(|e| JournalError::Io("grow the journal", e))?;
            }
            self.filled = upto;
        }
        let written = match self.direct.as_mut().map(|d| d.write(record, self.end)) {
            Some(Ok(())) => true,
            // A device whose blocks are larger than a page refuses the write up front.
            Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(error = %e, "the journal's disk refused a direct write; writing through the page cache from now on");
                self.direct = None;
                false
            }
            Some(Err(e)) => return Err(JournalError::Io("write the journal", e)),
            None => false,
        };
        if !written {
            self.file
                .write_all_at(record, self.end)
                .map_err(|e| JournalError::Io("write the journal", e))?;
            self.file
                .sync_data()
                .map_err(|e| JournalError::Io("fsync the journal", e))?;
        }
        self.end = end;
        Ok(())
    }

    /// Starts a new cycle: every record so far stops counting. Call only once sled holds
    /// everything they carry durably.
    pub fn checkpointed(&mut self) -> Result<(), JournalError> {
        let cycle = self.cycle + 1;
        let slot = (cycle % 2) * SLOT;
        self.file
            .write_all_at(&header(cycle), slot)
            .map_err(|e| JournalError::Io("write the journal header", e))?;
        self.file
            .sync_data()
            .map_err(|e| JournalError::Io("fsync the journal header", e))?;
        self.filled = self.filled.max(slot + HEADER_LEN as u64);
        self.cycle = cycle;
        self.end = RECORDS_AT;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(n: u8) -> Vec<Change> {
        vec![
            (vec![b'r', n], Some(vec![n; 100])),
            (vec![b'l', n], Some(vec![7; 3])),
            (vec![b'r', n + 1], None),
        ]
    }

    #[test]
    fn records_written_since_the_checkpoint_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, replay) = Journal::open(&path, 64 << 20).unwrap();
        assert!(replay.is_empty() && !j.has_records());
        j.append(&sample(1)).unwrap();
        j.append(&sample(2)).unwrap();
        drop(j);
        let (mut j, replay) = Journal::open(&path, 64 << 20).unwrap();
        assert_eq!(replay, vec![sample(1), sample(2)]);
        // Appending after a reopen continues after the last record.
        j.append(&sample(3)).unwrap();
        drop(j);
        let (_, replay) = Journal::open(&path, 64 << 20).unwrap();
        assert_eq!(replay, vec![sample(1), sample(2), sample(3)]);
    }

    #[test]
    fn records_of_any_size_round_trip_in_both_write_modes() {
        // Record sizes around the 4 KiB pages direct writes are made of: shorter than
        // one, exactly one, spanning several, and ending on a boundary.
        let change = |n: usize| vec![(vec![b'r'], Some(vec![n as u8; n]))];
        let sizes = [1, 4000, 4096 - RECORD_HEAD - 14, 5000, 12_000, 3, 8192, 700];
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("journal");
            let (mut j, _) = Journal::open_with(&path, 64 << 20, direct).unwrap();
            // Direct writes whenever asked for and the file system has them (this one
            // does unless it is tmpfs): else this case would test page-cache writes twice.
            let supported = DirectWriter::open(&path).is_some();
            assert_eq!(j.direct.is_some(), direct && supported);
            let mut written = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                j.append(&change(n)).unwrap();
                written.push(change(n));
                if i % 3 == 2 {
                    // Reopen mid-way: appending continues inside the partial page.
                    drop(j);
                    let (again, replay) = Journal::open_with(&path, 64 << 20, direct).unwrap();
                    assert_eq!(replay, written, "direct: {direct}");
                    j = again;
                }
            }
            drop(j);
            let (_, replay) = Journal::open_with(&path, 64 << 20, direct).unwrap();
            assert_eq!(replay, written, "direct: {direct}");
        }
    }

    #[test]
    fn a_checkpoint_retires_every_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, _) = Journal::open(&path, 64 << 20).unwrap();
        for n in 0..5 {
            j.append(&sample(n)).unwrap();
        }
        j.checkpointed().unwrap();
        assert!(!j.has_records());
        // One short record of the new cycle over the start of the old ones: the old
        // records after it are of another cycle and must not replay.
        j.append(&sample(9)[..1]).unwrap();
        drop(j);
        let (mut j, replay) = Journal::open(&path, 64 << 20).unwrap();
        assert_eq!(replay, vec![sample(9)[..1].to_vec()]);
        j.checkpointed().unwrap();
        drop(j);
        let (_, replay) = Journal::open(&path, 64 << 20).unwrap();
        assert!(replay.is_empty());
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, _) = Journal::open(&path, 64 << 20).unwrap();
        j.append(&sample(1)).unwrap();
        let keep = j.end;
        j.append(&sample(2)).unwrap();
        drop(j);
        // Tear the second record: its last bytes never reached the disk.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 8], keep + 20).unwrap();
        let (mut j, replay) = Journal::open(&path, 64 << 20).unwrap();
        assert_eq!(replay, vec![sample(1)]);
        assert_eq!(j.end, keep, "the next record overwrites the torn one");
        j.append(&sample(3)).unwrap();
        drop(j);
        let (_, replay) = Journal::open(&path, 64 << 20).unwrap();
        assert_eq!(replay, vec![sample(1), sample(3)]);
    }

    #[test]
    fn a_torn_header_falls_back_to_the_other_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, _) = Journal::open(&path, 64 << 20).unwrap();
        j.checkpointed().unwrap(); // cycle 2, slot 0; cycle 1 stays in slot 1
        j.append(&sample(4)).unwrap();
        drop(j);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 4], 10).unwrap();
        // Back to cycle 1. A crash can tear a header only while it is written, before any
        // record of its cycle exists, and after sled holds every record of the cycle
        // before; so replaying the older cycle is what recovery needs.
        let (j, replay) = Journal::open(&path, 64 << 20).unwrap();
        assert!(replay.is_empty());
        assert_eq!(j.cycle, 1);
    }

    #[test]
    fn the_journal_reports_full_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(&dir.path().join("j"), 0).unwrap();
        let big = vec![(vec![1u8], Some(vec![0u8; 300 << 10]))];
        let mut n = 0;
        while !j.is_full() {
            j.append(&big).unwrap();
            n += 1;
        }
        assert_eq!(n, 4, "the limit is at least one growth step");
        j.checkpointed().unwrap();
        assert!(!j.is_full());
    }

    proptest! {
        #[test]
        fn changes_round_trip(list in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..40),
             proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200))), 0..20)) {
            let mut out = Vec::new();
            encode_changes(&list, &mut out);
            prop_assert_eq!(decode_changes(&out).unwrap(), list);
        }

        #[test]
        fn scanning_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), cycle in 0u64..3) {
            let (payloads, end) = scan_records(&bytes, cycle);
            prop_assert!(end <= bytes.len());
            for p in payloads {
                let _ = decode_changes(p);
            }
        }
    }
}
