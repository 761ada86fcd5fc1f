//! `JournalStore`: the sequential-write store, first stage (docs/storage.md, "Storage v2").
//!
//! Every durable change is appended to the [`Journal`] and made durable with one `fdatasync` per
//! commit before the commit returns; nothing is ever rewritten in place. The working state (tasks,
//! due and ready indexes, counts) is in memory, built by replaying the journal at open. Commands run
//! through the same engine as every other store, so the conformance suite and the oracle apply.
//!
//! What a commit journals: for a batch with any durable command, the final record (or its deletion)
//! of every task the batch touched. A batch of only non-durable commands (reserve, tick, extend,
//! release) changes memory alone, so after a crash those leases and promotions are simply not there:
//! the task is handed out again, as the `Store` contract allows. When the journal append fails the
//! batch is undone in memory, so nothing answered as failed is visible: a full disk answers
//! `NoSpace` (507) and the store goes on; a failed `fdatasync` poisons it.
//!
//! Not yet here (the next stage, tracked in issue 8): far-future tasks in time-sliced files instead of
//! memory, the compact id table, and checkpoints that bound the replay. Until then the store holds
//! every task in RAM and replays the whole live journal at open; open compacts the journal when it has
//! grown to several times the live data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use punctual_core::{Task, TaskState};

use crate::cold::{Cold, SliceGeometry};
use crate::engine::{self, Txn};
use crate::journal::{Journal, JournalOptions, Record};
use crate::memory::Inner;
use crate::{Command, DueTimes, Outcome, Page, QueueCounts, Store, StoreError, codec};

/// Record kinds in the journal.
const PUT: u8 = 1;
const DELETE: u8 = 2;
/// Tasks per batch when open rewrites the journal.
const COMPACT_BATCH: usize = 10_000;

/// Settings of the journal store.
#[derive(Debug, Clone)]
pub struct JournalStoreOptions {
    pub journal: JournalOptions,
    /// Open compacts the journal when it holds more than 4 records per live task and at least this
    /// many bytes.
    pub compact_min_bytes: u64,
    /// New tasks are refused (`NoSpace`, 507) while the journal's file system has less free space
    /// than this; acks, nacks and cancels still go through, until the disk is really full.
    pub min_free_bytes: u64,
    /// The time slices of the cold tier.
    pub slices: SliceGeometry,
    /// The wall-clock time at open: tasks due within the load horizon of it are replayed into memory,
    /// the others into slice files.
    pub now_ms: u64,
}

impl Default for JournalStoreOptions {
    fn default() -> Self {
        JournalStoreOptions {
            journal: JournalOptions::default(),
            compact_min_bytes: 64 << 20,
            min_free_bytes: 64 << 20,
            slices: SliceGeometry::default(),
            now_ms: 0,
        }
    }
}

/// What the store holds, for metrics and the memory benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Tasks in memory (due soon, ready, leased, dead or kept after success).
    pub hot_tasks: u64,
    /// Scheduled tasks in slice files.
    pub cold_tasks: u64,
    /// Memory of the cold tier's id table and chunk directory.
    pub cold_index_bytes: u64,
    /// Bytes written to slice files since open.
    pub slice_bytes_written: u64,
}

struct State {
    mem: Inner,
    cold: Cold,
    journal: Journal,
    /// The last free-space reading: (when, bytes free).
    free: Option<(u64, u64)>,
}

/// How often the free space is read again, at most.
const FREE_SPACE_EVERY_MS: u64 = 100;

/// Bytes free for unprivileged writes on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The journal store; see the module documentation.
pub struct JournalStore {
    state: Mutex<State>,
    dir: PathBuf,
    min_free_bytes: u64,
}

/// One change to undo if the journal refuses the batch.
enum Undo {
    Task((String, String), Option<Box<Task>>),
    DueAdded((u64, String, String)),
    DueRemoved((u64, String, String)),
    ReadyAdded((String, u64, String)),
    ReadyRemoved((String, u64, String)),
    Count(String, TaskState, i64),
}

/// A cold task's change within one batch: where it was in the cold tier when the batch began, and
/// what of it is cold now (`None`: it is hot, or gone).
struct Edit {
    was: Option<u32>,
    now: Option<Task>,
    dirty: bool,
}

/// The engine's view of the state during one batch: hot changes are applied at once and logged, so
/// the batch can be undone; cold changes are kept aside in `edits` and applied to the cold tier only
/// once the batch stands. Touched tasks are journaled.
struct Logged<'a> {
    mem: &'a mut Inner,
    cold: &'a mut Cold,
    undo: Vec<Undo>,
    touched: BTreeSet<(String, String)>,
    edits: HashMap<(String, String), Edit>,
}

impl<'a> Logged<'a> {
    fn new(mem: &'a mut Inner, cold: &'a mut Cold) -> Logged<'a> {
        Logged {
            mem,
            cold,
            undo: Vec::new(),
            touched: BTreeSet::new(),
            edits: HashMap::new(),
        }
    }

    fn set(&mut self, key: (String, String), task: Option<Task>) {
        let previous = match task {
            Some(task) => self.mem.tasks.insert(key.clone(), task),
            None => self.mem.tasks.remove(&key),
        };
        self.touched.insert(key.clone());
        self.undo.push(Undo::Task(key, previous.map(Box::new)));
    }

    /// The final record of every touched task, for the journal.
    fn records(&self) -> Vec<Record> {
        self.touched
            .iter()
            .map(|key| {
                let cold = self.edits.get(key).and_then(|e| e.now.as_ref());
                match cold.or_else(|| self.mem.tasks.get(key)) {
                    Some(task) => put_record(task),
                    None => delete_record(&key.0, &key.1),
                }
            })
            .collect()
    }

    /// The batch stands: applies its cold changes.
    fn settle(self) {
        let Logged {
            mem, cold, edits, ..
        } = self;
        for ((queue, id), edit) in edits {
            if !edit.dirty {
                continue;
            }
            if let Some(loc) = edit.was
                && let Err(error) = cold.remove(&queue, &id, loc)
            {
                tracing::warn!(%error, "cannot append a deletion marker to a slice file");
            }
            if let Some(task) = edit.now
                && let Err(error) = cold.insert(&task)
            {
                // The journal has the task; keep it in memory rather than lose it until a restart.
                tracing::warn!(%error, "cannot add a task to the cold tier; keeping it in memory");
                mem.due.insert((task.run_at_ms, queue.clone(), id.clone()));
                mem.tasks.insert((queue, id), task);
            }
        }
        mem.forget_empty_queues();
    }

    fn rollback(self) {
        let mem = self.mem;
        for undo in self.undo.into_iter().rev() {
            match undo {
                Undo::Task(key, Some(task)) => {
                    mem.tasks.insert(key, *task);
                }
                Undo::Task(key, None) => {
                    mem.tasks.remove(&key);
                }
                Undo::DueAdded(entry) => {
                    mem.due.remove(&entry);
                }
                Undo::DueRemoved(entry) => {
                    mem.due.insert(entry);
                }
                Undo::ReadyAdded(entry) => {
                    mem.ready.remove(&entry);
                }
                Undo::ReadyRemoved(entry) => {
                    mem.ready.insert(entry);
                }
                Undo::Count(queue, state, delta) => {
                    mem.count(&queue, state, -delta);
                }
            }
        }
        mem.forget_empty_queues();
    }
}

impl Txn for Logged<'_> {
    fn get(&mut self, queue: &str, id: &str) -> Result<Option<Task>, StoreError> {
        let key = (queue.to_owned(), id.to_owned());
        if let Some(edit) = self.edits.get(&key) {
            return Ok(edit
                .now
                .clone()
                .or_else(|| self.mem.tasks.get(&key).cloned()));
        }
        if let Some(task) = self.mem.tasks.get(&key) {
            return Ok(Some(task.clone()));
        }
        match self.cold.find(queue, id)? {
            Some((loc, task)) => {
                self.edits.insert(
                    key,
                    Edit {
                        was: Some(loc),
                        now: Some(task.clone()),
                        dirty: false,
                    },
                );
                Ok(Some(task))
            }
            None => Ok(None),
        }
    }
    fn put(&mut self, task: &Task) -> Result<(), StoreError> {
        let key = (task.queue.clone(), task.id.clone());
        if self.cold.is_cold(task) {
            if self.mem.tasks.contains_key(&key) {
                self.set(key.clone(), None);
            }
            let entry = (task.run_at_ms, task.queue.clone(), task.id.clone());
            if self.mem.due.remove(&entry) {
                self.undo.push(Undo::DueRemoved(entry));
            }
            self.touched.insert(key.clone());
            let edit = self.edits.entry(key).or_insert(Edit {
                was: None,
                now: None,
                dirty: true,
            });
            edit.now = Some(task.clone());
            edit.dirty = true;
        } else {
            if let Some(edit) = self.edits.get_mut(&key) {
                edit.now = None;
                edit.dirty = true;
            }
            self.set(key, Some(task.clone()));
        }
        Ok(())
    }
    fn create(&mut self, task: &Task) -> Result<Option<Task>, StoreError> {
        if let Some(existing) = self.get(&task.queue, &task.id)? {
            return Ok(Some(existing));
        }
        self.put(task)?;
        Ok(None)
    }
    fn remove(&mut self, queue: &str, id: &str) -> Result<(), StoreError> {
        let key = (queue.to_owned(), id.to_owned());
        if let Some(edit) = self.edits.get_mut(&key) {
            edit.now = None;
            edit.dirty = true;
        }
        self.set(key, None);
        Ok(())
    }
    fn due_add(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError> {
        let entry = (due_ms, queue.to_owned(), id.to_owned());
        if due_ms >= self.cold.loaded()
            && self
                .edits
                .get(&(entry.1.clone(), entry.2.clone()))
                .and_then(|e| e.now.as_ref())
                .is_some_and(|t| t.run_at_ms == due_ms)
        {
            // A cold task: its slice is its due index.
            return Ok(());
        }
        if self.mem.due.insert(entry.clone()) {
            self.undo.push(Undo::DueAdded(entry));
        }
        Ok(())
    }
    fn due_remove(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError> {
        let entry = (due_ms, queue.to_owned(), id.to_owned());
        if self.mem.due.remove(&entry) {
            self.undo.push(Undo::DueRemoved(entry));
        }
        Ok(())
    }
    fn due_upto(
        &mut self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, String)>, StoreError> {
        self.mem.due_upto(now_ms, limit)
    }
    fn ready_add(&mut self, queue: &str, at_ms: u64, id: &str) -> Result<(), StoreError> {
        let entry = (queue.to_owned(), at_ms, id.to_owned());
        if self.mem.ready.insert(entry.clone()) {
            self.undo.push(Undo::ReadyAdded(entry));
        }
        Ok(())
    }
    fn ready_remove(&mut self, queue: &str, at_ms: u64, id: &str) -> Result<(), StoreError> {
        let entry = (queue.to_owned(), at_ms, id.to_owned());
        if self.mem.ready.remove(&entry) {
            self.undo.push(Undo::ReadyRemoved(entry));
        }
        Ok(())
    }
    fn ready_first(&mut self, queue: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.mem.ready_first(queue, limit)
    }
    fn count(&mut self, queue: &str, state: TaskState, delta: i64) {
        self.mem.count(queue, state, delta);
        self.undo.push(Undo::Count(queue.to_owned(), state, delta));
    }
}

/// `queue_len u16 | queue | id_len u16 | id`, with room for `capacity` more bytes.
pub(crate) fn key_bytes(queue: &str, id: &str, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + queue.len() + id.len() + capacity);
    out.extend_from_slice(&(queue.len() as u16).to_le_bytes());
    out.extend_from_slice(queue.as_bytes());
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    out
}

/// The key, then the record in the stored format: a put in the journal and in slice files.
pub(crate) fn put_bytes(task: &Task) -> Vec<u8> {
    let value = codec::encode(task);
    let mut bytes = key_bytes(&task.queue, &task.id, value.len());
    bytes.extend_from_slice(&value);
    bytes
}

fn put_record(task: &Task) -> Record {
    Record {
        kind: PUT,
        bytes: put_bytes(task),
    }
}

fn delete_record(queue: &str, id: &str) -> Record {
    Record {
        kind: DELETE,
        bytes: key_bytes(queue, id, 0),
    }
}

/// Splits a record's key from its value.
pub(crate) fn split_key(bytes: &[u8]) -> Option<(String, String, &[u8])> {
    let take = |at: usize| -> Option<(String, usize)> {
        let len = u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?) as usize;
        let text = std::str::from_utf8(bytes.get(at + 2..at + 2 + len)?).ok()?;
        Some((text.to_owned(), at + 2 + len))
    };
    let (queue, at) = take(0)?;
    let (id, at) = take(at)?;
    Some((queue, id, &bytes[at..]))
}

/// Sets each task's final state (`None`: gone) across both tiers, keeping indexes and counts in step:
/// replay and import.
fn set_final(
    mem: &mut Inner,
    cold: &mut Cold,
    finals: impl IntoIterator<Item = Result<(String, String, Option<Task>), StoreError>>,
) -> Result<(), StoreError> {
    let mut logged = Logged::new(mem, cold);
    for item in finals {
        let (queue, id, new) = item?;
        let old = logged.get(&queue, &id)?;
        engine::write(&mut logged, old.as_ref(), new.as_ref())?;
    }
    logged.settle();
    Ok(())
}

/// Decodes one journaled record: the task's key and its final state.
fn decode_record(
    record: &Record,
    source: &Path,
) -> Result<(String, String, Option<Task>), StoreError> {
    let damaged = |why: &str| StoreError::Open {
        path: source.display().to_string(),
        reason: format!("journal record {why}"),
    };
    let (queue, id, value) = split_key(&record.bytes).ok_or_else(|| damaged("with a bad key"))?;
    let new = match record.kind {
        PUT => Some(codec::decode(&queue, &id, value)?),
        DELETE => None,
        other => return Err(damaged(&format!("of unknown kind {other}"))),
    };
    Ok((queue, id, new))
}

fn journal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Hands tasks the cold tier releases to memory (they are scheduled, due before the load horizon).
fn load_hot(mem: &mut Inner) -> impl FnMut(Task) + '_ {
    |task| {
        mem.due
            .insert((task.run_at_ms, task.queue.clone(), task.id.clone()));
        mem.tasks
            .insert((task.queue.clone(), task.id.clone()), task);
    }
}

impl JournalStore {
    /// Opens (or creates) the store in `dir` (its journal lives in `dir/journal`, its slice files in
    /// `dir/slices`), replaying the journal; compacts it first when it has grown to several times the
    /// live data.
    pub fn open(dir: &Path, options: &JournalStoreOptions) -> Result<JournalStore, StoreError> {
        let journal_dir = dir.join("journal");
        let fresh = dir.join("journal.new");
        let old = dir.join("journal.old");
        // A compaction cut short: finish the switch, or drop the half-written copy.
        if !journal_dir.exists() && fresh.exists() {
            std::fs::rename(&fresh, &journal_dir).map_err(|e| StoreError::Open {
                path: fresh.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let _ = std::fs::remove_dir_all(&fresh);
        let _ = std::fs::remove_dir_all(&old);
        let mut mem = Inner::default();
        let mut cold = Cold::create(&dir.join("slices"), options.slices.clone(), options.now_ms)?;
        let mut records = 0u64;
        let journal = Journal::open(&journal_dir, options.journal.clone(), |_, batch| {
            records += batch.len() as u64;
            set_final(
                &mut mem,
                &mut cold,
                batch.iter().map(|r| decode_record(r, &journal_dir)),
            )
        })?;
        mem.forget_empty_queues();
        let store = JournalStore {
            state: Mutex::new(State {
                mem,
                cold,
                journal,
                free: None,
            }),
            dir: dir.to_owned(),
            min_free_bytes: options.min_free_bytes,
        };
        let stats = store.stats();
        let live = stats.hot_tasks + stats.cold_tasks;
        let on_disk = journal_bytes(&journal_dir);
        tracing::info!(
            dir = %journal_dir.display(),
            records,
            live,
            hot = stats.hot_tasks,
            cold = stats.cold_tasks,
            bytes = on_disk,
            "journal replayed"
        );
        if records > 4 * live.max(1) && on_disk >= options.compact_min_bytes {
            store.compact(options)?;
        }
        Ok(store)
    }

    /// What the store holds now.
    pub fn stats(&self) -> JournalStats {
        let state = self.lock();
        JournalStats {
            hot_tasks: state.mem.tasks.len() as u64,
            cold_tasks: state.cold.len() as u64,
            cold_index_bytes: state.cold.index_bytes() as u64,
            slice_bytes_written: state.cold.bytes_written(),
        }
    }

    /// Rewrites the journal as one put per live task, then switches to it (crash-safe: the old
    /// journal stays the truth until the new one is complete and renamed into place).
    fn compact(&self, options: &JournalStoreOptions) -> Result<(), StoreError> {
        let mut state = self.lock();
        let journal_dir = self.dir.join("journal");
        let fresh = self.dir.join("journal.new");
        let old = self.dir.join("journal.old");
        let io =
            |what: &str, e: std::io::Error| StoreError::Storage(format!("compaction: {what}: {e}"));
        let mut next = Journal::open(&fresh, options.journal.clone(), |_, _| Ok(()))?;
        let mut batch: Vec<Record> = Vec::with_capacity(COMPACT_BATCH);
        let mut failed: Option<StoreError> = None;
        let mut add = |task: &Task, batch: &mut Vec<Record>| {
            batch.push(put_record(task));
            if batch.len() >= COMPACT_BATCH && failed.is_none() {
                if let Err(error) = next.append(batch) {
                    failed = Some(error);
                }
                batch.clear();
            }
        };
        for task in state.mem.tasks.values() {
            add(task, &mut batch);
        }
        state.cold.for_each(|task| add(&task, &mut batch))?;
        if let Some(error) = failed {
            return Err(error);
        }
        if !batch.is_empty() {
            next.append(&batch)?;
        }
        drop(next);
        std::fs::rename(&journal_dir, &old).map_err(|e| io("rename the old journal", e))?;
        std::fs::rename(&fresh, &journal_dir).map_err(|e| io("rename the new journal", e))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync the data directory", e))?;
        let _ = std::fs::remove_dir_all(&old);
        let live = state.mem.tasks.len() + state.cold.len();
        state.journal = Journal::open(&journal_dir, options.journal.clone(), |_, _| Ok(()))?;
        tracing::info!(live, "journal compacted");
        Ok(())
    }

    /// Copies every task of `source` (another store, e.g. the redb file of an earlier release) into
    /// this one, durably, in batches; `progress` hears the count after each batch. Meant for an empty
    /// store: a task that already exists here is replaced.
    pub fn import(
        &self,
        source: &dyn Store,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, StoreError> {
        let mut copied = 0u64;
        for counts in source.queues()? {
            let mut after: Option<String> = None;
            loop {
                let page = source.list(&counts.queue, None, after.as_deref(), 10_000)?;
                if !page.tasks.is_empty() {
                    let mut state = self.lock();
                    let State {
                        mem, cold, journal, ..
                    } = &mut *state;
                    let records: Vec<Record> = page.tasks.iter().map(put_record).collect();
                    journal.append(&records)?;
                    set_final(
                        mem,
                        cold,
                        page.tasks
                            .iter()
                            .map(|t| Ok((t.queue.clone(), t.id.clone(), Some(t.clone())))),
                    )?;
                    copied += page.tasks.len() as u64;
                    progress(copied);
                }
                match page.next_cursor {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        Ok(copied)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the store keeps its files.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Store for JournalStore {
    fn apply(&self, now_ms: u64, commands: &[Command]) -> Result<Vec<Outcome>, StoreError> {
        let mut state = self.lock();
        let State {
            mem,
            cold,
            journal,
            free,
        } = &mut *state;
        if let Some(why) = journal.poisoned() {
            return Err(StoreError::Poisoned(why.to_owned()));
        }
        if self.min_free_bytes > 0 && commands.iter().any(|c| matches!(c, Command::Schedule(_))) {
            let reading = match *free {
                Some((at, bytes)) if now_ms.saturating_sub(at) < FREE_SPACE_EVERY_MS => Some(bytes),
                _ => {
                    let bytes = free_bytes(&self.dir);
                    *free = bytes.map(|b| (now_ms, b));
                    bytes
                }
            };
            if let Some(bytes) = reading
                && bytes < self.min_free_bytes
            {
                return Err(StoreError::NoSpace(format!(
                    "{} has {} MiB free, below the {} MiB kept for acks and recovery \
                     (--min-free-disk-mb); new tasks are refused until space returns",
                    self.dir.display(),
                    bytes >> 20,
                    self.min_free_bytes >> 20
                )));
            }
        }
        cold.advance(now_ms, load_hot(mem))?;
        let durable = commands.iter().any(Command::is_durable);
        let mut logged = Logged::new(mem, cold);
        let mut outcomes = Vec::with_capacity(commands.len());
        for command in commands {
            match engine::apply_one(&mut logged, now_ms, command) {
                Ok(outcome) => outcomes.push(outcome),
                Err(error) => {
                    logged.rollback();
                    return Err(error);
                }
            }
        }
        if durable
            && !logged.touched.is_empty()
            && let Err(error) = journal.append(&logged.records())
        {
            logged.rollback();
            return Err(error);
        }
        logged.settle();
        Ok(outcomes)
    }

    fn get(&self, queue: &str, id: &str) -> Result<Option<Task>, StoreError> {
        let mut state = self.lock();
        if let Some(task) = state.mem.get(queue, id)? {
            return Ok(Some(task));
        }
        Ok(state.cold.find(queue, id)?.map(|(_, task)| task))
    }

    fn list(
        &self,
        queue: &str,
        state: Option<TaskState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let guard = self.lock();
        let hot = guard.mem.list(queue, state, after, limit);
        if state.is_some_and(|s| s != TaskState::Scheduled) || guard.cold.len() == 0 {
            return Ok(hot);
        }
        // The hot listing is complete up to its cursor; cold tasks in the same id range join it.
        let bound = hot.next_cursor.clone();
        let mut cold: BTreeMap<String, Task> = BTreeMap::new();
        guard.cold.for_each(|task| {
            if task.queue != queue
                || after.is_some_and(|a| task.id.as_str() <= a)
                || bound.as_ref().is_some_and(|b| task.id > *b)
            {
                return;
            }
            cold.insert(task.id.clone(), task);
            // One more than a page, to know whether another page follows.
            if cold.len() > limit + 1 {
                cold.pop_last();
            }
        })?;
        let mut merged: Vec<Task> = hot.tasks;
        merged.extend(cold.into_values());
        merged.sort_by(|a, b| a.id.cmp(&b.id));
        let next_cursor = if merged.len() > limit {
            merged.truncate(limit);
            merged.last().map(|t| t.id.clone())
        } else {
            bound
        };
        Ok(Page {
            tasks: merged,
            next_cursor,
        })
    }

    fn queues(&self) -> Result<Vec<QueueCounts>, StoreError> {
        Ok(self.lock().mem.queues())
    }

    fn due_times(&self, from_ms: u64, to_ms: u64, limit: usize) -> Result<DueTimes, StoreError> {
        let state = self.lock();
        let mut hot = state.mem.due_times(from_ms, to_ms, limit);
        let loaded = state.cold.loaded();
        if to_ms < loaded || state.cold.len() == 0 {
            return Ok(hot);
        }
        // Hot due times (leases, purges) can lie beyond the load horizon too: merge, then cut. What
        // a truncated hot answer left out comes after its last time, so after the cut as well.
        let (times, more) = state.cold.due_times(from_ms.max(loaded), to_ms, limit)?;
        hot.times.extend(times);
        hot.times.sort_unstable();
        hot.times.dedup();
        hot.truncated |= more || hot.times.len() > limit;
        hot.times.truncate(limit);
        Ok(hot)
    }

    fn health(&self) -> Result<(), StoreError> {
        match self.lock().journal.poisoned() {
            Some(why) => Err(StoreError::Poisoned(why.to_owned())),
            None => Ok(()),
        }
    }
}
