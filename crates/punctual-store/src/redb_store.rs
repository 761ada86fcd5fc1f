//! The embedded store: one redb file, crash-safe B-trees, one fsync per durable group commit.
//!
//! Tables (all keys ordered, so every index lookup is O(log n)):
//! - `tasks`:  `queue 0x00 id` → encoded record (see `codec`)
//! - `due`:    `due_ms (u64 BE) queue 0x00 id` → `()` — firing, lease expiry and purge times, one ordered index
//! - `ready`:  `queue 0x00 ready_at_ms (u64 BE) id` → `()` — each queue's ready tasks, oldest first
//! - `counts`: `queue` → five little-endian `i64` counters, one per state
//! - `meta`:   `"format_version"` → [`FORMAT_VERSION`]
//!
//! Keys are plain bytes rather than redb tuples: comparing them is one `memcmp`, where tuple keys of
//! `&str` decode lengths and check UTF-8 on every comparison (measured: a tenth of the writer's time).
//! Queue names never contain `0x00` (only `[A-Za-z0-9._:-]`), so `queue 0x00` sorts exactly like the
//! tuple `(queue, …)`, and ids never contain control characters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use punctual_core::{Task, TaskState};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition};

use crate::codec::{self, FORMAT_VERSION};
use crate::engine::{self, Txn};
use crate::{
    Buckets, Command, DueCursor, DuePage, DueTimes, LIST_SCAN_BUDGET, Outcome, Page, QueueCounts,
    Store, StoreError, Timeline,
};

const TASKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tasks");
const DUE: TableDefinition<&[u8], ()> = TableDefinition::new("due");
const READY: TableDefinition<&[u8], ()> = TableDefinition::new("ready");

fn task_key(out: &mut Vec<u8>, queue: &str, id: &str) {
    out.clear();
    out.extend_from_slice(queue.as_bytes());
    out.push(0);
    out.extend_from_slice(id.as_bytes());
}

fn due_key(out: &mut Vec<u8>, due_ms: u64, queue: &str, id: &str) {
    out.clear();
    out.extend_from_slice(&due_ms.to_be_bytes());
    out.extend_from_slice(queue.as_bytes());
    out.push(0);
    out.extend_from_slice(id.as_bytes());
}

fn ready_key(out: &mut Vec<u8>, queue: &str, at_ms: u64, id: &str) {
    out.clear();
    out.extend_from_slice(queue.as_bytes());
    out.push(0);
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(id.as_bytes());
}

/// The first key after every key that starts with `queue 0x00`.
fn queue_end(queue: &str) -> Vec<u8> {
    let mut end = queue.as_bytes().to_vec();
    end.push(1);
    end
}

fn corrupt_key(key: &[u8]) -> StoreError {
    StoreError::Storage(format!("malformed index key {key:02x?}"))
}

/// Splits `queue 0x00 id`.
fn split_task_key(key: &[u8]) -> Result<(&str, &str), StoreError> {
    let sep = key
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| corrupt_key(key))?;
    let queue = std::str::from_utf8(&key[..sep]).map_err(|_| corrupt_key(key))?;
    let id = std::str::from_utf8(&key[sep + 1..]).map_err(|_| corrupt_key(key))?;
    Ok((queue, id))
}

fn split_due_key(key: &[u8]) -> Result<(u64, &str, &str), StoreError> {
    let time: [u8; 8] = key
        .get(..8)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| corrupt_key(key))?;
    let (queue, id) = split_task_key(&key[8..])?;
    Ok((u64::from_be_bytes(time), queue, id))
}
const COUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("counts");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The name of the data file inside the data directory.
pub const DATA_FILE: &str = "punctual.redb";

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct RedbOptions {
    /// redb's page cache. It bounds the store's memory whatever the number of pending tasks.
    pub cache_bytes: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            cache_bytes: 64 << 20,
        }
    }
}

/// The embedded, durable store.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    poisoned: Mutex<Option<String>>,
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::Storage(error.to_string())
}

impl RedbStore {
    /// Opens (or creates) `DATA_FILE` in `dir`. After a crash redb recovers the last committed state.
    pub fn open(dir: &Path, options: &RedbOptions) -> Result<Self, StoreError> {
        let path = dir.join(DATA_FILE);
        let open_error = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| open_error(format!("cannot create data dir: {e}")))?;
        // redb 3.1 asserts (panics) on some damaged files, e.g. one cut short, instead of returning an
        // error; turn that into the same clear startup error as any other unreadable file.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Database::builder()
                .set_cache_size(options.cache_bytes)
                .create(&path)
        }));
        let db = match opened {
            Ok(result) => result.map_err(|e| open_error(e.to_string()))?,
            Err(panic) => {
                let detail = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(open_error(format!(
                    "the file is damaged (truncated or corrupt) and cannot be recovered automatically; \
                     restore it from a backup or move it away to start empty ({detail})"
                )));
            }
        };
        let store = RedbStore {
            db,
            path: path.clone(),
            poisoned: Mutex::new(None),
        };
        store.init().map_err(|e| match e {
            StoreError::FormatVersion { .. } => e,
            other => open_error(other.to_string()),
        })?;
        Ok(store)
    }

    /// Opens a store on a caller-supplied redb backend instead of a file: for fault-injection tests
    /// (a backend whose fsync fails on demand), never for serving.
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        options: &RedbOptions,
    ) -> Result<Self, StoreError> {
        let path = PathBuf::from("<custom backend>");
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create_with_backend(backend)
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let store = RedbStore {
            db,
            path,
            poisoned: Mutex::new(None),
        };
        store.init()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the tables and checks (or writes) the format version.
    fn init(&self) -> Result<(), StoreError> {
        let mut wtx = self.db.begin_write().map_err(storage)?;
        wtx.set_two_phase_commit(true);
        {
            let mut meta = wtx.open_table(META).map_err(storage)?;
            let found = meta
                .get("format_version")
                .map_err(storage)?
                .map(|v| v.value());
            match found {
                Some(v) if v != u64::from(FORMAT_VERSION) => {
                    return Err(StoreError::FormatVersion {
                        path: self.path.display().to_string(),
                        found: v,
                        expected: u64::from(FORMAT_VERSION),
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("format_version", u64::from(FORMAT_VERSION))
                        .map_err(storage)?;
                }
            }
            wtx.open_table(TASKS).map_err(storage)?;
            wtx.open_table(DUE).map_err(storage)?;
            wtx.open_table(READY).map_err(storage)?;
            wtx.open_table(COUNTS).map_err(storage)?;
        }
        wtx.commit().map_err(storage)
    }

    fn poisoned(&self) -> MutexGuard<'_, Option<String>> {
        self.poisoned.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply_in(&self, now_ms: u64, commands: &[Command]) -> Result<Vec<Outcome>, StoreError> {
        let mut wtx = self.db.begin_write().map_err(storage)?;
        if commands.iter().any(Command::is_durable) {
            wtx.set_two_phase_commit(true);
            // Saves the allocator state with each durable commit so restart after a crash does not walk the file.
            wtx.set_quick_repair(true);
        } else {
            wtx.set_durability(Durability::None).map_err(storage)?;
        }
        let outcomes = {
            let mut txn = RedbTxn {
                tasks: wtx.open_table(TASKS).map_err(storage)?,
                due: wtx.open_table(DUE).map_err(storage)?,
                ready: wtx.open_table(READY).map_err(storage)?,
                counts: HashMap::new(),
                key: Vec::with_capacity(128),
            };
            let outcomes = commands
                .iter()
                .map(|command| engine::apply_one(&mut txn, now_ms, command))
                .collect::<Result<Vec<_>, _>>()?;
            let mut counts = wtx.open_table(COUNTS).map_err(storage)?;
            for (queue, delta) in txn.counts {
                let mut current = counts
                    .get(queue.as_str())
                    .map_err(storage)?
                    .map(|v| decode_counts(v.value()))
                    .unwrap_or_default();
                for (c, d) in current.iter_mut().zip(delta) {
                    *c += d;
                }
                if current.iter().all(|c| *c == 0) {
                    counts.remove(queue.as_str()).map_err(storage)?;
                } else {
                    counts
                        .insert(queue.as_str(), encode_counts(&current).as_slice())
                        .map_err(storage)?;
                }
            }
            outcomes
        };
        if let Err(e) = wtx.commit() {
            // The file may or may not hold this commit; never retry, refuse all further writes.
            let message = e.to_string();
            *self.poisoned() = Some(message.clone());
            return Err(StoreError::Poisoned(message));
        }
        Ok(outcomes)
    }
}

fn encode_counts(counts: &[i64; 5]) -> Vec<u8> {
    counts.iter().flat_map(|c| c.to_le_bytes()).collect()
}

fn decode_counts(bytes: &[u8]) -> [i64; 5] {
    let mut out = [0i64; 5];
    for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *slot = i64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
    }
    out
}

struct RedbTxn<'t> {
    tasks: Table<'t, &'static [u8], &'static [u8]>,
    due: Table<'t, &'static [u8], ()>,
    ready: Table<'t, &'static [u8], ()>,
    counts: HashMap<String, [i64; 5]>,
    /// Scratch space for keys, reused across operations.
    key: Vec<u8>,
}

impl Txn for RedbTxn<'_> {
    fn get(&mut self, queue: &str, id: &str) -> Result<Option<Task>, StoreError> {
        task_key(&mut self.key, queue, id);
        match self.tasks.get(self.key.as_slice()).map_err(storage)? {
            Some(value) => codec::decode(queue, id, value.value()).map(Some),
            None => Ok(None),
        }
    }
    fn put(&mut self, task: &Task) -> Result<(), StoreError> {
        let bytes = codec::encode(task);
        task_key(&mut self.key, &task.queue, &task.id);
        self.tasks
            .insert(self.key.as_slice(), bytes.as_slice())
            .map_err(storage)?;
        Ok(())
    }
    fn create(&mut self, task: &Task) -> Result<Option<Task>, StoreError> {
        let bytes = codec::encode(task);
        task_key(&mut self.key, &task.queue, &task.id);
        let previous = self
            .tasks
            .insert(self.key.as_slice(), bytes.as_slice())
            .map_err(storage)?
            .map(|old| old.value().to_vec());
        match previous {
            None => Ok(None),
            Some(old) => {
                // Rare path (a repeat): put the existing record back untouched.
                self.tasks
                    .insert(self.key.as_slice(), old.as_slice())
                    .map_err(storage)?;
                codec::decode(&task.queue, &task.id, &old).map(Some)
            }
        }
    }
    fn remove(&mut self, queue: &str, id: &str) -> Result<(), StoreError> {
        task_key(&mut self.key, queue, id);
        self.tasks.remove(self.key.as_slice()).map_err(storage)?;
        Ok(())
    }
    fn due_add(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError> {
        due_key(&mut self.key, due_ms, queue, id);
        self.due.insert(self.key.as_slice(), ()).map_err(storage)?;
        Ok(())
    }
    fn due_remove(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError> {
        due_key(&mut self.key, due_ms, queue, id);
        self.due.remove(self.key.as_slice()).map_err(storage)?;
        Ok(())
    }
    fn due_upto(
        &mut self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, String)>, StoreError> {
        let mut out = Vec::new();
        let end = now_ms.saturating_add(1).to_be_bytes();
        for entry in self.due.range(..end.as_slice()).map_err(storage)? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry.map_err(storage)?;
            let (due, queue, id) = split_due_key(key.value())?;
            if due > now_ms {
                break;
            }
            out.push((due, queue.to_owned(), id.to_owned()));
        }
        Ok(out)
    }
    fn ready_add(&mut self, queue: &str, at_ms: u64, id: &str) -> Result<(), StoreError> {
        ready_key(&mut self.key, queue, at_ms, id);
        self.ready
            .insert(self.key.as_slice(), ())
            .map_err(storage)?;
        Ok(())
    }
    fn ready_remove(&mut self, queue: &str, at_ms: u64, id: &str) -> Result<(), StoreError> {
        ready_key(&mut self.key, queue, at_ms, id);
        self.ready.remove(self.key.as_slice()).map_err(storage)?;
        Ok(())
    }
    fn ready_first(&mut self, queue: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut start = queue.as_bytes().to_vec();
        start.push(0);
        let end = queue_end(queue);
        let prefix = start.len() + 8;
        for entry in self
            .ready
            .range(start.as_slice()..end.as_slice())
            .map_err(storage)?
        {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry.map_err(storage)?;
            let key = key.value();
            let id = key
                .get(prefix..)
                .and_then(|id| std::str::from_utf8(id).ok())
                .ok_or_else(|| corrupt_key(key))?;
            out.push(id.to_owned());
        }
        Ok(out)
    }
    fn count(&mut self, queue: &str, state: TaskState, delta: i64) {
        match self.counts.get_mut(queue) {
            Some(counts) => counts[state.index()] += delta,
            None => {
                let mut counts = [0; 5];
                counts[state.index()] = delta;
                self.counts.insert(queue.to_owned(), counts);
            }
        }
    }
}

impl Store for RedbStore {
    fn apply(&self, now_ms: u64, commands: &[Command]) -> Result<Vec<Outcome>, StoreError> {
        if let Some(reason) = self.poisoned().clone() {
            return Err(StoreError::Poisoned(reason));
        }
        self.apply_in(now_ms, commands)
    }

    fn get(&self, queue: &str, id: &str) -> Result<Option<Task>, StoreError> {
        let rtx = self.db.begin_read().map_err(storage)?;
        let tasks = rtx.open_table(TASKS).map_err(storage)?;
        let mut key = Vec::new();
        task_key(&mut key, queue, id);
        match tasks.get(key.as_slice()).map_err(storage)? {
            Some(value) => codec::decode(queue, id, value.value()).map(Some),
            None => Ok(None),
        }
    }

    fn list(
        &self,
        queue: &str,
        state: Option<TaskState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let rtx = self.db.begin_read().map_err(storage)?;
        let tasks = rtx.open_table(TASKS).map_err(storage)?;
        let mut page = Page::default();
        let mut scanned = 0;
        let mut start = Vec::new();
        task_key(&mut start, queue, after.unwrap_or(""));
        let end = queue_end(queue);
        for entry in tasks
            .range(start.as_slice()..end.as_slice())
            .map_err(storage)?
        {
            let (key, value) = entry.map_err(storage)?;
            let (q, id) = split_task_key(key.value())?;
            if after == Some(id) {
                continue;
            }
            scanned += 1;
            let task = codec::decode(q, id, value.value())?;
            if state.is_none_or(|s| s == task.state) {
                page.tasks.push(task);
            }
            if page.tasks.len() >= limit || scanned >= LIST_SCAN_BUDGET {
                page.next_cursor = Some(id.to_owned());
                break;
            }
        }
        Ok(page)
    }

    fn queues(&self) -> Result<Vec<QueueCounts>, StoreError> {
        let rtx = self.db.begin_read().map_err(storage)?;
        let counts = rtx.open_table(COUNTS).map_err(storage)?;
        let mut out = Vec::new();
        for entry in counts.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            out.push(QueueCounts {
                queue: key.value().to_owned(),
                counts: decode_counts(value.value()).map(|c| c.max(0) as u64),
            });
        }
        Ok(out)
    }

    fn due_times(&self, from_ms: u64, to_ms: u64, limit: usize) -> Result<DueTimes, StoreError> {
        let rtx = self.db.begin_read().map_err(storage)?;
        let due = rtx.open_table(DUE).map_err(storage)?;
        let mut out = DueTimes::default();
        // Many tasks may share one millisecond; bound the scan, not only the distinct times.
        let budget = limit.saturating_mul(4).saturating_add(1_000);
        let start = from_ms.to_be_bytes();
        for (scanned, entry) in due.range(start.as_slice()..).map_err(storage)?.enumerate() {
            let (key, _) = entry.map_err(storage)?;
            let (time, _, _) = split_due_key(key.value())?;
            if time > to_ms {
                break;
            }
            if out.times.last() != Some(&time) {
                if out.times.len() >= limit {
                    out.truncated = true;
                    break;
                }
                out.times.push(time);
            }
            if scanned >= budget {
                out.truncated = true;
                break;
            }
        }
        Ok(out)
    }

    /// Scans the due index from `after` (it also holds lease expiries and purge times), reading the
    /// record of each entry of `queue`.
    fn list_due(
        &self,
        queue: &str,
        after: Option<&DueCursor>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        let rtx = self.db.begin_read().map_err(storage)?;
        let due = rtx.open_table(DUE).map_err(storage)?;
        let tasks = rtx.open_table(TASKS).map_err(storage)?;
        let mut start = Vec::new();
        if let Some(c) = after {
            due_key(&mut start, c.due_ms, queue, &c.id);
        }
        let mut out = Vec::new();
        let mut stopped = None;
        let mut key = Vec::new();
        for (scanned, entry) in due.range(start.as_slice()..).map_err(storage)?.enumerate() {
            let (entry, _) = entry.map_err(storage)?;
            if after.is_some() && entry.value() == start.as_slice() {
                continue;
            }
            let (time, q, id) = split_due_key(entry.value())?;
            if scanned >= LIST_SCAN_BUDGET {
                stopped = Some(DueCursor::resume_after(queue, time, q, id));
                break;
            }
            if q != queue {
                continue;
            }
            task_key(&mut key, q, id);
            if let Some(record) = tasks.get(key.as_slice()).map_err(storage)?
                && codec::is_scheduled(record.value())
            {
                out.push(codec::decode(q, id, record.value())?);
                if out.len() > limit {
                    break;
                }
            }
        }
        Ok(crate::memory::due_page(out, stopped, limit))
    }

    /// Scans the due index over the range (it also holds lease expiries and purge times) and reads
    /// the state byte of each entry's record of `queue`.
    fn timeline(&self, queue: &str, buckets: &Buckets) -> Result<Timeline, StoreError> {
        let rtx = self.db.begin_read().map_err(storage)?;
        let due = rtx.open_table(DUE).map_err(storage)?;
        let tasks = rtx.open_table(TASKS).map_err(storage)?;
        let mut out = Timeline::empty(buckets);
        let start = buckets.from_ms.to_be_bytes();
        let mut key = Vec::new();
        for entry in due.range(start.as_slice()..).map_err(storage)? {
            let (entry, _) = entry.map_err(storage)?;
            let (time, q, id) = split_due_key(entry.value())?;
            let Some(i) = buckets.index(time) else { break };
            if q != queue {
                continue;
            }
            task_key(&mut key, q, id);
            if let Some(record) = tasks.get(key.as_slice()).map_err(storage)?
                && codec::is_scheduled(record.value())
            {
                out.counts[i] += 1;
            }
        }
        Ok(out)
    }

    fn health(&self) -> Result<(), StoreError> {
        match self.poisoned().clone() {
            Some(reason) => Err(StoreError::Poisoned(reason)),
            None => Ok(()),
        }
    }
}
