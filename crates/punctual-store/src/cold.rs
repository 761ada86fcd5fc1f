//! The cold tier of the journal store (docs/storage.md, "Storage v2"): scheduled tasks due beyond the
//! load horizon live in append-only, time-sliced files, not in memory; memory holds only the compact
//! [`IdTable`] entry of each (7 bytes a slot) and a small directory of chunks.
//!
//! Slices come in three levels of width (by default 1 minute up to 2 hours ahead, 1 hour up to 3
//! days, 1 day beyond). Three boundaries, which only move forward, split time into regions:
//! tasks due before `loaded` are hot (in the engine's memory), those before `b1` are in level-1
//! slices, before `b2` in level-2 slices, the rest in level-3 slices. When a boundary moves past a
//! slice's start, the slice is read once, sequentially, and each live task is placed again: into a
//! finer slice, or into memory. So a task is copied at most once per level, and nothing far off is
//! in RAM.
//!
//! A slice is two files, `<level>-<start>-<generation>.slice` and `.keys`:
//! - the `.slice` file holds the tasks' records, each `len u32 | crc u32 | bytes` (CRC32C over the
//!   bytes: the key, then the record in the stored format of `codec.rs`);
//! - the `.keys` file holds 8 bytes per change, `fingerprint u32 | word u32`: for a put the record's
//!   length in the `.slice` file; for a removal `1 << 31 | the put's ordinal in the slice`.
//!
//! Consecutive records of a slice form chunks of at most [`CHUNK_RECORDS`] records and [`CHUNK_BYTES`]
//! bytes; a location in the id table is `chunk << 8 | record within the chunk`, so it names one
//! record exactly, and a lookup reads one chunk. A record is live while the id table holds its
//! location: cancel and reschedule remove the entry and append a removal to the `.keys` file, nothing
//! is rewritten. Opening from a checkpoint rebuilds the id table from the `.keys` files alone (8 bytes
//! per change), never reading the records.
//!
//! Slice files are written without `fdatasync`; the journal covers them until a checkpoint has
//! synced them (on its own thread, from a [`Cold::snapshot`]) and recorded their lengths. Recovery
//! cuts every file back to the length its checkpoint recorded and deletes files the checkpoint does
//! not name, so what remains is exactly the state the checkpoint describes; the journal after it is
//! replayed on top. A file the boundaries emptied is deleted only once a checkpoint taken after it
//! was emptied is installed (the ones before still name it), and generations keep a new file from
//! ever taking an old one's name.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use punctual_core::{Task, TaskState};

use crate::idtable::{Entries, IdTable, LOC_BITS, fingerprint};
use crate::journal::io_error;
use crate::{Buckets, DueCursor, StoreError, codec};

/// Most records in one chunk (the low 8 bits of a location).
pub const CHUNK_RECORDS: u32 = 256;
/// A chunk closes once it holds this many bytes, so a lookup reads at most about this much.
pub const CHUNK_BYTES: u64 = 256 << 10;
/// Most chunks at once (the high bits of a location).
pub const MAX_CHUNKS: u32 = 1 << (LOC_BITS - 8);
/// A file's buffered bytes are written once they reach this many.
const FLUSH_BYTES: usize = 16 << 10;
/// A `.keys` word with this bit names a removal.
const REMOVED: u32 = 1 << 31;

/// The widths and reach of the slice levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceGeometry {
    /// Tasks due within this long (rounded up to a level-1 slice) are kept in memory.
    pub load_ahead_ms: u64,
    /// Slice width per level; each must divide the next.
    pub widths_ms: [u64; 3],
    /// Level 1 reaches this far ahead (rounded up to a level-2 slice), level 2 this far (rounded up
    /// to a level-3 slice).
    pub reach_ms: [u64; 2],
}

impl Default for SliceGeometry {
    fn default() -> Self {
        SliceGeometry {
            load_ahead_ms: 60_000,
            widths_ms: [60_000, 3_600_000, 86_400_000],
            reach_ms: [2 * 3_600_000, 3 * 86_400_000],
        }
    }
}

impl SliceGeometry {
    pub(crate) fn check(&self) -> Result<(), String> {
        let [w1, w2, w3] = self.widths_ms;
        if w1 == 0 || w2 % w1 != 0 || w3 % w2 != 0 {
            return Err(format!(
                "slice widths {:?} must be non-zero and each divide the next",
                self.widths_ms
            ));
        }
        if self.load_ahead_ms > self.reach_ms[0] || self.reach_ms[0] > self.reach_ms[1] {
            return Err("the load horizon and the levels' reach must grow".into());
        }
        Ok(())
    }
}

fn align_up(ms: u64, width: u64) -> u64 {
    ms.div_ceil(width).saturating_mul(width)
}

/// A slice: its start and level (0-based), in time order.
type SliceKey = (u64, u8);

/// Cold tasks by queue, then per level by the start of their due time's cell.
pub(crate) type Cells = BTreeMap<String, [BTreeMap<u64, u64>; 3]>;

/// Cells per slice of each level, when they divide its width: by default 1 s cells in 1-minute
/// slices, 1-minute cells in 1-hour slices, 1-hour cells in 1-day slices.
const CELLS_PER_SLICE: [u64; 3] = [60, 60, 24];

/// One append-only file with a write buffer.
struct Stream {
    path: PathBuf,
    file: Option<File>,
    /// Bytes in the file.
    flushed: u64,
    /// Bytes known durable (synced by a checkpoint, or found at open).
    synced: u64,
    buf: Vec<u8>,
}

impl Stream {
    fn new(path: PathBuf) -> Stream {
        Stream {
            path,
            file: None,
            flushed: 0,
            synced: 0,
            buf: Vec::new(),
        }
    }

    fn len(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    /// Bytes `[start, end)` (file, then buffer).
    fn read(&self, start: u64, end: u64) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity((end - start) as usize);
        if start < self.flushed {
            let upto = end.min(self.flushed);
            out.resize((upto - start) as usize, 0);
            let file = self.file.as_ref().ok_or_else(|| {
                StoreError::Storage(format!("{} is not open", self.path.display()))
            })?;
            file.read_exact_at(&mut out, start)
                .map_err(|e| io_error(&self.path, "cannot read", e))?;
        }
        if end > self.flushed {
            let from = (start.max(self.flushed) - self.flushed) as usize;
            let to = (end - self.flushed) as usize;
            out.extend_from_slice(&self.buf[from..to]);
        }
        Ok(out)
    }

    /// Writes the buffer; true if this created the file. A failed write leaves the buffer whole, to
    /// be written again at the same offset.
    fn flush(&mut self) -> Result<bool, StoreError> {
        if self.buf.is_empty() {
            return Ok(false);
        }
        let mut created = false;
        if self.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(|e| io_error(&self.path, "cannot create", e))?;
            self.file = Some(file);
            created = true;
        }
        let file = self.file.as_ref().expect("opened above");
        file.write_all_at(&self.buf, self.flushed)
            .map_err(|e| io_error(&self.path, "cannot write", e))?;
        self.flushed += self.buf.len() as u64;
        self.buf.clear();
        Ok(created)
    }

    /// Opens an existing file at the length a checkpoint recorded, cutting off what came after.
    fn reopen(path: PathBuf, len: u64) -> Result<Stream, StoreError> {
        let mut stream = Stream::new(path);
        if len == 0 {
            let _ = std::fs::remove_file(&stream.path);
            return Ok(stream);
        }
        let damaged = |why: String| StoreError::Open {
            path: stream.path.display().to_string(),
            reason: why,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&stream.path)
            .map_err(|e| damaged(format!("a file the checkpoint names: {e}")))?;
        let actual = file.metadata().map_err(|e| damaged(e.to_string()))?.len();
        if actual < len {
            return Err(damaged(format!(
                "{actual} bytes, shorter than the {len} its checkpoint synced"
            )));
        }
        if actual > len {
            file.set_len(len)
                .map_err(|e| damaged(format!("cannot cut back to {len} bytes: {e}")))?;
        }
        stream.file = Some(file);
        stream.flushed = len;
        stream.synced = len;
        Ok(stream)
    }
}

struct Slice {
    generation: u64,
    data: Stream,
    keys: Stream,
    /// This slice's chunks, in order; the last is the one being filled.
    chunks: Vec<u32>,
    /// Puts appended so far: a removal names its put by ordinal.
    records: u32,
}

#[derive(Clone, Copy)]
struct Chunk {
    slice: SliceKey,
    start: u64,
    end: u64,
    records: u32,
    /// Ordinal in its slice of the chunk's first record.
    first: u32,
}

impl Chunk {
    /// Whether another record may join this chunk (the rule appends and recovery share).
    fn has_room(&self) -> bool {
        self.records < CHUNK_RECORDS && self.end - self.start < CHUNK_BYTES
    }
}

/// Where a placed task goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Hot,
    Slice(SliceKey),
}

/// The records of a chunk, parsed, with their stored checksums; each checked only if `verify` (a
/// lookup checks just the record it takes).
fn parse_records(data: &[u8], verify: bool) -> Result<Vec<(u32, &[u8])>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let head = data
            .get(at..at + 8)
            .ok_or_else(|| format!("record cut at byte {at}"))?;
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let body = data
            .get(at + 8..at + 8 + len)
            .ok_or_else(|| format!("record of {len} bytes cut at byte {at}"))?;
        if verify && crc32c::crc32c(body) != crc {
            return Err(format!("bad checksum at byte {at}"));
        }
        out.push((crc, body));
        at += 8 + len;
    }
    Ok(out)
}

/// The little-endian `u64` at `*at` of `bytes`, advancing `at`; `None` if it is cut (the checkpoint
/// file's fields).
pub(crate) fn read_u64(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let v = u64::from_le_bytes(bytes.get(*at..*at + 8)?.try_into().ok()?);
    *at += 8;
    Some(v)
}

/// One record of a chunk: its location, queue, id and stored value.
pub(crate) type Parsed<'a> = (u32, String, String, &'a [u8]);

/// The records of chunk `chunk_id` as [`Cold::chunk_data`] read them, checked: each record's location,
/// queue, id and stored value (decode it with `codec::decode`). Live or not: ask [`Cold::is_live`].
pub(crate) fn parse_chunk(chunk_id: u32, data: &[u8]) -> Result<Vec<Parsed<'_>>, String> {
    let mut out = Vec::new();
    for (index, (_, bytes)) in parse_records(data, true)?.into_iter().enumerate() {
        let (q, i, value) =
            crate::journal_store::split_key(bytes).ok_or_else(|| "a bad key".to_owned())?;
        out.push(((chunk_id << 8) | index as u32, q, i, value));
    }
    Ok(out)
}

/// What a checkpoint records of the cold tier: the boundaries and every slice's synced lengths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ColdCheckpoint {
    pub loaded: u64,
    pub b1: u64,
    pub b2: u64,
    pub next_generation: u64,
    /// (start, level, generation, data bytes, keys bytes).
    pub slices: Vec<(u64, u8, u64, u64, u64)>,
}

impl ColdCheckpoint {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.loaded, self.b1, self.b2, self.next_generation] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.slices.len() as u64).to_le_bytes());
        for (start, level, generation, data, keys) in &self.slices {
            out.extend_from_slice(&start.to_le_bytes());
            out.push(*level);
            for v in [*generation, *data, *keys] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// Decodes from `bytes` at `*at`, advancing it.
    pub(crate) fn decode(bytes: &[u8], at: &mut usize) -> Option<ColdCheckpoint> {
        let u64_at = |at: &mut usize| read_u64(bytes, at);
        let loaded = u64_at(at)?;
        let b1 = u64_at(at)?;
        let b2 = u64_at(at)?;
        let next_generation = u64_at(at)?;
        let n = u64_at(at)?;
        let mut slices = Vec::new();
        for _ in 0..n {
            let start = u64_at(at)?;
            let level = *bytes.get(*at)?;
            *at += 1;
            slices.push((start, level, u64_at(at)?, u64_at(at)?, u64_at(at)?));
        }
        Some(ColdCheckpoint {
            loaded,
            b1,
            b2,
            next_generation,
            slices,
        })
    }
}

/// What a checkpoint takes of the cold tier ([`Cold::snapshot`]).
pub(crate) struct ColdSnapshot {
    /// What the checkpoint records.
    pub record: ColdCheckpoint,
    /// Files with bytes written since the last checkpoint (handles of their own, so the writer may
    /// go on appending or drop the slice meanwhile).
    files: Vec<(PathBuf, File)>,
    /// The directory, when a file was created in it since the last checkpoint.
    sync_dir: Option<PathBuf>,
    /// Files of slices dropped before the snapshot: deleted once the checkpoint is installed.
    doomed: Vec<PathBuf>,
    doomed_bytes: u64,
}

impl ColdSnapshot {
    /// Removes the files doomed before the snapshot, once a checkpoint made from it is installed:
    /// no checkpoint names them now. Runs on the checkpoint's thread (unlinking a large file can
    /// take milliseconds).
    pub(crate) fn remove_doomed(&self) {
        for path in &self.doomed {
            if let Err(error) = std::fs::remove_file(path) {
                tracing::warn!(%error, path = %path.display(), "cannot remove a slice file");
            }
        }
    }

    /// Makes the recorded lengths durable; runs on the checkpoint's thread. A failure is final: the
    /// caller poisons the store.
    pub(crate) fn sync(&self) -> Result<(), String> {
        for (path, file) in &self.files {
            file.sync_data()
                .map_err(|e| format!("fdatasync {} failed: {e}", path.display()))?;
        }
        if let Some(dir) = &self.sync_dir {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
        }
        Ok(())
    }
}

/// The cold tier; see the module documentation.
pub(crate) struct Cold {
    dir: PathBuf,
    geometry: SliceGeometry,
    /// Tasks due before this are in memory.
    loaded: u64,
    /// Level-1 slices hold tasks due before this; level-2 before `b2`.
    b1: u64,
    b2: u64,
    next_generation: u64,
    slices: BTreeMap<SliceKey, Slice>,
    chunks: Vec<Option<Chunk>>,
    free_chunks: Vec<u32>,
    ids: IdTable,
    /// Files of dropped slices, deleted after the next checkpoint, and their bytes.
    doomed: Vec<PathBuf>,
    doomed_bytes: u64,
    /// A file was created since the last checkpoint: the directory needs a sync.
    created: bool,
    /// Bytes written to slice files, in total.
    written: u64,
    /// Cold tasks (all scheduled) by queue: a checkpoint records them, because the `.keys` files
    /// it is rebuilt from name no queues.
    queues: BTreeMap<String, i64>,
    /// Cold tasks counted by queue, level and cell of due time, for [`Cold::timeline`]: what the
    /// dashboard's timeline reads instead of the slices. Keyed by each cell's start.
    cells: Cells,
    /// While a checkpoint is being encoded: the tasks that left this tier since its snapshot. The
    /// snapshot's slices still hold them, so the checkpoint must not hold them as hot tasks too.
    given: Option<HashSet<(String, String)>>,
}

impl Cold {
    /// Opens the cold tier in `dir`: empty (whatever was there is removed, because the journal will
    /// be replayed from its start) without a checkpoint, else exactly the state `checkpoint` records.
    pub(crate) fn open(
        dir: &Path,
        geometry: SliceGeometry,
        checkpoint: Option<&ColdCheckpoint>,
        now_ms: u64,
    ) -> Result<Cold, StoreError> {
        geometry.check().map_err(StoreError::Storage)?;
        let open_error = |e: std::io::Error| StoreError::Open {
            path: dir.display().to_string(),
            reason: e.to_string(),
        };
        if checkpoint.is_none() && dir.exists() {
            std::fs::remove_dir_all(dir).map_err(open_error)?;
        }
        std::fs::create_dir_all(dir).map_err(open_error)?;
        let mut cold = Cold {
            dir: dir.to_owned(),
            geometry,
            loaded: 0,
            b1: 0,
            b2: 0,
            next_generation: 1,
            slices: BTreeMap::new(),
            chunks: Vec::new(),
            free_chunks: Vec::new(),
            ids: IdTable::default(),
            doomed: Vec::new(),
            doomed_bytes: 0,
            created: false,
            written: 0,
            queues: BTreeMap::new(),
            cells: BTreeMap::new(),
            given: None,
        };
        match checkpoint {
            // The checkpoint's boundaries stand until the first `advance`, which moves them to now
            // and places again the slices they pass (moving them here would skip that).
            Some(checkpoint) => cold.restore(checkpoint)?,
            None => {
                cold.set_boundaries(now_ms);
            }
        }
        Ok(cold)
    }

    fn stem(&self, key: SliceKey, generation: u64) -> PathBuf {
        self.dir
            .join(format!("{}-{:016x}-{generation:08x}", key.1 + 1, key.0))
    }

    fn restore(&mut self, checkpoint: &ColdCheckpoint) -> Result<(), StoreError> {
        self.loaded = checkpoint.loaded;
        self.b1 = checkpoint.b1;
        self.b2 = checkpoint.b2;
        self.next_generation = checkpoint.next_generation;
        let mut named = BTreeSet::new();
        for &(start, level, generation, data_len, keys_len) in &checkpoint.slices {
            let key = (start, level);
            let stem = self.stem(key, generation);
            let data = Stream::reopen(stem.with_extension("slice"), data_len)?;
            let keys = Stream::reopen(stem.with_extension("keys"), keys_len)?;
            named.insert(data.path.clone());
            named.insert(keys.path.clone());
            self.slices.insert(
                key,
                Slice {
                    generation,
                    data,
                    keys,
                    chunks: Vec::new(),
                    records: 0,
                },
            );
        }
        // Whatever the checkpoint does not name came after it (or was doomed by it): remove it.
        for entry in
            std::fs::read_dir(&self.dir).map_err(|e| io_error(&self.dir, "cannot list", e))?
        {
            let path = entry
                .map_err(|e| io_error(&self.dir, "cannot list", e))?
                .path();
            if !named.contains(&path) {
                std::fs::remove_file(&path).map_err(|e| io_error(&path, "cannot remove", e))?;
            }
        }
        // Sized once and each `.keys` file read only while its slice is rebuilt: fresh memory is
        // what recovery at 10 M pending spent most of its time on (the kernel zeroing new pages).
        // Every 8-byte `.keys` entry is a put or a removal: their count bounds the live entries.
        let at_most: u64 = checkpoint.slices.iter().map(|s| s.4 / 8).sum();
        let mut entries = Entries::with_capacity(at_most as usize);
        for &(start, level, _, _, keys_len) in &checkpoint.slices {
            let key = (start, level);
            let bytes = self.slices[&key].keys.read(0, keys_len)?;
            self.rebuild_slice(key, &bytes, &mut entries)?;
        }
        self.ids = IdTable::from_entries(entries);
        Ok(())
    }

    /// Rebuilds one slice's chunks from its `.keys` file, adding its live entries to `entries`
    /// (`fingerprint << LOC_BITS | location`).
    fn rebuild_slice(
        &mut self,
        key: SliceKey,
        keys: &[u8],
        entries: &mut Entries,
    ) -> Result<(), StoreError> {
        let path = self.slices[&key].keys.path.clone();
        let damaged = |why: String| StoreError::Open {
            path: path.display().to_string(),
            reason: why,
        };
        if !keys.len().is_multiple_of(8) {
            return Err(damaged(format!("{} bytes, not whole entries", keys.len())));
        }
        let mut pos = 0u64;
        // By ordinal: `fingerprint << LOC_BITS | location`, or 0 once removed.
        let mut puts: Vec<u64> = Vec::new();
        // The chunks, cut by the same rule as `place_record`, kept here instead of looked up.
        let mut chunk_ids: Vec<u32> = Vec::new();
        let mut open: Option<Chunk> = None;
        let mut open_id = 0u32;
        for (n, entry) in keys.chunks_exact(8).enumerate() {
            let fp = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes"));
            let word = u32::from_le_bytes(entry[4..].try_into().expect("4 bytes"));
            if word & REMOVED == 0 {
                if !open.is_some_and(|c| c.has_room()) {
                    if let Some(done) = open.take() {
                        self.chunks[open_id as usize] = Some(done);
                    }
                    if self.chunks.len() >= MAX_CHUNKS as usize {
                        return Err(damaged(format!(
                            "more than the {MAX_CHUNKS} chunks the cold tier can address"
                        )));
                    }
                    open_id = self.chunks.len() as u32;
                    self.chunks.push(None);
                    chunk_ids.push(open_id);
                    open = Some(Chunk {
                        slice: key,
                        start: pos,
                        end: pos,
                        records: 0,
                        first: puts.len() as u32,
                    });
                }
                let chunk = open.as_mut().expect("opened above");
                let index = chunk.records;
                chunk.records += 1;
                pos += u64::from(word);
                chunk.end = pos;
                puts.push((u64::from(fp) << LOC_BITS) | u64::from((open_id << 8) | index));
            } else {
                let ordinal = (word & !REMOVED) as usize;
                match puts.get_mut(ordinal) {
                    Some(put) if *put >> LOC_BITS == u64::from(fp) => *put = 0,
                    Some(0) => return Err(damaged(format!("entry {n} removes a record twice"))),
                    _ => return Err(damaged(format!("entry {n} removes a record not there"))),
                }
            }
        }
        if let Some(done) = open {
            self.chunks[open_id as usize] = Some(done);
        }
        let slice = self.slices.get_mut(&key).expect("restored");
        slice.chunks = chunk_ids;
        slice.records = puts.len() as u32;
        for put in puts.into_iter().filter(|p| *p != 0) {
            entries.push(put);
        }
        let data_len = self.slices[&key].data.len();
        if pos != data_len {
            return Err(damaged(format!(
                "its records add up to {pos} bytes, its .slice file holds {data_len}"
            )));
        }
        Ok(())
    }

    /// Moves the boundaries forward for `now_ms`; true if any moved.
    fn set_boundaries(&mut self, now_ms: u64) -> bool {
        let g = &self.geometry;
        let loaded = align_up(now_ms.saturating_add(g.load_ahead_ms), g.widths_ms[0]);
        let b1 = align_up(now_ms.saturating_add(g.reach_ms[0]), g.widths_ms[1]).max(loaded);
        let b2 = align_up(now_ms.saturating_add(g.reach_ms[1]), g.widths_ms[2]).max(b1);
        let moved = loaded > self.loaded || b1 > self.b1 || b2 > self.b2;
        self.loaded = self.loaded.max(loaded);
        self.b1 = self.b1.max(b1);
        self.b2 = self.b2.max(b2);
        moved
    }

    /// Tasks due before this are in memory.
    pub(crate) fn loaded(&self) -> u64 {
        self.loaded
    }

    /// Whether `task` belongs in the cold tier.
    pub(crate) fn is_cold(&self, task: &Task) -> bool {
        task.state == TaskState::Scheduled && task.run_at_ms >= self.loaded
    }

    fn place(&self, due_ms: u64) -> Place {
        let g = &self.geometry;
        let (level, width) = if due_ms < self.loaded {
            return Place::Hot;
        } else if due_ms < self.b1 {
            (0, g.widths_ms[0])
        } else if due_ms < self.b2 {
            (1, g.widths_ms[1])
        } else {
            (2, g.widths_ms[2])
        };
        Place::Slice((due_ms / width * width, level))
    }

    /// Live cold tasks.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Bytes of memory the id table and the chunk directory take.
    pub(crate) fn index_bytes(&self) -> usize {
        self.ids.bytes() + self.chunks.capacity() * std::mem::size_of::<Option<Chunk>>()
    }

    pub(crate) fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The slice `key`, created if needed.
    fn slice_mut(&mut self, key: SliceKey) -> &mut Slice {
        if !self.slices.contains_key(&key) {
            let generation = self.next_generation;
            self.next_generation += 1;
            let stem = self.stem(key, generation);
            self.slices.insert(
                key,
                Slice {
                    generation,
                    data: Stream::new(stem.with_extension("slice")),
                    keys: Stream::new(stem.with_extension("keys")),
                    chunks: Vec::new(),
                    records: 0,
                },
            );
        }
        self.slices.get_mut(&key).expect("inserted above")
    }

    /// The chunk and index a new record at byte `pos` of slice `key` gets.
    fn place_record(&mut self, key: SliceKey, pos: u64) -> Result<(u32, u32), StoreError> {
        let open_chunk = self.slices[&key].chunks.last().copied().filter(|c| {
            self.chunks[*c as usize]
                .expect("a slice's chunks are allocated")
                .has_room()
        });
        let chunk_id = match open_chunk {
            Some(c) => c,
            None => {
                let chunk = Chunk {
                    slice: key,
                    start: pos,
                    end: pos,
                    records: 0,
                    first: self.slices[&key].records,
                };
                let id = match self.free_chunks.pop() {
                    Some(id) => {
                        self.chunks[id as usize] = Some(chunk);
                        id
                    }
                    None if self.chunks.len() < MAX_CHUNKS as usize => {
                        self.chunks.push(Some(chunk));
                        (self.chunks.len() - 1) as u32
                    }
                    None => {
                        return Err(StoreError::Storage(format!(
                            "the cold tier's chunk directory is full ({MAX_CHUNKS} chunks)"
                        )));
                    }
                };
                self.slices.get_mut(&key).expect("exists").chunks.push(id);
                id
            }
        };
        let chunk = self.chunks[chunk_id as usize]
            .as_mut()
            .expect("allocated above");
        let index = chunk.records;
        chunk.records += 1;
        Ok((chunk_id, index))
    }

    fn flush_if_full(stream: &mut Stream, created: &mut bool) {
        if stream.buf.len() >= FLUSH_BYTES {
            match stream.flush() {
                Ok(new) => *created |= new,
                // The bytes stay buffered and are written with the next flush; the journal has them.
                Err(error) => {
                    tracing::warn!(%error, "cannot write a slice file yet; keeping it in memory")
                }
            }
        }
    }

    /// Adds a cold task (the caller checked [`Cold::is_cold`]); `encoded` is its put's bytes when
    /// the caller has them already.
    pub(crate) fn insert(&mut self, task: &Task, encoded: Option<&[u8]>) -> Result<(), StoreError> {
        let Place::Slice(key) = self.place(task.run_at_ms) else {
            return Err(StoreError::Storage(format!(
                "{}/{} is not cold",
                task.queue, task.id
            )));
        };
        let owned;
        let bytes = match encoded {
            Some(bytes) => bytes,
            None => {
                owned = crate::journal_store::put_bytes(task);
                &owned
            }
        };
        let fp = fingerprint(&task.queue, &task.id);
        let pos = self.slice_mut(key).data.len();
        let (chunk_id, index) = self.place_record(key, pos)?;
        let record_len = 8 + bytes.len() as u64;
        let slice = self.slices.get_mut(&key).expect("created above");
        slice
            .data
            .buf
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        slice
            .data
            .buf
            .extend_from_slice(&crc32c::crc32c(bytes).to_le_bytes());
        slice.data.buf.extend_from_slice(bytes);
        slice.keys.buf.extend_from_slice(&fp.to_le_bytes());
        slice
            .keys
            .buf
            .extend_from_slice(&(record_len as u32).to_le_bytes());
        slice.records += 1;
        self.written += record_len + 8;
        Self::flush_if_full(&mut slice.data, &mut self.created);
        Self::flush_if_full(&mut slice.keys, &mut self.created);
        let chunk = self.chunks[chunk_id as usize]
            .as_mut()
            .expect("placed above");
        chunk.end = pos + record_len;
        self.ids.insert(fp, (chunk_id << 8) | index);
        match self.queues.get_mut(&task.queue) {
            Some(n) => *n += 1,
            None => {
                self.queues.insert(task.queue.clone(), 1);
            }
        }
        let cell = self.cell_of(key.1, task.run_at_ms);
        let levels = match self.cells.get_mut(&task.queue) {
            Some(levels) => levels,
            None => self.cells.entry(task.queue.clone()).or_default(),
        };
        *levels[key.1 as usize].entry(cell).or_default() += 1;
        Ok(())
    }

    /// Removes the cold task at `loc`, due at `due_ms` (as found by [`Cold::find`]).
    pub(crate) fn remove(
        &mut self,
        queue: &str,
        id: &str,
        loc: u32,
        due_ms: u64,
    ) -> Result<(), StoreError> {
        let fp = fingerprint(queue, id);
        if !self.ids.remove(fp, loc) {
            return Ok(());
        }
        let chunk = self.chunks[(loc >> 8) as usize].expect("a live location's chunk");
        self.gave(queue, id, chunk.slice.1, due_ms);
        let ordinal = chunk.first + (loc & 0xff);
        let slice = self.slices.get_mut(&chunk.slice).expect("a chunk's slice");
        slice.keys.buf.extend_from_slice(&fp.to_le_bytes());
        slice
            .keys
            .buf
            .extend_from_slice(&(REMOVED | ordinal).to_le_bytes());
        self.written += 8;
        Self::flush_if_full(&mut slice.keys, &mut self.created);
        Ok(())
    }

    fn chunk_records(&self, chunk_id: u32) -> Result<Vec<u8>, StoreError> {
        let chunk = self.chunks[chunk_id as usize]
            .ok_or_else(|| StoreError::Storage(format!("chunk {chunk_id} is not allocated")))?;
        self.slices[&chunk.slice].data.read(chunk.start, chunk.end)
    }

    fn damaged(&self, chunk_id: u32, why: String) -> StoreError {
        let path = self.chunks[chunk_id as usize]
            .and_then(|c| self.slices.get(&c.slice))
            .map_or_else(|| self.dir.clone(), |s| s.data.path.clone());
        StoreError::Storage(format!("slice file {} damaged: {why}", path.display()))
    }

    /// The live cold task `queue`/`id` and its location, if there is one.
    pub(crate) fn find(&self, queue: &str, id: &str) -> Result<Option<(u32, Task)>, StoreError> {
        let candidates = self.ids.candidates(fingerprint(queue, id));
        for loc in candidates {
            let chunk_id = loc >> 8;
            let data = self.chunk_records(chunk_id)?;
            let records = parse_records(&data, false).map_err(|why| self.damaged(chunk_id, why))?;
            let Some((crc, bytes)) = records.get((loc & 0xff) as usize).copied() else {
                return Err(self.damaged(chunk_id, format!("no record at location {loc}")));
            };
            if crc32c::crc32c(bytes) != crc {
                return Err(self.damaged(chunk_id, format!("bad checksum at location {loc}")));
            }
            let (q, i, value) = crate::journal_store::split_key(bytes)
                .ok_or_else(|| self.damaged(chunk_id, "a bad key".into()))?;
            if q == queue && i == id {
                return Ok(Some((loc, codec::decode(&q, &i, value)?)));
            }
        }
        Ok(None)
    }

    /// Every live task of one slice, with its location.
    fn live_tasks(&self, key: SliceKey) -> Result<Vec<(u32, Task)>, StoreError> {
        self.live_tasks_where(key, |_, _| true)
    }

    /// The live tasks of one slice whose queue and id pass `keep`, with their locations; the
    /// others are not decoded.
    fn live_tasks_where(
        &self,
        key: SliceKey,
        keep: impl Fn(&str, &str) -> bool,
    ) -> Result<Vec<(u32, Task)>, StoreError> {
        let mut out = Vec::new();
        for &chunk_id in &self.slices[&key].chunks {
            self.chunk_tasks_where(chunk_id, &keep, &mut out)?;
        }
        Ok(out)
    }

    /// Adds the live tasks of one chunk whose queue and id pass `keep` to `out`, with their
    /// locations; nothing if the chunk is no longer allocated.
    fn chunk_tasks_where(
        &self,
        chunk_id: u32,
        keep: &impl Fn(&str, &str) -> bool,
        out: &mut Vec<(u32, Task)>,
    ) -> Result<(), StoreError> {
        if self
            .chunks
            .get(chunk_id as usize)
            .is_none_or(Option::is_none)
        {
            return Ok(());
        }
        let data = self.chunk_records(chunk_id)?;
        let records = parse_records(&data, true).map_err(|why| self.damaged(chunk_id, why))?;
        for (index, (_, bytes)) in records.into_iter().enumerate() {
            let (q, i, value) = crate::journal_store::split_key(bytes)
                .ok_or_else(|| self.damaged(chunk_id, "a bad key".into()))?;
            let loc = (chunk_id << 8) | index as u32;
            if keep(&q, &i) && self.ids.contains(fingerprint(&q, &i), loc) {
                out.push((loc, codec::decode(&q, &i, value)?));
            }
        }
        Ok(())
    }

    /// Every allocated chunk, slice by slice in time order: for reading the whole tier a few chunks
    /// at a time, letting go of the store's lock in between ([`Cold::chunk_data`],
    /// [`parse_chunk`], [`Cold::is_live`]).
    pub(crate) fn chunk_ids(&self) -> Vec<u32> {
        self.slices
            .values()
            .flat_map(|slice| slice.chunks.iter().copied())
            .collect()
    }

    /// The bytes of one chunk's records, to parse without the lock; `None` if it was freed.
    pub(crate) fn chunk_data(&self, chunk_id: u32) -> Result<Option<Vec<u8>>, StoreError> {
        match self.chunks.get(chunk_id as usize) {
            Some(Some(_)) => self.chunk_records(chunk_id).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether the record at `loc` is the live one of `queue`/`id`.
    pub(crate) fn is_live(&self, queue: &str, id: &str, loc: u32) -> bool {
        self.ids.contains(fingerprint(queue, id), loc)
    }

    /// At least `want` cold tasks of `queue` after `after` in due order (all of them if there are
    /// fewer), reading slices in time order and stopping after the slice that makes `want`; sorted.
    pub(crate) fn list_due(
        &self,
        queue: &str,
        after: Option<&DueCursor>,
        want: usize,
    ) -> Result<Vec<Task>, StoreError> {
        let mut out: Vec<Task> = Vec::new();
        for &(start, level) in self.slices.keys() {
            let width = self.geometry.widths_ms[level as usize];
            if after.is_some_and(|c| start.saturating_add(width) <= c.due_ms) {
                continue;
            }
            if out.len() >= want {
                break;
            }
            for (_, task) in self.live_tasks_where((start, level), |q, _| q == queue)? {
                if after.is_none_or(|c| c.before(&task)) {
                    out.push(task);
                }
            }
        }
        out.sort_by(|a, b| (a.run_at_ms, &a.id).cmp(&(b.run_at_ms, &b.id)));
        Ok(out)
    }

    /// Drops a slice whose tasks have all been moved out: its chunks now, its files after the next
    /// checkpoint (the last one may still name them).
    fn drop_slice(&mut self, key: SliceKey) {
        if let Some(slice) = self.slices.remove(&key) {
            for chunk in slice.chunks {
                self.chunks[chunk as usize] = None;
                self.free_chunks.push(chunk);
            }
            for stream in [slice.data, slice.keys] {
                if stream.file.is_some() {
                    self.doomed_bytes += stream.flushed;
                    self.doomed.push(stream.path);
                }
            }
        }
    }

    /// Moves the boundaries forward for `now_ms` and places again every task of a slice the
    /// boundaries passed; tasks that became hot are handed to `hot`.
    pub(crate) fn advance(
        &mut self,
        now_ms: u64,
        mut hot: impl FnMut(Task),
    ) -> Result<(), StoreError> {
        if !self.set_boundaries(now_ms) {
            return Ok(());
        }
        let stale: Vec<SliceKey> = self
            .slices
            .keys()
            .copied()
            .filter(|(start, level)| match level {
                0 => *start < self.loaded,
                1 => *start < self.b1,
                _ => *start < self.b2,
            })
            .collect();
        for key in stale {
            let tasks = self.live_tasks(key)?;
            for (loc, task) in &tasks {
                if self.ids.remove(fingerprint(&task.queue, &task.id), *loc) {
                    self.gave(&task.queue, &task.id, key.1, task.run_at_ms);
                }
            }
            self.drop_slice(key);
            for (_, task) in tasks {
                match self.place(task.run_at_ms) {
                    Place::Hot => hot(task),
                    Place::Slice(_) => {
                        if let Err(error) = self.insert(&task, None) {
                            // As in a commit: memory rather than losing it until a restart.
                            tracing::warn!(%error, "cannot move a task to a finer slice; keeping it in memory");
                            hot(task);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes what a checkpoint needs of the cold tier, on the writer: every slice buffer is
    /// written (not synced) and the files with unsynced bytes are listed, with the lengths to record
    /// and the files doomed so far. The `fdatasync`s run on the checkpoint's own thread
    /// ([`ColdSnapshot::sync`]); then [`Cold::installed`] or [`Cold::not_installed`] settles it. A
    /// failed write (a full disk) is an error to retry later.
    pub(crate) fn snapshot(&mut self) -> Result<ColdSnapshot, StoreError> {
        for slice in self.slices.values_mut() {
            self.created |= slice.data.flush()?;
            self.created |= slice.keys.flush()?;
        }
        let mut files = Vec::new();
        for slice in self.slices.values() {
            for stream in [&slice.data, &slice.keys] {
                if let Some(file) = &stream.file
                    && stream.flushed > stream.synced
                {
                    let file = file
                        .try_clone()
                        .map_err(|e| io_error(&stream.path, "cannot open again", e))?;
                    files.push((stream.path.clone(), file));
                }
            }
        }
        let sync_dir = std::mem::take(&mut self.created).then(|| self.dir.clone());
        Ok(ColdSnapshot {
            record: ColdCheckpoint {
                loaded: self.loaded,
                b1: self.b1,
                b2: self.b2,
                next_generation: self.next_generation,
                slices: self
                    .slices
                    .iter()
                    .map(|(&(start, level), s)| {
                        (start, level, s.generation, s.data.flushed, s.keys.flushed)
                    })
                    .collect(),
            },
            files,
            sync_dir,
            doomed: std::mem::take(&mut self.doomed),
            doomed_bytes: std::mem::take(&mut self.doomed_bytes),
        })
    }

    /// A checkpoint made from `snapshot` is installed: the lengths it records are durable (and its
    /// thread has removed the files doomed before it, [`ColdSnapshot::remove_doomed`]).
    pub(crate) fn installed(&mut self, snapshot: ColdSnapshot) {
        for &(start, level, generation, data, keys) in &snapshot.record.slices {
            if let Some(slice) = self.slices.get_mut(&(start, level))
                && slice.generation == generation
            {
                slice.data.synced = slice.data.synced.max(data);
                slice.keys.synced = slice.keys.synced.max(keys);
            }
        }
    }

    /// A checkpoint made from `snapshot` was not installed (and the one before still stands): its
    /// doomed files wait for the next, which syncs the directory too if this one was to.
    pub(crate) fn not_installed(&mut self, snapshot: ColdSnapshot) {
        self.created |= snapshot.sync_dir.is_some();
        self.doomed.extend(snapshot.doomed);
        self.doomed_bytes += snapshot.doomed_bytes;
    }

    /// A snapshot was lost before its checkpoint's thread ran: the next syncs the directory, in
    /// case files were created since the last installed one.
    pub(crate) fn snapshot_lost(&mut self) {
        self.created = true;
    }

    /// A task left the tier (from a slice of `level`, due at `due_ms`): counted, and remembered
    /// while a checkpoint is being encoded.
    fn gave(&mut self, queue: &str, id: &str, level: u8, due_ms: u64) {
        if let Some(n) = self.queues.get_mut(queue) {
            *n -= 1;
            if *n == 0 {
                self.queues.remove(queue);
            }
        }
        let cell = self.cell_of(level, due_ms);
        if let Some(levels) = self.cells.get_mut(queue) {
            if let Some(n) = levels[level as usize].get_mut(&cell) {
                *n -= 1;
                if *n == 0 {
                    levels[level as usize].remove(&cell);
                }
            }
            if levels.iter().all(BTreeMap::is_empty) {
                self.cells.remove(queue);
            }
        }
        if let Some(given) = &mut self.given {
            given.insert((queue.to_owned(), id.to_owned()));
        }
    }

    /// Cold tasks by queue.
    pub(crate) fn queue_counts(&self) -> &BTreeMap<String, i64> {
        &self.queues
    }

    /// Sets the counts by queue, at open (from the checkpoint).
    pub(crate) fn set_queue_counts(&mut self, queues: BTreeMap<String, i64>) {
        self.queues = queues;
    }

    /// The width of a cell of `level`.
    fn cell_ms(&self, level: u8) -> u64 {
        let width = self.geometry.widths_ms[level as usize];
        let per = CELLS_PER_SLICE[level as usize];
        if width.is_multiple_of(per) {
            width / per
        } else {
            width
        }
    }

    /// The start of the cell of `level` that `due_ms` falls in.
    fn cell_of(&self, level: u8, due_ms: u64) -> u64 {
        due_ms - due_ms % self.cell_ms(level)
    }

    /// Cold tasks by queue, level and cell (a checkpoint records them).
    pub(crate) fn cells(&self) -> &Cells {
        &self.cells
    }

    /// Sets the cells, at open (from the checkpoint).
    pub(crate) fn set_cells(&mut self, cells: Cells) {
        self.cells = cells;
    }

    /// Counts the cells again from the slices, at open from a checkpoint that predates them (one
    /// sequential read of the cold tier).
    pub(crate) fn count_cells(&mut self) -> Result<(), StoreError> {
        let mut cells = Cells::new();
        for &key in self.slices.keys() {
            for (_, task) in self.live_tasks(key)? {
                let cell = self.cell_of(key.1, task.run_at_ms);
                *cells.entry(task.queue).or_default()[key.1 as usize]
                    .entry(cell)
                    .or_default() += 1;
            }
        }
        self.cells = cells;
        Ok(())
    }

    /// Adds the cold tasks of `queue` to `counts`, by cell: a cell is counted in the slice of
    /// `buckets` its start falls in (or the first one). Answers the widest cell that did not fall in
    /// one slice whole, or 1.
    pub(crate) fn timeline(&self, queue: &str, buckets: &Buckets, counts: &mut [u64]) -> u64 {
        let mut resolution = 1;
        let Some(levels) = self.cells.get(queue) else {
            return resolution;
        };
        let to_ms = buckets.to_ms();
        for (level, cells) in levels.iter().enumerate() {
            let cell_ms = self.cell_ms(level as u8);
            let first = buckets.from_ms.saturating_sub(cell_ms - 1);
            for (&start, &n) in cells.range(first..to_ms) {
                let from = start.max(buckets.from_ms);
                let Some(i) = buckets.index(from) else {
                    continue;
                };
                counts[i] += n;
                if cell_ms > 1 && (start < from || buckets.index(start + cell_ms - 1) != Some(i)) {
                    resolution = resolution.max(cell_ms);
                }
            }
        }
        resolution
    }

    /// Starts or stops remembering the tasks that leave the tier (see `given`).
    pub(crate) fn remember_given(&mut self, on: bool) {
        self.given = on.then(HashSet::new);
    }

    /// Whether `key` left the tier since [`Cold::remember_given`] was turned on.
    pub(crate) fn was_given(&self, key: &(String, String)) -> bool {
        self.given
            .as_ref()
            .is_some_and(|g| !g.is_empty() && g.contains(key))
    }

    /// Bytes in files waiting for a checkpoint to be deleted.
    pub(crate) fn doomed_bytes(&self) -> u64 {
        self.doomed_bytes
    }

    /// Distinct due times of cold tasks in `[from_ms, to_ms]`, ascending, at most `limit`; true if
    /// there were more.
    pub(crate) fn due_times(
        &self,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        let mut times = BTreeSet::new();
        for &(start, level) in self.slices.keys() {
            let width = self.geometry.widths_ms[level as usize];
            if start > to_ms {
                break;
            }
            if start.saturating_add(width) <= from_ms {
                continue;
            }
            // Slices are in time order and do not overlap: once more than `limit` times are known
            // and this slice starts after the one past the limit, nothing here can come earlier.
            if times.len() > limit && times.iter().nth(limit).is_some_and(|t| *t < start) {
                break;
            }
            for (_, task) in self.live_tasks((start, level))? {
                if (from_ms..=to_ms).contains(&task.run_at_ms) {
                    times.insert(task.run_at_ms);
                }
            }
        }
        let more = times.len() > limit;
        Ok((times.into_iter().take(limit).collect(), more))
    }
}

/// Reads a whole file (the checkpoint).
pub(crate) fn read_all(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match File::open(path) {
        Ok(mut file) => {
            let mut out = Vec::new();
            file.read_to_end(&mut out)
                .map_err(|e| io_error(path, "cannot read", e))?;
            Ok(Some(out))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, "cannot open", e)),
    }
}
