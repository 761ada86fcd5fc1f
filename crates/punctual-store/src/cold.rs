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
//! A slice file is a run of records, each `len u32 | crc u32 | kind u8 | bytes` (CRC32C over kind
//! and bytes). Consecutive records of a slice form chunks of at most [`CHUNK_RECORDS`] records and
//! [`CHUNK_BYTES`] bytes; a location in the id table is `chunk << 8 | record within the chunk`, so it
//! names one record exactly, and a lookup reads one chunk. A record is live while the id table holds
//! its location: cancel and reschedule remove the entry and append a deletion marker (for rebuilding),
//! nothing is rewritten.
//!
//! The journal stays the source of truth: slice files are derived from it and rebuilt when the
//! store opens, so they are written without `fdatasync`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use punctual_core::{Task, TaskState};

use crate::idtable::{IdTable, LOC_BITS, fingerprint};
use crate::{StoreError, codec};

/// Most records in one chunk (the low 8 bits of a location).
pub const CHUNK_RECORDS: u32 = 256;
/// A chunk closes once it holds this many bytes, so a lookup reads at most about this much.
pub const CHUNK_BYTES: u64 = 256 << 10;
/// Most chunks at once (the high bits of a location).
pub const MAX_CHUNKS: u32 = 1 << (LOC_BITS - 8);
/// A slice's buffered records are written once they reach this many bytes.
const FLUSH_BYTES: usize = 16 << 10;

/// Record kinds in slice files.
const PUT: u8 = 1;
const DEL: u8 = 2;

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

/// A slice: its level (0-based) and start.
type SliceKey = (u64, u8);

struct Slice {
    path: PathBuf,
    file: Option<File>,
    /// Bytes already in the file.
    flushed: u64,
    /// Records not yet written.
    buf: Vec<u8>,
    /// This slice's chunks, in order; the last is the one being filled.
    chunks: Vec<u32>,
    /// Records appended so far (puts and deletions): a deletion names its put by this ordinal.
    records: u32,
}

impl Slice {
    fn len(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    /// Bytes `[start, end)` of the slice's record stream (file, then buffer).
    fn read(&self, start: u64, end: u64) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity((end - start) as usize);
        if start < self.flushed {
            let upto = end.min(self.flushed);
            out.resize((upto - start) as usize, 0);
            let file = self
                .file
                .as_ref()
                .ok_or_else(|| StoreError::Storage(format!("{}: no file", self.path.display())))?;
            file.read_exact_at(&mut out, start)
                .map_err(|e| StoreError::Storage(format!("read {}: {e}", self.path.display())))?;
        }
        if end > self.flushed {
            let from = start.max(self.flushed) - self.flushed;
            let to = end - self.flushed;
            out.extend_from_slice(&self.buf[from as usize..to as usize]);
        }
        Ok(out)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(|e| slice_error(&self.path, "create", e))?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("opened above");
        // A short or failed write leaves the buffer whole; the next flush writes it again at the
        // same offset.
        file.write_all_at(&self.buf, self.flushed)
            .map_err(|e| slice_error(&self.path, "write", e))?;
        self.flushed += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

fn slice_error(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(28) {
        StoreError::NoSpace(format!("{what} {}: {e}", path.display()))
    } else {
        StoreError::Storage(format!("{what} {}: {e}", path.display()))
    }
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

/// Where a placed task goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Hot,
    Slice(SliceKey),
}

/// One record of a chunk, parsed: its kind and its bytes (key, then value).
fn parse_records(data: &[u8]) -> Result<Vec<(u8, &[u8])>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let head = data
            .get(at..at + 9)
            .ok_or_else(|| format!("record cut at byte {at}"))?;
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let body = data
            .get(at + 8..at + 8 + len)
            .filter(|_| len >= 1)
            .ok_or_else(|| format!("record of {len} bytes cut at byte {at}"))?;
        if crc32c::crc32c(body) != crc {
            return Err(format!("bad checksum at byte {at}"));
        }
        out.push((body[0], &body[1..]));
        at += 8 + len;
    }
    Ok(out)
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
    slices: BTreeMap<SliceKey, Slice>,
    chunks: Vec<Option<Chunk>>,
    free_chunks: Vec<u32>,
    ids: IdTable,
    /// Bytes written to slice files, in total.
    written: u64,
}

impl Cold {
    /// An empty cold tier in `dir` (whatever was there is removed: slices are rebuilt from the
    /// journal), with its boundaries set for `now_ms`.
    pub(crate) fn create(
        dir: &Path,
        geometry: SliceGeometry,
        now_ms: u64,
    ) -> Result<Cold, StoreError> {
        geometry.check().map_err(StoreError::Storage)?;
        let open_error = |e: std::io::Error| StoreError::Open {
            path: dir.display().to_string(),
            reason: e.to_string(),
        };
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(open_error)?;
        }
        std::fs::create_dir_all(dir).map_err(open_error)?;
        let mut cold = Cold {
            dir: dir.to_owned(),
            geometry,
            loaded: 0,
            b1: 0,
            b2: 0,
            slices: BTreeMap::new(),
            chunks: Vec::new(),
            free_chunks: Vec::new(),
            ids: IdTable::default(),
            written: 0,
        };
        cold.set_boundaries(now_ms);
        Ok(cold)
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

    fn append(&mut self, key: SliceKey, kind: u8, bytes: &[u8]) -> Result<u32, StoreError> {
        let slice = match self.slices.get_mut(&key) {
            Some(slice) => slice,
            None => {
                let path = self.dir.join(format!("{}-{:016x}.slice", key.1 + 1, key.0));
                self.slices.entry(key).or_insert(Slice {
                    path,
                    file: None,
                    flushed: 0,
                    buf: Vec::new(),
                    chunks: Vec::new(),
                    records: 0,
                })
            }
        };
        let pos = slice.len();
        let open_chunk = slice.chunks.last().copied().filter(|c| {
            let chunk = self.chunks[*c as usize].expect("a slice's chunks are allocated");
            chunk.records < CHUNK_RECORDS && chunk.end - chunk.start < CHUNK_BYTES
        });
        let chunk_id = match open_chunk {
            Some(c) => c,
            None => {
                let chunk = Chunk {
                    slice: key,
                    start: pos,
                    end: pos,
                    records: 0,
                    first: slice.records,
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
                slice.chunks.push(id);
                id
            }
        };
        let len = 1 + bytes.len();
        let mut crc = crc32c::crc32c(&[kind]);
        crc = crc32c::crc32c_append(crc, bytes);
        slice.buf.extend_from_slice(&(len as u32).to_le_bytes());
        slice.buf.extend_from_slice(&crc.to_le_bytes());
        slice.buf.push(kind);
        slice.buf.extend_from_slice(bytes);
        slice.records += 1;
        self.written += 8 + len as u64;
        let end = slice.len();
        let chunk = self.chunks[chunk_id as usize]
            .as_mut()
            .expect("allocated above");
        let index = chunk.records;
        chunk.records += 1;
        chunk.end = end;
        if slice.buf.len() >= FLUSH_BYTES
            && let Err(error) = slice.flush()
        {
            // The records stay buffered and are written with the next flush; the journal has them.
            tracing::warn!(%error, "cannot write a slice file yet; keeping its records in memory");
        }
        Ok((chunk_id << 8) | index)
    }

    /// Adds a cold task (the caller checked [`Cold::is_cold`]).
    pub(crate) fn insert(&mut self, task: &Task) -> Result<(), StoreError> {
        let Place::Slice(key) = self.place(task.run_at_ms) else {
            return Err(StoreError::Storage(format!(
                "{}/{} is not cold",
                task.queue, task.id
            )));
        };
        let bytes = crate::journal_store::put_bytes(task);
        let loc = self.append(key, PUT, &bytes)?;
        self.ids.insert(fingerprint(&task.queue, &task.id), loc);
        Ok(())
    }

    /// Removes the cold task at `loc` (as found by [`Cold::find`]).
    pub(crate) fn remove(&mut self, queue: &str, id: &str, loc: u32) -> Result<(), StoreError> {
        if !self.ids.remove(fingerprint(queue, id), loc) {
            return Ok(());
        }
        let chunk = self.chunks[(loc >> 8) as usize].expect("a live location's chunk");
        let ordinal = chunk.first + (loc & 0xff);
        let mut bytes = crate::journal_store::key_bytes(queue, id, 4);
        bytes.extend_from_slice(&ordinal.to_le_bytes());
        self.append(chunk.slice, DEL, &bytes)?;
        Ok(())
    }

    fn chunk_records(&self, chunk_id: u32) -> Result<Vec<u8>, StoreError> {
        let chunk = self.chunks[chunk_id as usize]
            .ok_or_else(|| StoreError::Storage(format!("chunk {chunk_id} is not allocated")))?;
        let slice = &self.slices[&chunk.slice];
        slice.read(chunk.start, chunk.end)
    }

    fn damaged(&self, chunk_id: u32, why: String) -> StoreError {
        let path = self.chunks[chunk_id as usize]
            .and_then(|c| self.slices.get(&c.slice))
            .map_or_else(|| self.dir.clone(), |s| s.path.clone());
        StoreError::Storage(format!("slice file {} damaged: {why}", path.display()))
    }

    /// The live cold task `queue`/`id` and its location, if there is one.
    pub(crate) fn find(&self, queue: &str, id: &str) -> Result<Option<(u32, Task)>, StoreError> {
        let candidates = self.ids.candidates(fingerprint(queue, id));
        for loc in candidates {
            let chunk_id = loc >> 8;
            let data = self.chunk_records(chunk_id)?;
            let records = parse_records(&data).map_err(|why| self.damaged(chunk_id, why))?;
            let Some((PUT, bytes)) = records.get((loc & 0xff) as usize).copied() else {
                return Err(self.damaged(chunk_id, format!("no put at location {loc}")));
            };
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
        let mut out = Vec::new();
        for &chunk_id in &self.slices[&key].chunks {
            let data = self.chunk_records(chunk_id)?;
            let records = parse_records(&data).map_err(|why| self.damaged(chunk_id, why))?;
            for (index, (kind, bytes)) in records.into_iter().enumerate() {
                if kind != PUT {
                    continue;
                }
                let (q, i, value) = crate::journal_store::split_key(bytes)
                    .ok_or_else(|| self.damaged(chunk_id, "a bad key".into()))?;
                let loc = (chunk_id << 8) | index as u32;
                if self.ids.contains(fingerprint(&q, &i), loc) {
                    out.push((loc, codec::decode(&q, &i, value)?));
                }
            }
        }
        Ok(out)
    }

    /// Drops a slice whose tasks have all been moved out: its file and its chunks.
    fn drop_slice(&mut self, key: SliceKey) {
        if let Some(slice) = self.slices.remove(&key) {
            for chunk in slice.chunks {
                self.chunks[chunk as usize] = None;
                self.free_chunks.push(chunk);
            }
            if slice.file.is_some()
                && let Err(error) = std::fs::remove_file(&slice.path)
            {
                tracing::warn!(%error, path = %slice.path.display(), "cannot remove a slice file");
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
                self.ids.remove(fingerprint(&task.queue, &task.id), *loc);
            }
            self.drop_slice(key);
            for (_, task) in tasks {
                match self.place(task.run_at_ms) {
                    Place::Hot => hot(task),
                    Place::Slice(_) => self.insert(&task)?,
                }
            }
        }
        Ok(())
    }

    /// Every live cold task, slice by slice in time order.
    pub(crate) fn for_each(&self, mut each: impl FnMut(Task)) -> Result<(), StoreError> {
        for key in self.slices.keys() {
            for (_, task) in self.live_tasks(*key)? {
                each(task);
            }
        }
        Ok(())
    }

    /// Distinct due times of cold tasks in `[from_ms, to_ms]`, ascending, at most `limit`; true if
    /// there were more.
    pub(crate) fn due_times(
        &self,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StoreError> {
        let mut times = std::collections::BTreeSet::new();
        for (&(start, level), _) in self.slices.iter() {
            let width = self.geometry.widths_ms[level as usize];
            if start > to_ms {
                break;
            }
            if start.saturating_add(width) <= from_ms {
                continue;
            }
            // Slices are in time order and do not overlap: once `limit` times are known and this
            // slice starts after the last of them, nothing here can come earlier.
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
