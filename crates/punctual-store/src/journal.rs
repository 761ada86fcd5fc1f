//! The journal of the sequential-write store (docs/storage.md, "Storage v2"): an append-only,
//! CRC32C-checked log of batches in 16 MiB segment files, one `fdatasync` per appended batch.
//!
//! Layout of `DIR/<16 hex digits>.log` (the digits: the sequence number of the segment's first batch):
//!
//! ```text
//! segment header  "PJNL" | version u8 | 3 zero bytes | first batch seq u64 LE        (16 bytes)
//! batch frame     len u32 LE | crc u32 LE | seq u64 LE | records …                  (len bytes after crc)
//! record          kind u8 | len u32 LE | bytes
//! ```
//!
//! `crc` is CRC32C over `len`, `seq` and the records. A batch is written with one `write` and made
//! durable with one `fdatasync` before [`Journal::append`] returns, and the next batch is written only
//! after that, so a crash can damage only the last batch of the last segment:
//! - a damaged last frame (short, zeroed, bad CRC) with nothing valid after it is a torn tail: the file
//!   is truncated there on open, and that batch was never acknowledged;
//! - a damaged frame followed by a valid one, a gap in sequence numbers, or damage in an older segment
//!   is corruption: open fails with the file and offset.
//!
//! A failed `write` (for example ENOSPC) is undone by truncating back to the last good offset and
//! answered [`StoreError::NoSpace`]; the journal stays usable. A failed `fdatasync` poisons the journal:
//! Linux may have dropped the dirty pages and cleared the error, so it can no longer tell what reached
//! the disk, and a retry could report success falsely.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::StoreError;

/// The journal's on-disk format version (bump it with a migration when the layout changes).
pub const JOURNAL_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"PJNL";
const HEADER_BYTES: u64 = 16;
/// `len`, `crc`, `seq`.
const FRAME_HEAD: usize = 16;
/// Largest batch frame; a larger `len` read back is damage, not data.
pub const MAX_BATCH_BYTES: usize = 256 << 20;

/// How the journal behaves.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// A new segment starts once the current one is at least this long.
    pub segment_bytes: u64,
    /// The sequence number of the first batch when the journal has no segment at all (everything
    /// before it was released behind a checkpoint).
    pub first_seq: u64,
    /// Batches before this one are checked (CRC, order) at open but not handed to `replay`, nor
    /// split into records: a checkpoint already covers them.
    pub replay_from: u64,
    /// Test hooks: make the n-th `fdatasync` (0-based) or `write` fail.
    #[doc(hidden)]
    pub fail_sync_at: Option<u64>,
    #[doc(hidden)]
    pub fail_write_at: Option<u64>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            // Whole segments are released behind a checkpoint, so the part of the journal that an
            // open reads and skips is under one segment (the default checkpoint interval is 16 MiB
            // of journal too).
            segment_bytes: 16 << 20,
            first_seq: 1,
            replay_from: 0,
            fail_sync_at: None,
            fail_write_at: None,
        }
    }
}

/// One record of a batch: its kind (the store's record type) and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub bytes: Vec<u8>,
}

/// The append side of the journal.
pub struct Journal {
    dir: PathBuf,
    options: JournalOptions,
    file: File,
    path: PathBuf,
    /// Where the next frame goes in `file`.
    offset: u64,
    next_seq: u64,
    poisoned: Option<String>,
    syncs: u64,
    writes: u64,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:016x}.log")
}

pub(crate) fn io_error(path: &Path, what: &str, error: std::io::Error) -> StoreError {
    if error.raw_os_error() == Some(28) || error.kind() == std::io::ErrorKind::StorageFull {
        StoreError::NoSpace(format!("{what} {}: {error}", path.display()))
    } else {
        StoreError::Storage(format!("{what} {}: {error}", path.display()))
    }
}

fn corrupt(path: &Path, offset: u64, why: &str) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        reason: format!("journal damaged at byte {offset}: {why}"),
    }
}

/// Encodes one batch frame.
fn frame(seq: u64, records: &[Record]) -> Vec<u8> {
    let body: usize = records.iter().map(|r| 5 + r.bytes.len()).sum();
    let len = (8 + body) as u32;
    let mut out = Vec::with_capacity(FRAME_HEAD + body);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    for record in records {
        out.push(record.kind);
        out.extend_from_slice(&(record.bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&record.bytes);
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..4]), &out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Parses the frame at `at` of `data`: `Some((seq, records, end))` if it is whole and its CRC holds.
/// Its records are split out only if its sequence number is at least `split_from` (else `records`
/// is empty).
fn parse_frame(data: &[u8], at: usize, split_from: u64) -> Option<(u64, Vec<Record>, usize)> {
    let head = data.get(at..at + FRAME_HEAD)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    if !(8..=MAX_BATCH_BYTES).contains(&len) {
        return None;
    }
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let end = at + 8 + len;
    let rest = data.get(at + 8..end)?;
    if crc32c::crc32c_append(crc32c::crc32c(&head[..4]), rest) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(rest[..8].try_into().ok()?);
    let mut records = Vec::new();
    let mut pos = if seq >= split_from { 8 } else { rest.len() };
    while pos < rest.len() {
        let kind = *rest.get(pos)?;
        let n = u32::from_le_bytes(rest.get(pos + 1..pos + 5)?.try_into().ok()?) as usize;
        let bytes = rest.get(pos + 5..pos + 5 + n)?.to_vec();
        records.push(Record { kind, bytes });
        pos += 5 + n;
    }
    Some((seq, records, end))
}

/// Whether a valid frame with a sequence number above `after` starts anywhere in `data[from..]`: the
/// difference between a torn tail (nothing valid follows) and damage in the middle.
fn valid_frame_after(data: &[u8], from: usize, after: u64) -> Option<usize> {
    (from..data.len().saturating_sub(FRAME_HEAD - 1))
        .find(|at| parse_frame(data, *at, u64::MAX).is_some_and(|(seq, _, _)| seq > after))
}

/// The journal's segment files, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, "cannot list", e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, "cannot list", e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if let Ok(first) = u64::from_str_radix(stem, 16)
            && stem.len() == 16
        {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "cannot sync directory", e))
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, hands every batch to `replay` in order, truncates a
    /// torn tail, and returns the journal ready to append. Damage anywhere else is an error naming
    /// the file and offset.
    pub fn open(
        dir: &Path,
        options: JournalOptions,
        mut replay: impl FnMut(u64, Vec<Record>) -> Result<(), StoreError>,
    ) -> Result<Journal, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "cannot create", e))?;
        let files = segments(dir)?;
        let mut next_seq = options.first_seq.max(1);
        let mut tail: Option<(PathBuf, u64)> = None;
        for (index, (first, path)) in files.iter().enumerate() {
            let last_segment = index + 1 == files.len();
            let mut data = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(|e| io_error(path, "cannot read", e))?;
            if data.len() < HEADER_BYTES as usize {
                let cut_header = data.iter().all(|b| *b == 0)
                    || MAGIC.starts_with(&data[..data.len().min(MAGIC.len())]);
                if last_segment && cut_header {
                    // Created, then cut before its header was durable: start it again.
                    tail = Some((path.clone(), 0));
                    break;
                }
                return Err(corrupt(path, 0, "shorter than its header"));
            }
            if &data[..4] != MAGIC {
                return Err(corrupt(path, 0, "not a journal segment (bad magic)"));
            }
            if data[4] != JOURNAL_VERSION {
                return Err(StoreError::FormatVersion {
                    path: path.display().to_string(),
                    found: u64::from(data[4]),
                    expected: u64::from(JOURNAL_VERSION),
                });
            }
            let header_seq = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
            if header_seq != *first {
                return Err(corrupt(
                    path,
                    8,
                    &format!("its header says batch {header_seq}, its name {first}"),
                ));
            }
            if index == 0 {
                next_seq = *first;
            } else if *first != next_seq {
                return Err(corrupt(
                    path,
                    8,
                    &format!("starts at batch {first}, expected {next_seq} (a segment is missing)"),
                ));
            }
            let mut at = HEADER_BYTES as usize;
            while at < data.len() {
                match parse_frame(&data, at, options.replay_from) {
                    Some((seq, records, end)) if seq == next_seq => {
                        if seq >= options.replay_from {
                            replay(seq, records)?;
                        }
                        next_seq += 1;
                        at = end;
                    }
                    Some((seq, _, _)) => {
                        return Err(corrupt(
                            path,
                            at as u64,
                            &format!("batch {seq} where {next_seq} was expected"),
                        ));
                    }
                    None => {
                        if let Some(later) =
                            valid_frame_after(&data, at + 1, next_seq.saturating_sub(1))
                        {
                            return Err(corrupt(
                                path,
                                at as u64,
                                &format!(
                                    "a damaged batch with a valid one after it (at byte {later})"
                                ),
                            ));
                        }
                        if !last_segment {
                            return Err(corrupt(
                                path,
                                at as u64,
                                "a damaged batch in a segment that is not the last",
                            ));
                        }
                        break;
                    }
                }
            }
            if last_segment {
                tail = Some((path.clone(), at as u64));
            }
        }
        let mut journal = match tail {
            Some((path, end)) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_error(&path, "cannot open", e))?;
                let len = file
                    .metadata()
                    .map_err(|e| io_error(&path, "cannot stat", e))?
                    .len();
                if end < HEADER_BYTES {
                    // The header itself was cut: rewrite it.
                    file.set_len(0)
                        .map_err(|e| io_error(&path, "cannot truncate", e))?;
                    let first = u64::from_str_radix(
                        path.file_stem().and_then(|s| s.to_str()).unwrap_or("0"),
                        16,
                    )
                    .unwrap_or(next_seq);
                    let mut journal = Journal::with_file(dir, options, file, path, 0, first);
                    journal.write_header(first)?;
                    journal
                } else {
                    if len > end {
                        tracing::warn!(
                            path = %path.display(),
                            kept = end,
                            dropped = len - end,
                            "journal: dropping a torn last batch (it was never acknowledged)"
                        );
                        file.set_len(end)
                            .map_err(|e| io_error(&path, "cannot truncate", e))?;
                        file.sync_all()
                            .map_err(|e| io_error(&path, "cannot sync", e))?;
                    }
                    Journal::with_file(dir, options, file, path, end, next_seq)
                }
            }
            None => {
                let (file, path) = Self::create_segment(dir, next_seq)?;
                let mut journal = Journal::with_file(dir, options, file, path, 0, next_seq);
                journal.write_header(next_seq)?;
                journal
            }
        };
        journal.offset = journal
            .file
            .seek(SeekFrom::Start(journal.offset))
            .map_err(|e| io_error(&journal.path, "cannot seek", e))?;
        Ok(journal)
    }

    fn with_file(
        dir: &Path,
        options: JournalOptions,
        file: File,
        path: PathBuf,
        offset: u64,
        next_seq: u64,
    ) -> Journal {
        Journal {
            dir: dir.to_owned(),
            options,
            file,
            path,
            offset,
            next_seq,
            poisoned: None,
            syncs: 0,
            writes: 0,
        }
    }

    fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, PathBuf), StoreError> {
        let path = dir.join(segment_name(first_seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error(&path, "cannot create", e))?;
        Ok((file, path))
    }

    fn write_header(&mut self, first_seq: u64) -> Result<(), StoreError> {
        let mut header = Vec::with_capacity(HEADER_BYTES as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&[JOURNAL_VERSION, 0, 0, 0]);
        header.extend_from_slice(&first_seq.to_le_bytes());
        self.file
            .write_all(&header)
            .map_err(|e| io_error(&self.path, "cannot write", e))?;
        self.sync()?;
        sync_dir(&self.dir)?;
        self.offset = HEADER_BYTES;
        Ok(())
    }

    /// `fdatasync`, or poison: after a failed one nothing about the file's contents can be trusted.
    fn sync(&mut self) -> Result<(), StoreError> {
        let n = self.syncs;
        self.syncs += 1;
        let result = if self.options.fail_sync_at == Some(n) {
            Err(std::io::Error::other("injected fdatasync failure"))
        } else {
            self.file.sync_data()
        };
        result.map_err(|e| {
            let message = format!("fdatasync of {} failed: {e}", self.path.display());
            self.poisoned = Some(message.clone());
            StoreError::Poisoned(message)
        })
    }

    /// The sequence number the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Why the journal refuses appends, if it does.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Appends one batch and returns once it is durable; answers its sequence number.
    pub fn append(&mut self, records: &[Record]) -> Result<u64, StoreError> {
        if let Some(why) = &self.poisoned {
            return Err(StoreError::Poisoned(why.clone()));
        }
        if self.offset >= self.options.segment_bytes {
            self.rotate()?;
        }
        let seq = self.next_seq;
        let bytes = frame(seq, records);
        if bytes.len() > MAX_BATCH_BYTES {
            return Err(StoreError::Storage(format!(
                "a batch of {} bytes is larger than the journal's {MAX_BATCH_BYTES}",
                bytes.len()
            )));
        }
        let n = self.writes;
        self.writes += 1;
        let written = if self.options.fail_write_at == Some(n) {
            // As a full disk does: part of the batch reached the file.
            let _ = self.file.write_all(&bytes[..bytes.len() / 2]);
            Err(std::io::Error::from_raw_os_error(28))
        } else {
            self.file.write_all(&bytes)
        };
        if let Err(error) = written {
            // Undo what reached the file so the next batch starts at a frame boundary.
            let undone = self
                .file
                .set_len(self.offset)
                .and_then(|()| self.file.seek(SeekFrom::Start(self.offset)).map(|_| ()));
            if let Err(undo) = undone {
                let message = format!(
                    "cannot undo a failed write to {} ({error}): {undo}",
                    self.path.display()
                );
                self.poisoned = Some(message.clone());
                return Err(StoreError::Poisoned(message));
            }
            return Err(io_error(&self.path, "cannot append to", error));
        }
        self.sync()?;
        self.offset += bytes.len() as u64;
        self.next_seq += 1;
        Ok(seq)
    }

    fn rotate(&mut self) -> Result<(), StoreError> {
        let (file, path) = Self::create_segment(&self.dir, self.next_seq)?;
        self.file = file;
        self.path = path;
        self.offset = 0;
        self.write_header(self.next_seq)
    }

    /// Deletes whole segments whose batches all precede `seq` (they are covered by a checkpoint).
    pub fn release_before(&mut self, seq: u64) -> Result<usize, StoreError> {
        release_segments_before(&self.dir, seq)
    }
}

/// [`Journal::release_before`] for the journal in `dir`, from any thread: the segment being
/// appended to is the last and is never removed, and a crash midway leaves the oldest removed
/// first, which recovery skips over the same way.
pub(crate) fn release_segments_before(dir: &Path, seq: u64) -> Result<usize, StoreError> {
    let files = segments(dir)?;
    let mut removed = 0;
    for window in files.windows(2) {
        let (_, path) = &window[0];
        let (next_first, _) = window[1];
        if next_first <= seq {
            std::fs::remove_file(path).map_err(|e| io_error(path, "cannot remove", e))?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "punctual-journal-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn batch(n: u64) -> Vec<Record> {
        (0..1 + n % 5)
            .map(|i| Record {
                kind: (i % 3) as u8,
                bytes: format!("batch {n} record {i} {}", "x".repeat((n * 7 % 50) as usize))
                    .into_bytes(),
            })
            .collect()
    }

    fn read_all(dir: &Path) -> Result<Vec<(u64, Vec<Record>)>, StoreError> {
        let mut seen = Vec::new();
        Journal::open(dir, JournalOptions::default(), |seq, records| {
            seen.push((seq, records));
            Ok(())
        })?;
        Ok(seen)
    }

    /// Writes `batches` batches; answers the journal's one segment file and the file length after
    /// each acknowledged append (the fsync boundaries).
    fn workload(dir: &Path, batches: u64) -> (PathBuf, Vec<u64>) {
        let mut journal = Journal::open(dir, JournalOptions::default(), |_, _| Ok(())).unwrap();
        let mut boundaries = vec![HEADER_BYTES];
        for n in 1..=batches {
            assert_eq!(journal.append(&batch(n)).unwrap(), n);
            boundaries.push(journal.offset);
        }
        (journal.path.clone(), boundaries)
    }

    #[test]
    fn batches_come_back_in_order_across_reopens_and_segments() {
        let dir = temp_dir("order");
        let options = JournalOptions {
            segment_bytes: 300,
            ..JournalOptions::default()
        };
        let mut journal = Journal::open(&dir, options.clone(), |_, _| Ok(())).unwrap();
        for n in 1..=20 {
            journal.append(&batch(n)).unwrap();
        }
        drop(journal);
        assert!(segments(&dir).unwrap().len() > 3, "it rotated");
        let mut journal = Journal::open(&dir, options, |_, _| Ok(())).unwrap();
        assert_eq!(journal.next_seq(), 21);
        journal.append(&batch(21)).unwrap();
        let seen = read_all(&dir).unwrap();
        assert_eq!(seen.len(), 21);
        for (i, (seq, records)) in seen.iter().enumerate() {
            assert_eq!((*seq, records), (i as u64 + 1, &batch(i as u64 + 1)));
        }
        // Segments wholly before batch 15 go; the rest stays readable.
        let mut journal = Journal::open(&dir, JournalOptions::default(), |_, _| Ok(())).unwrap();
        assert!(journal.release_before(15).unwrap() > 0);
        let left = read_all(&dir).unwrap();
        assert!(
            left.first().unwrap().0 <= 15 && left.last().unwrap().0 == 21,
            "{:?}",
            left.iter().map(|b| b.0).collect::<Vec<_>>()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The crash images: the journal cut at every fsync boundary and at every byte offset (a torn
    /// tail), and with a zeroed tail. Everything acknowledged before the cut is there; nothing is
    /// invented; the journal appends again after the cut.
    #[test]
    fn every_cut_keeps_exactly_the_batches_before_it() {
        let dir = temp_dir("cuts");
        let (path, boundaries) = workload(&dir, 12);
        let image = std::fs::read(&path).unwrap();
        for cut in HEADER_BYTES as usize..=image.len() {
            let case = temp_dir("cut");
            std::fs::create_dir_all(&case).unwrap();
            let file = case.join(path.file_name().unwrap());
            std::fs::write(&file, &image[..cut]).unwrap();
            let whole = boundaries.iter().filter(|b| **b as usize <= cut).count() as u64 - 1;
            let seen = read_all(&case).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(seen.len() as u64, whole, "cut at {cut}");
            assert!(
                seen.iter()
                    .enumerate()
                    .all(|(i, (s, r))| *s == i as u64 + 1 && *r == batch(i as u64 + 1))
            );
            // It appends after the cut, and that batch reads back.
            let mut journal =
                Journal::open(&case, JournalOptions::default(), |_, _| Ok(())).unwrap();
            assert_eq!(journal.append(&batch(99)).unwrap(), whole + 1);
            assert_eq!(
                read_all(&case).unwrap().len() as u64,
                whole + 1,
                "cut at {cut}"
            );
            let _ = std::fs::remove_dir_all(&case);
        }
        // A zeroed tail (the file grew, its last pages never reached the disk).
        for zeroed in [1usize, 7, 100, 4096] {
            let case = temp_dir("zero");
            std::fs::create_dir_all(&case).unwrap();
            let mut bytes = image.clone();
            let keep = boundaries[9] as usize;
            bytes.truncate(keep);
            bytes.extend(std::iter::repeat_n(0u8, zeroed));
            std::fs::write(case.join(path.file_name().unwrap()), &bytes).unwrap();
            assert_eq!(read_all(&case).unwrap().len(), 9, "zeroed {zeroed}");
            let _ = std::fs::remove_dir_all(&case);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A flipped byte in an acknowledged batch that has others after it is damage, not a torn tail:
    /// open fails and names the file and the offset.
    #[test]
    fn damage_in_the_middle_is_an_error_naming_file_and_offset() {
        let dir = temp_dir("flip");
        let (path, boundaries) = workload(&dir, 12);
        let image = std::fs::read(&path).unwrap();
        for batch_index in 0..11 {
            for within in [0usize, 3, 9, 20] {
                let at = boundaries[batch_index] as usize + within;
                if at >= boundaries[batch_index + 1] as usize {
                    continue;
                }
                let case = temp_dir("flipcase");
                std::fs::create_dir_all(&case).unwrap();
                let mut bytes = image.clone();
                bytes[at] ^= 0x40;
                std::fs::write(case.join(path.file_name().unwrap()), &bytes).unwrap();
                let error = read_all(&case)
                    .expect_err(&format!("flip at {at}"))
                    .to_string();
                assert!(
                    error.contains(&path.file_name().unwrap().to_string_lossy().to_string()),
                    "{error}"
                );
                assert!(
                    error.contains(&format!("byte {}", boundaries[batch_index])),
                    "flip at {at}: {error}"
                );
                let _ = std::fs::remove_dir_all(&case);
            }
        }
        // A damaged older segment is an error even at its end.
        let dir2 = temp_dir("oldseg");
        let options = JournalOptions {
            segment_bytes: 200,
            ..JournalOptions::default()
        };
        let mut journal = Journal::open(&dir2, options, |_, _| Ok(())).unwrap();
        for n in 1..=10 {
            journal.append(&batch(n)).unwrap();
        }
        drop(journal);
        let first = segments(&dir2).unwrap()[0].1.clone();
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&first, &bytes).unwrap();
        assert!(read_all(&dir2).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }

    /// Batches before `replay_from` (those a checkpoint covers) are not handed to `replay`, but they
    /// are still checked: damage among them is an error, as anywhere else.
    #[test]
    fn batches_before_replay_from_are_checked_but_not_replayed() {
        let dir = temp_dir("from");
        let (path, boundaries) = workload(&dir, 12);
        let options = JournalOptions {
            replay_from: 8,
            ..JournalOptions::default()
        };
        let open = |dir: &Path| {
            let mut seen = Vec::new();
            let journal = Journal::open(dir, options.clone(), |seq, records| {
                seen.push((seq, records));
                Ok(())
            })?;
            Ok::<_, StoreError>((seen, journal.next_seq()))
        };
        let (seen, next) = open(&dir).unwrap();
        assert_eq!(next, 13);
        assert_eq!(seen, (8..=12).map(|n| (n, batch(n))).collect::<Vec<_>>());
        // A flipped byte in batch 3 (skipped) with valid batches after it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[boundaries[2] as usize + 20] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let error = open(&dir)
            .expect_err("damage in a skipped batch")
            .to_string();
        assert!(
            error.contains(&format!("byte {}", boundaries[2])),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_fsync_poisons_and_a_failed_write_is_undone() {
        let dir = temp_dir("faults");
        // Sync 0 is the header's; sync 3 is the third batch's.
        let options = JournalOptions {
            fail_sync_at: Some(3),
            fail_write_at: Some(1),
            ..JournalOptions::default()
        };
        let mut journal = Journal::open(&dir, options, |_, _| Ok(())).unwrap();
        assert_eq!(journal.append(&batch(1)).unwrap(), 1);
        // Write 1 fails as a full disk does: refused, nothing kept, the journal goes on.
        assert!(matches!(
            journal.append(&batch(2)),
            Err(StoreError::NoSpace(_))
        ));
        assert_eq!(journal.append(&batch(2)).unwrap(), 2);
        // Its fsync fails: poisoned, and it stays so.
        assert!(matches!(
            journal.append(&batch(3)),
            Err(StoreError::Poisoned(_))
        ));
        assert!(journal.poisoned().unwrap().contains("fdatasync"));
        assert!(matches!(
            journal.append(&batch(4)),
            Err(StoreError::Poisoned(_))
        ));
        drop(journal);
        let seen = read_all(&dir).unwrap();
        // Batch 3 was never acknowledged; it may or may not be there, but 1 and 2 are, intact.
        assert!(seen.len() >= 2);
        assert_eq!(seen[1], (2, batch(2)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
