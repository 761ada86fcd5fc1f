//! `JournalStore`: the sequential-write store, the default (docs/storage.md).
//!
//! Every durable change is appended to the [`Journal`] and made durable with one `fdatasync` per
//! commit before the commit returns; nothing is ever rewritten in place. Tasks due soon, ready,
//! leased, dead or kept after success are in memory (the hot tier, `memory::Inner`); scheduled tasks
//! due past the load boundary are in time-sliced files with a compact id table (the cold tier,
//! `cold.rs`). Commands run through the same engine as every other store, so the conformance suite
//! and the oracle apply.
//!
//! What a commit journals: for a batch with any durable command, the final record (or its deletion)
//! of every task the batch touched, and of every task acked lazily since the last journaled commit
//! (a lazy ack reaches the disk with the next durable commit, or at once past `LAZY_MAX` waiting;
//! the server sends a `Flush` `LAZY_FLUSH_MS` after lazy acks, so one always comes).
//! A batch of only non-durable commands (reserve, tick, extend, release) changes memory alone, so
//! after a crash those leases and promotions are simply not there: the task is handed out again, as
//! the `Store` contract allows. When the journal append fails the batch is undone in memory, so
//! nothing answered as failed is visible: a full disk answers `NoSpace` (507) and the store goes
//! on; a failed `fdatasync` poisons it.
//!
//! A checkpoint (the hot tasks, counts and the cold tier's synced file lengths) is started every
//! `checkpoint_bytes` of journal: snapshotted in one commit, its hot tasks encoded a step per commit
//! after it, written and synced on a thread of its own (see `Building`); a clean shutdown writes one
//! and waits. Open reads it and replays only the journal after it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use punctual_core::{Task, TaskState};

use crate::cold::{Cells, Cold, ColdCheckpoint, ColdSnapshot, SliceGeometry};
use crate::engine::{self, Txn};
use crate::journal::{Journal, JournalOptions, Record};
use crate::memory::Inner;
use crate::{
    Buckets, Command, DueCursor, DuePage, DueTimes, Outcome, Page, QueueCounts, Store, StoreError,
    Timeline, codec,
};

/// Record kinds in the journal.
const PUT: u8 = 1;
const DELETE: u8 = 2;
/// The checkpoint file's magic and format version.
const CHECKPOINT_MAGIC: &[u8; 4] = b"PCKP";
const CHECKPOINT_VERSION: u8 = 3;

/// Settings of the journal store.
#[derive(Debug, Clone)]
pub struct JournalStoreOptions {
    pub journal: JournalOptions,
    /// A checkpoint is written once the journal has grown by this many bytes since the last one (or
    /// by twice the last checkpoint's size, if that is more), and at clean shutdown; recovery replays
    /// only the journal after it.
    pub checkpoint_bytes: u64,
    /// Hot tasks each commit encodes into a checkpoint being built (see `Building`).
    pub checkpoint_step_tasks: usize,
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
            checkpoint_bytes: 16 << 20,
            checkpoint_step_tasks: CHECKPOINT_STEP_TASKS,
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
    /// Journal records replayed at open (those after the checkpoint).
    pub replayed_at_open: u64,
    /// Checkpoints written since open, and their bytes.
    pub checkpoints: u64,
    pub checkpoint_bytes_written: u64,
    /// A checkpoint is being encoded, a step per commit, or written on its thread.
    pub checkpoint_under_way: bool,
}

struct State {
    mem: Inner,
    cold: Cold,
    journal: Journal,
    /// Journal bytes appended since the last checkpoint, and the size that last checkpoint had.
    since_checkpoint: u64,
    checkpoint_size: u64,
    checkpoints: u64,
    checkpoint_bytes_written: u64,
    /// A checkpoint failed in a way that leaves the disk's state unknown.
    poisoned: Option<String>,
    /// The checkpoint being encoded, the one being written, and the chunks the last one was
    /// encoded in.
    building: Option<Building>,
    writing: Option<Writing>,
    spare: Vec<Vec<u8>>,
    /// The last free-space reading: (when, bytes free).
    free: Option<(u64, u64)>,
    /// Tasks acked lazily since the last journaled commit: their records go into the next one.
    lazy: HashSet<(String, String)>,
}

/// Most lazily acked tasks kept waiting for a durable commit; a lazy ack past it is journaled at
/// once, with the others.
const LAZY_MAX: usize = 1_000;

/// How often the free space is read again, at most, while it is at least twice `min_free_bytes`
/// (below that, every commit that schedules reads it).
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
    checkpoint_bytes: u64,
    checkpoint_step_tasks: usize,
    replayed: u64,
}

/// One change to undo if the journal refuses the batch.
enum Undo {
    /// The task was not there: remove it.
    Inserted((String, String)),
    /// The task was this: put it back.
    Replaced(Box<Task>),
    DueAdded((u64, String, String)),
    DueRemoved((u64, String, String)),
    ReadyAdded((String, u64, String)),
    ReadyRemoved((String, u64, String)),
}

/// A cold task's change within one batch: where it was in the cold tier when the batch began, and
/// what of it is cold now (`None`: it is hot, or gone).
struct Edit {
    /// Its location and due time.
    was: Option<(u32, u64)>,
    now: Option<Task>,
    dirty: bool,
    /// Which of the batch's journal records is `now`'s put.
    record: Option<usize>,
}

/// The engine's view of the state during one batch: hot changes are applied at once and logged, so
/// the batch can be undone; cold changes are kept aside in `edits` and applied to the cold tier only
/// once the batch stands. Touched tasks are journaled.
struct Logged<'a> {
    mem: &'a mut Inner,
    cold: &'a mut Cold,
    undo: Vec<Undo>,
    /// Each queue's counts before the batch first changed them.
    counts_before: Vec<(String, [i64; 5])>,
    touched: HashSet<(String, String), foldhash::fast::RandomState>,
    /// Whether the batch will be journaled: only then is `touched` kept. A batch of leases and
    /// ticks (two of a delivery's three commits), and a replay, skip a key copy and two hash
    /// lookups per change.
    journaled: bool,
    edits: HashMap<(String, String), Edit, foldhash::fast::RandomState>,
    /// Reusable keys, so lookups and removals do not allocate.
    key: (String, String),
    due_key: (u64, String, String),
    ready_key: (String, u64, String),
}

/// Sets `key` to (queue, id) reusing its buffers.
fn set_key(key: &mut (String, String), queue: &str, id: &str) {
    key.0.clear();
    key.0.push_str(queue);
    key.1.clear();
    key.1.push_str(id);
}

/// Sets a due-index key reusing its buffers.
fn set_due_key(key: &mut (u64, String, String), due_ms: u64, queue: &str, id: &str) {
    key.0 = due_ms;
    key.1.clear();
    key.1.push_str(queue);
    key.2.clear();
    key.2.push_str(id);
}

/// Sets a ready-index key reusing its buffers.
fn set_ready_key(key: &mut (String, u64, String), queue: &str, at_ms: u64, id: &str) {
    key.0.clear();
    key.0.push_str(queue);
    key.1 = at_ms;
    key.2.clear();
    key.2.push_str(id);
}

impl<'a> Logged<'a> {
    fn new(mem: &'a mut Inner, cold: &'a mut Cold, commands: usize, journaled: bool) -> Logged<'a> {
        Logged {
            mem,
            cold,
            undo: Vec::new(),
            counts_before: Vec::new(),
            touched: HashSet::with_capacity_and_hasher(
                if journaled { commands } else { 0 },
                Default::default(),
            ),
            journaled,
            edits: HashMap::with_capacity_and_hasher(commands, Default::default()),
            key: (String::new(), String::new()),
            due_key: (0, String::new(), String::new()),
            ready_key: (String::new(), 0, String::new()),
        }
    }

    /// Sets the hot record of the task named by `self.key` (`None`: removes it), logging the
    /// change. A record that is replaced keeps its map key: no key is allocated on that path.
    fn set(&mut self, task: Option<Task>) {
        let key = &self.key;
        let undo = match task {
            Some(task) => match self.mem.tasks.get_mut(key) {
                Some(slot) => Some(Undo::Replaced(Box::new(std::mem::replace(slot, task)))),
                None => {
                    self.mem.tasks.insert(key.clone(), task);
                    Some(Undo::Inserted(key.clone()))
                }
            },
            None => self
                .mem
                .tasks
                .remove(key)
                .map(|previous| Undo::Replaced(Box::new(previous))),
        };
        self.undo.extend(undo);
        // In a journaled batch, recorded even when nothing was hot: the deletion may be of a cold task.
        if self.journaled && !self.touched.contains(key) {
            self.touched.insert(key.clone());
        }
    }

    /// The final record of every touched task, for the journal.
    /// Every touched task's final record (its put, or its deletion): the hot ones, then the cold
    /// ones, whose edits learn where their record is so the slice file gets the same bytes.
    fn records(&mut self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.touched.len() + self.edits.len());
        for key in &self.touched {
            let cold = self.edits.get(key).and_then(|e| e.now.as_ref());
            out.push(match cold.or_else(|| self.mem.tasks.get(key)) {
                Some(task) => put_record(task),
                None => delete_record(&key.0, &key.1),
            });
        }
        for (key, edit) in &mut self.edits {
            if !edit.dirty || self.touched.contains(key) {
                continue;
            }
            match &edit.now {
                Some(task) => {
                    edit.record = Some(out.len());
                    out.push(put_record(task));
                }
                None => out.push(delete_record(&key.0, &key.1)),
            }
        }
        out
    }

    /// Appends to `out` the current records of lazily acked tasks this batch did not touch itself:
    /// the hot record, or a deletion when the task is gone (purged, cancelled); a task that is in
    /// the cold tier now was journaled when it went there.
    fn lazy_records(
        &self,
        lazy: &HashSet<(String, String)>,
        out: &mut Vec<Record>,
    ) -> Result<(), StoreError> {
        for key in lazy {
            if self.touched.contains(key) || self.edits.contains_key(key) {
                continue;
            }
            match self.mem.tasks.get(key) {
                Some(task) => out.push(put_record(task)),
                None if self.cold.find(&key.0, &key.1)?.is_some() => {}
                None => out.push(delete_record(&key.0, &key.1)),
            }
        }
        Ok(())
    }

    /// The batch stands: applies its cold changes (`records`: what [`Logged::records`] answered,
    /// if the batch was journaled).
    fn settle(self, records: &[Record]) {
        let Logged {
            mem, cold, edits, ..
        } = self;
        for ((queue, id), edit) in edits {
            if !edit.dirty {
                continue;
            }
            if let Some((loc, due_ms)) = edit.was
                && let Err(error) = cold.remove(&queue, &id, loc, due_ms)
            {
                tracing::warn!(%error, "cannot append a deletion marker to a slice file");
            }
            let encoded = edit.record.and_then(|i| records.get(i));
            if let Some(task) = edit.now
                && let Err(error) = cold.insert(&task, encoded.map(|r| r.bytes.as_slice()))
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
        for (queue, counts) in self.counts_before {
            mem.counts.insert(queue, counts);
        }
        for undo in self.undo.into_iter().rev() {
            match undo {
                Undo::Replaced(task) => {
                    mem.tasks
                        .insert((task.queue.clone(), task.id.clone()), *task);
                }
                Undo::Inserted(key) => {
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
            }
        }
        mem.forget_empty_queues();
    }
}

impl Txn for Logged<'_> {
    fn get(&mut self, queue: &str, id: &str) -> Result<Option<Task>, StoreError> {
        set_key(&mut self.key, queue, id);
        let key = &self.key;
        if let Some(edit) = self.edits.get(key) {
            return Ok(edit
                .now
                .clone()
                .or_else(|| self.mem.tasks.get(key).cloned()));
        }
        if let Some(task) = self.mem.tasks.get(key) {
            return Ok(Some(task.clone()));
        }
        match self.cold.find(queue, id)? {
            Some((loc, task)) => {
                self.edits.insert(
                    (queue.to_owned(), id.to_owned()),
                    Edit {
                        was: Some((loc, task.run_at_ms)),
                        now: Some(task.clone()),
                        dirty: false,
                        record: None,
                    },
                );
                Ok(Some(task))
            }
            None => Ok(None),
        }
    }
    fn put(&mut self, task: &Task) -> Result<(), StoreError> {
        set_key(&mut self.key, &task.queue, &task.id);
        if self.cold.is_cold(task) {
            if self.mem.tasks.contains_key(&self.key) {
                self.set(None);
            }
            if !self.mem.due.is_empty() {
                set_due_key(&mut self.due_key, task.run_at_ms, &task.queue, &task.id);
                if let Some(entry) = self.mem.due.take(&self.due_key) {
                    self.undo.push(Undo::DueRemoved(entry));
                }
            }
            // Not `touched`: a dirty edit is journaled by itself (see `records`).
            match self.edits.get_mut(&self.key) {
                Some(edit) => {
                    edit.now = Some(task.clone());
                    edit.dirty = true;
                }
                None => {
                    self.edits.insert(
                        self.key.clone(),
                        Edit {
                            was: None,
                            now: Some(task.clone()),
                            dirty: true,
                            record: None,
                        },
                    );
                }
            }
        } else {
            if let Some(edit) = self.edits.get_mut(&self.key) {
                edit.now = None;
                edit.dirty = true;
            }
            self.set(Some(task.clone()));
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
        set_key(&mut self.key, queue, id);
        if let Some(edit) = self.edits.get_mut(&self.key) {
            edit.now = None;
            edit.dirty = true;
        }
        self.set(None);
        Ok(())
    }
    fn due_add(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError> {
        if due_ms >= self.cold.loaded() {
            set_key(&mut self.key, queue, id);
            if self
                .edits
                .get(&self.key)
                .and_then(|e| e.now.as_ref())
                .is_some_and(|t| t.run_at_ms == due_ms)
            {
                // A cold task: its slice is its due index.
                return Ok(());
            }
        }
        let entry = (due_ms, queue.to_owned(), id.to_owned());
        if self.mem.due.insert(entry.clone()) {
            self.undo.push(Undo::DueAdded(entry));
        }
        Ok(())
    }
    fn due_remove(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError> {
        set_due_key(&mut self.due_key, due_ms, queue, id);
        if let Some(entry) = self.mem.due.take(&self.due_key) {
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
        set_ready_key(&mut self.ready_key, queue, at_ms, id);
        if let Some(entry) = self.mem.ready.take(&self.ready_key) {
            self.undo.push(Undo::ReadyRemoved(entry));
        }
        Ok(())
    }
    fn ready_first(&mut self, queue: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.mem.ready_first(queue, limit)
    }
    fn count(&mut self, queue: &str, state: TaskState, delta: i64) {
        if !self.counts_before.iter().any(|(q, _)| q == queue) {
            let before = self.mem.counts.get(queue).copied().unwrap_or_default();
            self.counts_before.push((queue.to_owned(), before));
        }
        self.mem.count(queue, state, delta);
    }
}

/// `queue_len u16 | queue | id_len u16 | id`, with room for `capacity` more bytes.
pub(crate) fn key_bytes(queue: &str, id: &str, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + queue.len() + id.len() + capacity);
    push_key(queue, id, &mut out);
    out
}

/// Appends a record's key: `queue length u16 | queue | id length u16 | id`.
fn push_key(queue: &str, id: &str, out: &mut Vec<u8>) {
    for text in [queue, id] {
        out.extend_from_slice(&(text.len() as u16).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
}

/// The key, then the record in the stored format: a put in the journal and in slice files.
pub(crate) fn put_bytes(task: &Task) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(
        68 + task.queue.len() + task.id.len() + task.payload.as_ref().map_or(0, String::len),
    );
    put_bytes_into(task, &mut bytes);
    bytes
}

/// [`put_bytes`], appending to `out`.
fn put_bytes_into(task: &Task, out: &mut Vec<u8>) {
    push_key(&task.queue, &task.id, out);
    codec::encode_into(task, out);
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
/// replay and import. `records[i]` is the journal record `finals[i]` came from (or went to), so a
/// task that goes cold is copied into its slice from those bytes.
fn set_final(
    mem: &mut Inner,
    cold: &mut Cold,
    records: &[Record],
    finals: impl IntoIterator<Item = Result<(String, String, Option<Task>), StoreError>>,
) -> Result<(), StoreError> {
    let mut logged = Logged::new(mem, cold, records.len(), false);
    for (i, item) in finals.into_iter().enumerate() {
        let (queue, id, new) = item?;
        let old = logged.get(&queue, &id)?;
        engine::write(&mut logged, old.as_ref(), new.as_ref())?;
        set_key(&mut logged.key, &queue, &id);
        if let Some(edit) = logged.edits.get_mut(&logged.key)
            && edit.dirty
        {
            edit.record = edit.now.as_ref().map(|_| i);
        }
    }
    logged.settle(records);
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

/// Counts a batch's journal bytes toward the next checkpoint.
fn state_bytes(records: &[Record], since_checkpoint: &mut u64) {
    *since_checkpoint += records
        .iter()
        .map(|r| 5 + r.bytes.len() as u64)
        .sum::<u64>()
        + 16;
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

/// What a checkpoint file holds.
struct Checkpoint {
    /// The journal's batches from this sequence number on come after the checkpoint.
    next_seq: u64,
    counts: Counts,
    /// Version 3 on: the cold tier's cells at the snapshot.
    cells: Option<Cells>,
    cold: ColdCheckpoint,
    hot: Vec<Task>,
}

/// The counts a checkpoint holds.
enum Counts {
    /// Version 1: every queue's counts by state, as they were with the hot tasks it holds.
    All(BTreeMap<String, [i64; 5]>),
    /// Version 2: the cold tier's tasks by queue at the snapshot; the hot tasks count themselves.
    Cold(BTreeMap<String, i64>),
}

/// Cold chunks (of up to 256 tasks) an id-order listing reads per hold of the store's lock.
const LIST_CHUNKS_PER_LOCK: usize = 16;

/// Hot tasks a commit encodes into a checkpoint being built, by default: 1–2.5 ms of the writer's
/// time on the 2-core VM (0.5–1.2 µs a task), so no commit waits long behind a checkpoint however
/// many tasks are hot.
pub const CHECKPOINT_STEP_TASKS: usize = 2_048;

/// The checkpoint file is written and synced this much at a time. On ext4 (`data=ordered`) a
/// journal commit's `fdatasync` waits for every data block allocated in the same file-system
/// transaction, so one large write synced at the end stalls the commits running beside it for as
/// long as the whole file takes to reach the disk; in steps, a commit waits for one step at most.
const CHECKPOINT_STEP_BYTES: usize = 1 << 20;

/// The size of the pieces a checkpoint's hot tasks are encoded into.
const CHECKPOINT_CHUNK_BYTES: usize = 4 << 20;

/// A checkpoint (format version 3):
/// `"PCKP" | 3 u8 | 3 zero bytes | body length u64 | body | crc32c(body) u32`, where the body is
/// `next_seq u64 | cold counts | cold cells | cold tier | hot task count u64 | (length u32 | put record)*`
/// and the cold cells are `count u64 | (queue length u16 | queue | level u8 | cell start u64 | tasks u64)*`.
/// Version 2 had no cells (they are counted from the slices at open); version 1 also held every
/// queue's counts by state instead of the cold tier's.
///
/// It is fuzzy, the way ARIES checkpoints are: the cold tier and its counts are taken at one commit
/// (the snapshot), and the hot tasks are encoded a step per commit after it, each as it is when its
/// step comes. Recovery replays the journal from the snapshot on, and every durable change since
/// the snapshot is in it as the task's final record, so what a task's encoded state adds beyond its
/// last journal record is only non-durable (a lease, a promotion), which a crash may lose anyway.
/// Tasks that left the cold tier after the snapshot are left out: the snapshot's slices have them.
struct Building {
    next_seq: u64,
    cold: ColdSnapshot,
    hot_at_snapshot: usize,
    /// The file in pieces: the header, counts and cold tier, then chunks of about
    /// [`CHECKPOINT_CHUNK_BYTES`] of hot tasks. (One growing buffer was copied whole each time it
    /// doubled: 200 ms in one commit at 55 MB, most of it the kernel zeroing the new pages.)
    pieces: Vec<Vec<u8>>,
    /// Where the hot-task count goes in the first piece, once known.
    count_at: usize,
    tasks: u64,
    /// The last hot task a step reached.
    cursor: Option<(String, String)>,
    encode_ns: u64,
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn decode_checkpoint(path: &Path, bytes: &[u8]) -> Result<Checkpoint, StoreError> {
    let damaged = |why: &str| StoreError::Open {
        path: path.display().to_string(),
        reason: format!("checkpoint damaged: {why}"),
    };
    if bytes.len() < 20 || &bytes[..4] != CHECKPOINT_MAGIC {
        return Err(damaged("not a checkpoint (bad magic or too short)"));
    }
    let version = bytes[4];
    if !(1..=CHECKPOINT_VERSION).contains(&version) {
        return Err(StoreError::FormatVersion {
            path: path.display().to_string(),
            found: u64::from(version),
            expected: u64::from(CHECKPOINT_VERSION),
        });
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let body = bytes
        .get(16..16 + len)
        .ok_or_else(|| damaged("shorter than its length"))?;
    let crc = bytes
        .get(16 + len..20 + len)
        .ok_or_else(|| damaged("no checksum"))?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(damaged("bad checksum"));
    }
    let parse = || -> Option<Checkpoint> {
        let mut at = 0usize;
        let u64_at = |at: &mut usize| crate::cold::read_u64(body, at);
        let next_seq = u64_at(&mut at)?;
        let mut all = BTreeMap::new();
        let mut cold_counts = BTreeMap::new();
        for _ in 0..u64_at(&mut at)? {
            let n = u16::from_le_bytes(body.get(at..at + 2)?.try_into().ok()?) as usize;
            let queue = std::str::from_utf8(body.get(at + 2..at + 2 + n)?).ok()?;
            at += 2 + n;
            if version == 1 {
                let mut c = [0i64; 5];
                for slot in &mut c {
                    *slot = u64_at(&mut at)? as i64;
                }
                all.insert(queue.to_owned(), c);
            } else {
                cold_counts.insert(queue.to_owned(), u64_at(&mut at)? as i64);
            }
        }
        let cells = if version >= 3 {
            let mut cells = Cells::new();
            for _ in 0..u64_at(&mut at)? {
                let n = u16::from_le_bytes(body.get(at..at + 2)?.try_into().ok()?) as usize;
                let queue = std::str::from_utf8(body.get(at + 2..at + 2 + n)?).ok()?;
                at += 2 + n;
                let level = *body.get(at)? as usize;
                at += 1;
                let start = u64_at(&mut at)?;
                let tasks = u64_at(&mut at)?;
                cells.entry(queue.to_owned()).or_default()[..3]
                    .get_mut(level)?
                    .insert(start, tasks);
            }
            Some(cells)
        } else {
            None
        };
        let cold = ColdCheckpoint::decode(body, &mut at)?;
        let mut hot = Vec::new();
        for _ in 0..u64_at(&mut at)? {
            let n = u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
            let record = body.get(at + 4..at + 4 + n)?;
            at += 4 + n;
            let (queue, id, value) = split_key(record)?;
            hot.push(codec::decode(&queue, &id, value).ok()?);
        }
        Some(Checkpoint {
            next_seq,
            cells,
            counts: if version == 1 {
                Counts::All(all)
            } else {
                Counts::Cold(cold_counts)
            },
            cold,
            hot,
        })
    };
    parse().ok_or_else(|| damaged("a field is cut or malformed"))
}

/// Why a checkpoint was not installed.
enum Failure {
    /// Nothing changed on disk that matters (the old checkpoint stands): the next one tries again.
    Retry(StoreError),
    /// An `fdatasync` failed or which checkpoint a restart finds is unknown: poison the store.
    Poison(String),
}

/// What a checkpoint's thread hands back.
struct Written {
    cold: ColdSnapshot,
    slices_ms: u64,
    file_ms: u64,
    /// The checkpoint's pieces, for the next one to reuse.
    pieces: Vec<Vec<u8>>,
    result: Result<(), Failure>,
}

/// A checkpoint being made durable on its own thread.
struct Writing {
    bytes: u64,
    tasks: u64,
    hot_at_snapshot: usize,
    encode_ms: u64,
    thread: std::thread::JoinHandle<Written>,
}

/// The checkpoint thread's part: the body's length and checksum filled in, the slice files synced,
/// then the checkpoint file written and synced in steps and renamed over the old one, then the
/// directory synced.
fn write_checkpoint(
    dir: &Path,
    next_seq: u64,
    cold: ColdSnapshot,
    mut pieces: Vec<Vec<u8>>,
) -> Written {
    // Only for the log line.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    let body_len = (pieces.iter().map(Vec::len).sum::<usize>() - 16) as u64;
    pieces[0][8..16].copy_from_slice(&body_len.to_le_bytes());
    let mut crc = crc32c::crc32c(&pieces[0][16..]);
    for piece in &pieces[1..] {
        crc = crc32c::crc32c_append(crc, piece);
    }
    pieces.push(crc.to_le_bytes().to_vec());
    let mut slices_ms = 0;
    let mut result = || -> Result<(), Failure> {
        cold.sync().map_err(Failure::Poison)?;
        slices_ms = started.elapsed().as_millis() as u64;
        let fresh = dir.join("checkpoint.new");
        let path = dir.join("checkpoint");
        let written = std::fs::File::create(&fresh).and_then(|mut f| {
            for step in pieces.iter().flat_map(|p| p.chunks(CHECKPOINT_STEP_BYTES)) {
                std::io::Write::write_all(&mut f, step)?;
                f.sync_data()?;
            }
            Ok(())
        });
        if let Err(error) = written {
            // The old checkpoint still stands; nothing was released.
            let _ = std::fs::remove_file(&fresh);
            return Err(Failure::Retry(crate::journal::io_error(
                &fresh,
                "cannot write",
                error,
            )));
        }
        std::fs::rename(&fresh, &path)
            .map_err(|e| e.to_string())
            .and_then(|()| crate::journal::sync_dir(dir).map_err(|e| e.to_string()))
            .map_err(|error| {
                Failure::Poison(format!("cannot install {}: {error}", path.display()))
            })?;
        // Installed: what it covers goes, here rather than on the writer (unlinking large files
        // and syncing the directory can take milliseconds). A file left behind is only space; the
        // next checkpoint (or open) tries again.
        if let Err(error) = crate::journal::release_segments_before(&dir.join("journal"), next_seq)
        {
            tracing::warn!(%error, "cannot release journal segments");
        }
        cold.remove_doomed();
        Ok(())
    };
    let result = result();
    Written {
        cold,
        slices_ms,
        file_ms: started.elapsed().as_millis() as u64 - slices_ms,
        pieces,
        result,
    }
}

impl State {
    /// Starts a checkpoint unless one is under way: the cold tier's snapshot and the counts here;
    /// the hot tasks a step per commit after it ([`State::step_checkpoint`]); the writes and
    /// `fdatasync`s on a thread of their own ([`State::finish_checkpoint`] installs the result).
    fn start_checkpoint(&mut self) -> Result<(), StoreError> {
        if let Some(why) = self.poisoned() {
            return Err(StoreError::Poisoned(why.to_owned()));
        }
        if self.building.is_some() || self.writing.is_some() {
            return Ok(());
        }
        let cold = self.cold.snapshot()?;
        let next_seq = self.journal.next_seq();
        let mut buffer = Vec::new();
        buffer.extend_from_slice(CHECKPOINT_MAGIC);
        buffer.extend_from_slice(&[CHECKPOINT_VERSION, 0, 0, 0]);
        put_u64(&mut buffer, 0);
        put_u64(&mut buffer, next_seq);
        let counts = self.cold.queue_counts();
        put_u64(&mut buffer, counts.len() as u64);
        for (queue, n) in counts {
            buffer.extend_from_slice(&(queue.len() as u16).to_le_bytes());
            buffer.extend_from_slice(queue.as_bytes());
            put_u64(&mut buffer, *n as u64);
        }
        let cells = self.cold.cells();
        let entries: usize = cells
            .values()
            .map(|levels| levels.iter().map(BTreeMap::len).sum::<usize>())
            .sum();
        put_u64(&mut buffer, entries as u64);
        for (queue, levels) in cells {
            for (level, cells) in levels.iter().enumerate() {
                for (start, n) in cells {
                    buffer.extend_from_slice(&(queue.len() as u16).to_le_bytes());
                    buffer.extend_from_slice(queue.as_bytes());
                    buffer.push(level as u8);
                    put_u64(&mut buffer, *start);
                    put_u64(&mut buffer, *n);
                }
            }
        }
        cold.record.encode(&mut buffer);
        let count_at = buffer.len();
        put_u64(&mut buffer, 0);
        self.cold.remember_given(true);
        self.building = Some(Building {
            next_seq,
            cold,
            hot_at_snapshot: self.mem.tasks.len(),
            pieces: vec![buffer],
            count_at,
            tasks: 0,
            cursor: None,
            encode_ns: 0,
        });
        self.since_checkpoint = 0;
        Ok(())
    }

    /// Encodes up to `budget` more hot tasks into the checkpoint being built; once all are in, hands
    /// it to a thread to write.
    fn step_checkpoint(&mut self, dir: &Path, budget: usize) -> Result<(), StoreError> {
        let State {
            mem,
            cold,
            building,
            spare,
            ..
        } = self;
        let Some(b) = building else {
            return Ok(());
        };
        // Only for the log line.
        #[allow(clippy::disallowed_methods)]
        let started = std::time::Instant::now();
        let done = mem.tasks.walk(&mut b.cursor, budget, |key, task| {
            if cold.was_given(key) {
                return;
            }
            if b.pieces.len() == 1
                || b.pieces
                    .last()
                    .is_some_and(|p| p.len() >= CHECKPOINT_CHUNK_BYTES)
            {
                let mut chunk = spare
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(CHECKPOINT_CHUNK_BYTES + (64 << 10)));
                chunk.clear();
                b.pieces.push(chunk);
            }
            let chunk = b.pieces.last_mut().expect("pushed above");
            let at = chunk.len();
            chunk.extend_from_slice(&[0; 4]);
            put_bytes_into(task, chunk);
            let len = (chunk.len() - at - 4) as u32;
            chunk[at..at + 4].copy_from_slice(&len.to_le_bytes());
            b.tasks += 1;
        });
        b.encode_ns += started.elapsed().as_nanos() as u64;
        if !done {
            return Ok(());
        }
        let b = building.take().expect("checked above");
        cold.remember_given(false);
        let mut pieces = b.pieces;
        pieces[0][b.count_at..b.count_at + 8].copy_from_slice(&b.tasks.to_le_bytes());
        let bytes = pieces.iter().map(Vec::len).sum::<usize>() as u64 + 4;
        self.checkpoint_size = bytes;
        let thread_dir = dir.to_owned();
        let snapshot = b.cold;
        let spawned = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || write_checkpoint(&thread_dir, b.next_seq, snapshot, pieces));
        match spawned {
            Ok(thread) => {
                self.writing = Some(Writing {
                    bytes,
                    tasks: b.tasks,
                    hot_at_snapshot: b.hot_at_snapshot,
                    encode_ms: b.encode_ns / 1_000_000,
                    thread,
                });
                Ok(())
            }
            // The closure (and the snapshot in it) is gone: its doomed files are forgotten, which
            // only leaves them on disk until the next open removes them; the next checkpoint
            // syncs the directory in its place.
            Err(error) => {
                self.cold.snapshot_lost();
                Err(StoreError::Storage(format!(
                    "cannot start the checkpoint thread: {error}"
                )))
            }
        }
    }

    /// Installs the checkpoint being written, if it is done (or, with `wait`, once it is): the
    /// journal before it and the slice files it no longer names are released.
    fn finish_checkpoint(&mut self, wait: bool) -> Result<(), StoreError> {
        if self
            .writing
            .as_ref()
            .is_none_or(|w| !wait && !w.thread.is_finished())
        {
            return Ok(());
        }
        let writing = self.writing.take().expect("checked above");
        let Ok(written) = writing.thread.join() else {
            let why = "the checkpoint thread panicked: which checkpoint a restart finds is unknown"
                .to_owned();
            self.poisoned = Some(why.clone());
            return Err(StoreError::Poisoned(why));
        };
        // The chunks are kept for the next checkpoint: fresh pages cost the kernel's zeroing.
        self.spare = written
            .pieces
            .into_iter()
            .filter(|p| p.capacity() >= CHECKPOINT_CHUNK_BYTES)
            .collect();
        match written.result {
            Ok(()) => {
                tracing::info!(
                    bytes = writing.bytes,
                    hot = writing.tasks,
                    hot_at_snapshot = writing.hot_at_snapshot,
                    encode_ms = writing.encode_ms,
                    slices_sync_ms = written.slices_ms,
                    file_ms = written.file_ms,
                    "checkpoint installed"
                );
                self.cold.installed(written.cold);
                self.checkpoints += 1;
                self.checkpoint_bytes_written += writing.bytes;
                Ok(())
            }
            Err(Failure::Retry(error)) => {
                self.cold.not_installed(written.cold);
                Err(error)
            }
            Err(Failure::Poison(why)) => {
                self.poisoned = Some(why.clone());
                Err(StoreError::Poisoned(why))
            }
        }
    }

    /// Writes a checkpoint and waits for it (open, import, clean shutdown): one under way is
    /// finished first, then a fresh one is made in one go.
    fn checkpoint(&mut self, dir: &Path) -> Result<(), StoreError> {
        self.step_checkpoint(dir, usize::MAX)?;
        if let Err(error) = self.finish_checkpoint(true) {
            tracing::error!(%error, "checkpoint failed");
        }
        self.start_checkpoint()?;
        self.step_checkpoint(dir, usize::MAX)?;
        self.finish_checkpoint(true)
    }

    fn poisoned(&self) -> Option<&str> {
        self.journal.poisoned().or(self.poisoned.as_deref())
    }
}

impl JournalStore {
    /// Opens (or creates) the store in `dir`: its checkpoint (`dir/checkpoint`), the slice files it
    /// names (`dir/slices`), then the journal after it (`dir/journal`). Without a checkpoint (a new
    /// directory, or one written before checkpoints existed) the whole journal is replayed and a
    /// checkpoint written at once.
    pub fn open(dir: &Path, options: &JournalStoreOptions) -> Result<JournalStore, StoreError> {
        // Only for the log line: how long each phase of recovery took.
        #[allow(clippy::disallowed_methods)]
        let started = std::time::Instant::now();
        let journal_dir = dir.join("journal");
        // Left by the stage-1 store's compaction at open, which no longer exists.
        let _ = std::fs::remove_dir_all(dir.join("journal.new"));
        let _ = std::fs::remove_dir_all(dir.join("journal.old"));
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let _ = std::fs::remove_file(dir.join("checkpoint.new"));
        let checkpoint_path = dir.join("checkpoint");
        let checkpoint = crate::cold::read_all(&checkpoint_path)?
            .map(|bytes| decode_checkpoint(&checkpoint_path, &bytes))
            .transpose()?;
        let mut mem = Inner::default();
        let (mut cold, first_seq) = match &checkpoint {
            Some(cp) => {
                for task in &cp.hot {
                    engine::write(&mut mem, None, Some(task))?;
                }
                let mut cold = Cold::open(
                    &dir.join("slices"),
                    options.slices.clone(),
                    Some(&cp.cold),
                    options.now_ms,
                )?;
                let scheduled = TaskState::Scheduled.index();
                match &cp.counts {
                    Counts::Cold(by_queue) => {
                        for (queue, n) in by_queue {
                            mem.counts.entry(queue.clone()).or_default()[scheduled] += n;
                        }
                        cold.set_queue_counts(by_queue.clone());
                    }
                    // A consistent snapshot of both tiers: the cold ones are what the hot ones
                    // do not account for.
                    Counts::All(all) => {
                        let mut by_queue = BTreeMap::new();
                        for (queue, counts) in all {
                            let hot = mem.counts.get(queue).map_or(0, |c| c[scheduled]);
                            if counts[scheduled] > hot {
                                by_queue.insert(queue.clone(), counts[scheduled] - hot);
                            }
                        }
                        mem.counts = all.clone();
                        cold.set_queue_counts(by_queue);
                    }
                }
                match &cp.cells {
                    Some(cells) => cold.set_cells(cells.clone()),
                    None => cold.count_cells()?,
                }
                (cold, cp.next_seq)
            }
            None => (
                Cold::open(
                    &dir.join("slices"),
                    options.slices.clone(),
                    None,
                    options.now_ms,
                )?,
                1,
            ),
        };
        let restored = started.elapsed();
        let mut records = 0u64;
        let mut bytes = 0u64;
        let mut journal_options = options.journal.clone();
        journal_options.first_seq = first_seq;
        journal_options.replay_from = first_seq;
        let gap = |found: String| StoreError::Open {
            path: journal_dir.display().to_string(),
            reason: format!(
                "the checkpoint covers the journal up to batch {first_seq}, but the journal {found}; \
                 batches in between are missing"
            ),
        };
        // Batches before `first_seq` are not handed here (`replay_from`).
        let journal = Journal::open(&journal_dir, journal_options, |seq, batch| {
            if records == 0 && seq > first_seq {
                return Err(gap(format!("starts at batch {seq}")));
            }
            records += batch.len() as u64;
            bytes += batch.iter().map(|r| 5 + r.bytes.len() as u64).sum::<u64>() + 16;
            set_final(
                &mut mem,
                &mut cold,
                &batch,
                batch.iter().map(|r| decode_record(r, &journal_dir)),
            )
        })?;
        if journal.next_seq() < first_seq {
            return Err(gap(format!("ends before batch {}", journal.next_seq())));
        }
        let replayed = started.elapsed();
        cold.advance(options.now_ms, load_hot(&mut mem))?;
        mem.forget_empty_queues();
        let store = JournalStore {
            state: Mutex::new(State {
                mem,
                cold,
                journal,
                since_checkpoint: bytes,
                checkpoint_size: 0,
                checkpoints: 0,
                checkpoint_bytes_written: 0,
                poisoned: None,
                building: None,
                writing: None,
                spare: Vec::new(),
                free: None,
                lazy: HashSet::new(),
            }),
            dir: dir.to_owned(),
            min_free_bytes: options.min_free_bytes,
            checkpoint_bytes: options.checkpoint_bytes,
            checkpoint_step_tasks: options.checkpoint_step_tasks.max(1),
            replayed: records,
        };
        let stats = store.stats();
        tracing::info!(
            dir = %dir.display(),
            from_checkpoint = checkpoint.is_some(),
            replayed = records,
            hot = stats.hot_tasks,
            cold = stats.cold_tasks,
            restore_ms = restored.as_millis() as u64,
            replay_ms = (replayed - restored).as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "journal store opened"
        );
        if checkpoint.is_none() && records > 0 {
            store.lock().checkpoint(dir)?;
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
            replayed_at_open: self.replayed,
            checkpoints: state.checkpoints,
            checkpoint_bytes_written: state.checkpoint_bytes_written,
            checkpoint_under_way: state.building.is_some() || state.writing.is_some(),
        }
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
                        mem,
                        cold,
                        journal,
                        since_checkpoint,
                        ..
                    } = &mut *state;
                    let records: Vec<Record> = page.tasks.iter().map(put_record).collect();
                    journal.append(&records)?;
                    state_bytes(&records, since_checkpoint);
                    set_final(
                        mem,
                        cold,
                        &records,
                        page.tasks
                            .iter()
                            .map(|t| Ok((t.queue.clone(), t.id.clone(), Some(t.clone())))),
                    )?;
                    if *since_checkpoint >= self.checkpoint_bytes {
                        state.checkpoint(&self.dir)?;
                    }
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

    /// Waits for a checkpoint being written in the background and installs it: for tests and tools
    /// that copy the directory between commits.
    pub fn wait_for_checkpoint(&self) -> Result<(), StoreError> {
        self.lock().finish_checkpoint(true)
    }

    /// Where the store keeps its files.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for JournalStore {
    /// Waits for a checkpoint being written, so that nothing renames files in the directory after
    /// the store is gone (a store opened on it next would not expect that).
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = state.finish_checkpoint(true) {
            tracing::error!(%error, "checkpoint failed");
        }
    }
}

impl Store for JournalStore {
    fn apply(&self, now_ms: u64, commands: &[Command]) -> Result<Vec<Outcome>, StoreError> {
        let mut state = self.lock();
        if let Err(error) = state.finish_checkpoint(false) {
            tracing::error!(%error, "checkpoint failed");
        }
        if let Some(why) = state.poisoned() {
            return Err(StoreError::Poisoned(why.to_owned()));
        }
        let State {
            mem,
            cold,
            journal,
            free,
            since_checkpoint,
            lazy,
            ..
        } = &mut *state;
        if self.min_free_bytes > 0
            && commands.iter().any(|c| {
                matches!(
                    c,
                    Command::Schedule(_) | Command::Put { .. } | Command::Incr { .. }
                )
            })
        {
            let reading = match *free {
                // Near the threshold every commit reads it again: a fast writer can fill what is
                // left of a small disk within one interval.
                Some((at, bytes))
                    if now_ms.saturating_sub(at) < FREE_SPACE_EVERY_MS
                        && bytes >= self.min_free_bytes.saturating_mul(2) =>
                {
                    Some(bytes)
                }
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
        // A lazy ack is not journaled by itself (its caller does not wait for an fsync), but its
        // task's record goes into the next journaled commit, as redb's lazy commits reach the disk
        // with the next durable one: this store keeps nothing of a batch it does not journal, so
        // without it the ack would be lost in any later crash and the task handed out again.
        let acked_lazily = commands
            .iter()
            .filter(|c| matches!(c, Command::AckLazy { .. }))
            .count();
        let durable = commands.iter().any(Command::is_durable)
            || (acked_lazily > 0 && lazy.len() + acked_lazily > LAZY_MAX);
        let mut logged = Logged::new(mem, cold, commands.len(), durable);
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
        let mut records = Vec::new();
        if durable && (!logged.touched.is_empty() || !logged.edits.is_empty() || !lazy.is_empty()) {
            records = logged.records();
            let own = records.len();
            if let Err(error) = logged.lazy_records(lazy, &mut records) {
                logged.rollback();
                return Err(error);
            }
            if !records.is_empty() {
                if let Err(error) = journal.append(&records) {
                    logged.rollback();
                    return Err(error);
                }
                state_bytes(&records, since_checkpoint);
            }
            lazy.clear();
            // `settle` indexes the batch's own records.
            records.truncate(own);
        } else if acked_lazily > 0 {
            for command in commands {
                if let Command::AckLazy { queue, id, .. } = command {
                    lazy.insert((queue.clone(), id.clone()));
                }
            }
        }
        logged.settle(&records);
        let due = state.since_checkpoint >= self.checkpoint_bytes.max(2 * state.checkpoint_size)
            || state.cold.doomed_bytes() >= self.checkpoint_bytes;
        // A clean shutdown checkpoints and waits for it, so the next start replays nothing.
        let shutdown = commands.iter().any(|c| matches!(c, Command::Sync));
        let checkpointed = if shutdown {
            state.checkpoint(&self.dir)
        } else if due {
            state
                .start_checkpoint()
                .and_then(|()| state.step_checkpoint(&self.dir, self.checkpoint_step_tasks))
        } else {
            state.step_checkpoint(&self.dir, self.checkpoint_step_tasks)
        };
        if let Err(error) = checkpointed {
            // The commit stands (the journal has it); the checkpoint is tried again later, unless
            // the store is now poisoned, which the next commit reports.
            tracing::error!(%error, "checkpoint failed");
        }
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
        let (hot, chunks) = {
            let guard = self.lock();
            let hot = guard.mem.list(queue, state, after, limit);
            if state.is_some_and(|s| s != TaskState::Scheduled) || guard.cold.len() == 0 {
                return Ok(hot);
            }
            (hot, guard.cold.chunk_ids())
        };
        // The hot listing is complete up to its cursor; cold tasks in the same id range join it.
        // The cold tier is read a few chunks per hold of the lock, so commits go on meanwhile (at
        // 10 M pending, reading all of it takes seconds). A task that moves between the tiers
        // during the listing may be missed or seen in both: as with any page of a live listing.
        let bound = hot.next_cursor.clone();
        let mut cold: BTreeMap<String, Task> = BTreeMap::new();
        for batch in chunks.chunks(LIST_CHUNKS_PER_LOCK) {
            // Under the lock: the chunks' bytes. Without it: parsing, checksums and the key
            // filter. Under it again: which candidates are live. Without it: decoding them.
            let data: Vec<(u32, Vec<u8>)> = {
                let guard = self.lock();
                let mut data = Vec::with_capacity(batch.len());
                for &chunk in batch {
                    if let Some(bytes) = guard.cold.chunk_data(chunk)? {
                        data.push((chunk, bytes));
                    }
                }
                data
            };
            let mut candidates = Vec::new();
            for (chunk, bytes) in &data {
                let records = crate::cold::parse_chunk(*chunk, bytes).map_err(|why| {
                    StoreError::Storage(format!("a slice file's chunk {chunk} is damaged: {why}"))
                })?;
                for (loc, q, id, value) in records {
                    let full = cold.len() > limit;
                    if q != queue
                        || after.is_some_and(|a| id.as_str() <= a)
                        || bound.as_ref().is_some_and(|b| id > *b)
                        || (full && cold.last_key_value().is_some_and(|(last, _)| id >= *last))
                    {
                        continue;
                    }
                    candidates.push((loc, id, value));
                }
            }
            if candidates.is_empty() {
                continue;
            }
            let live: Vec<bool> = {
                let guard = self.lock();
                candidates
                    .iter()
                    .map(|(loc, id, _)| guard.cold.is_live(queue, id, *loc))
                    .collect()
            };
            for ((_, id, value), live) in candidates.into_iter().zip(live) {
                if live {
                    cold.insert(id.clone(), codec::decode(queue, &id, value)?);
                    // One more than a page, to know whether another page follows.
                    if cold.len() > limit + 1 {
                        cold.pop_last();
                    }
                }
            }
        }
        let mut merged: BTreeMap<String, Task> =
            hot.tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
        merged.extend(cold);
        let mut merged: Vec<Task> = merged.into_values().collect();
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

    /// Cold tasks from the first slices in time order that hold enough of them (each slice read
    /// whole: a 1-minute slice up to 2 hours ahead, an hour's up to 3 days, a day's beyond), merged
    /// with the hot ones from the in-memory due index.
    fn list_due(
        &self,
        queue: &str,
        after: Option<&DueCursor>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        let state = self.lock();
        let cold = state.cold.list_due(queue, after, limit + 1)?;
        // Hot tasks past the last cold one a full page needs cannot be on this page.
        let bound = (cold.len() > limit).then(|| DueCursor::of(&cold[limit]));
        // Hot scheduled tasks are due before the load horizon (later ones are cold): the hot scan
        // stops there, short of the purge times of tasks kept after success.
        let until = state.cold.loaded();
        let (mut tasks, stopped) =
            state
                .mem
                .list_due(queue, after, limit + 1, bound.as_ref(), until);
        tasks.extend(cold);
        tasks.sort_by(|a, b| (a.run_at_ms, &a.id).cmp(&(b.run_at_ms, &b.id)));
        // A hot scan that ran out of budget saw nothing past where it stopped.
        if let Some(stop) = &stopped {
            tasks.retain(|t| !stop.before(t));
        }
        Ok(crate::memory::due_page(tasks, stopped, limit))
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

    /// Hot tasks from the in-memory due index; cold ones from the cold tier's cells, without
    /// reading a slice.
    fn timeline(&self, queue: &str, buckets: &Buckets) -> Result<Timeline, StoreError> {
        let state = self.lock();
        let mut out = Timeline::empty(buckets);
        // Hot scheduled tasks are due before the load horizon (later ones are cold, but for one
        // kept in memory after a failed slice write): the scan stops there, short of the purge
        // times of tasks kept after success, which can be millions.
        let until = state.cold.loaded();
        state.mem.timeline(queue, buckets, &mut out.counts, until);
        out.resolution_ms = state.cold.timeline(queue, buckets, &mut out.counts);
        Ok(out)
    }

    fn health(&self) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Err(error) = state.finish_checkpoint(false) {
            tracing::error!(%error, "checkpoint failed");
        }
        match state.poisoned() {
            Some(why) => Err(StoreError::Poisoned(why.to_owned())),
            None => Ok(()),
        }
    }
}
