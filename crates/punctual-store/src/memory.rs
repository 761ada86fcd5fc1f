//! The in-memory store: the same engine over a hash map of tasks and ordered index sets. It is the
//! oracle of the conformance suite and the store of router tests; it keeps nothing across restarts.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use punctual_core::{Task, TaskState};

use crate::engine::{self, Txn};
use crate::{
    Buckets, Command, DueCursor, DuePage, DueTimes, LIST_SCAN_BUDGET, Outcome, Page, QueueCounts,
    Store, StoreError, Timeline,
};

/// A page of at most `limit` of `tasks` (in due order, possibly one more than `limit`), which a
/// scan that stopped at `stopped` found.
pub(crate) fn due_page(mut tasks: Vec<Task>, stopped: Option<DueCursor>, limit: usize) -> DuePage {
    if tasks.len() > limit {
        tasks.truncate(limit);
        let next = tasks.last().map(DueCursor::of);
        return DuePage { tasks, next };
    }
    DuePage {
        tasks,
        next: stopped,
    }
}

/// Tasks with their due and ready indexes and per-queue counts, in memory: the whole state of the
/// in-memory store, and the working state of the journal store.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) tasks: Tasks,
    pub(crate) due: BTreeSet<(u64, String, String)>,
    pub(crate) ready: BTreeSet<(String, u64, String)>,
    pub(crate) counts: BTreeMap<String, [i64; 5]>,
}

/// Tasks by `(queue, id)`: a hash map for the lookups and replacements of every transition, and
/// each queue's ids in order for listing. (A single ordered map made every lookup ~20 string
/// comparisons: a fifth of the writer's time in a drain.)
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    map: TaskMap,
    ids: BTreeMap<String, BTreeSet<String>>,
}

/// Maps the task map is split into.
const SHARDS: usize = 256;

type Shard = HashMap<(String, String), Box<Task>, foldhash::fast::RandomState>;

/// The task map, in [`SHARDS`] hash maps chosen by the key's hash. A hash map grows by moving every
/// entry into a table twice the size, all in one call: with a million hot tasks in one map, that
/// stalled a commit for 0.5–2.5 s on the 2-core VM, mostly the kernel zeroing the new table's pages
/// (docs/benchmarks.md, session 10). Each shard grows on its own, a 256th of that at a time, and
/// boxed tasks make a moved entry 56 bytes instead of the whole task.
struct TaskMap {
    shards: Vec<Shard>,
    pick: foldhash::fast::FixedState,
    len: usize,
}

impl Default for TaskMap {
    fn default() -> Self {
        TaskMap {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            pick: foldhash::fast::FixedState::with_seed(0x7075_6e63_7475_616c),
            len: 0,
        }
    }
}

impl std::fmt::Debug for TaskMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskMap").field("len", &self.len).finish()
    }
}

impl TaskMap {
    fn shard(&self, key: &(String, String)) -> usize {
        use std::hash::BuildHasher;
        (self.pick.hash_one(key) >> 56) as usize % SHARDS
    }

    fn get(&self, key: &(String, String)) -> Option<&Task> {
        self.shards[self.shard(key)].get(key).map(|t| &**t)
    }

    fn get_mut(&mut self, key: &(String, String)) -> Option<&mut Task> {
        let shard = self.shard(key);
        self.shards[shard].get_mut(key).map(|t| &mut **t)
    }

    fn contains_key(&self, key: &(String, String)) -> bool {
        self.shards[self.shard(key)].contains_key(key)
    }

    fn remove(&mut self, key: &(String, String)) -> Option<Task> {
        let shard = self.shard(key);
        let task = self.shards[shard].remove(key)?;
        self.len -= 1;
        Some(*task)
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl Tasks {
    pub(crate) fn get(&self, key: &(String, String)) -> Option<&Task> {
        self.map.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &(String, String)) -> Option<&mut Task> {
        self.map.get_mut(key)
    }

    pub(crate) fn contains_key(&self, key: &(String, String)) -> bool {
        self.map.contains_key(key)
    }

    /// Stores `task` under `key`, answering the task it replaced.
    pub(crate) fn insert(&mut self, key: (String, String), task: Task) -> Option<Task> {
        let shard = self.map.shard(&key);
        match self.map.shards[shard].entry(key) {
            Entry::Occupied(mut slot) => Some(std::mem::replace(&mut **slot.get_mut(), task)),
            Entry::Vacant(slot) => {
                let (queue, id) = slot.key();
                match self.ids.get_mut(queue) {
                    Some(ids) => ids.insert(id.clone()),
                    None => self
                        .ids
                        .entry(queue.clone())
                        .or_default()
                        .insert(id.clone()),
                };
                slot.insert(Box::new(task));
                self.map.len += 1;
                None
            }
        }
    }

    pub(crate) fn remove(&mut self, key: &(String, String)) -> Option<Task> {
        let task = self.map.remove(key)?;
        if let Some(ids) = self.ids.get_mut(&key.0) {
            ids.remove(&key.1);
            if ids.is_empty() {
                self.ids.remove(&key.0);
            }
        }
        Some(task)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Calls `each` with up to `budget` tasks in `(queue, id)` order, from just after `cursor` (from
    /// the start if it is `None`), and leaves `cursor` at the last one; answers whether that reached
    /// the end. Tasks may come and go between calls: each call finds its place again by key.
    pub(crate) fn walk(
        &self,
        cursor: &mut Option<(String, String)>,
        budget: usize,
        mut each: impl FnMut(&(String, String), &Task),
    ) -> bool {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let from = cursor.clone();
        let queues = match &from {
            Some((queue, _)) => self
                .ids
                .range::<str, _>((Included(queue.as_str()), Unbounded)),
            None => self.ids.range::<str, _>(..),
        };
        let mut left = budget;
        // One key, refilled for each lookup: no allocation per task.
        let mut key = (String::new(), String::new());
        let mut moved = false;
        for (queue, ids) in queues {
            let range = match &from {
                Some((q, id)) if q == queue => {
                    ids.range::<str, _>((Excluded(id.as_str()), Unbounded))
                }
                _ => ids.range::<str, _>(..),
            };
            for id in range {
                if left == 0 {
                    if moved {
                        *cursor = Some(key);
                    }
                    return false;
                }
                left -= 1;
                key.0.clear();
                key.0.push_str(queue);
                key.1.clear();
                key.1.push_str(id);
                moved = true;
                if let Some(task) = self.map.get(&key) {
                    each(&key, task);
                }
            }
        }
        true
    }

    /// A queue's tasks in id order, from `from` on (inclusive).
    fn queue_from<'a>(
        &'a self,
        queue: &'a str,
        from: &'a str,
    ) -> impl Iterator<Item = &'a Task> + 'a {
        let key = |id: &String| (queue.to_owned(), id.clone());
        self.ids
            .get(queue)
            .into_iter()
            .flat_map(move |ids| {
                ids.range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            })
            .filter_map(move |id| self.map.get(&key(id)))
    }
}

/// A store that lives in memory only.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied command that matters for a test oracle.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Txn for Inner {
    fn get(&mut self, queue: &str, id: &str) -> Result<Option<Task>, StoreError> {
        Ok(self.tasks.get(&(queue.to_owned(), id.to_owned())).cloned())
    }
    fn put(&mut self, task: &Task) -> Result<(), StoreError> {
        self.tasks
            .insert((task.queue.clone(), task.id.clone()), task.clone());
        Ok(())
    }
    fn create(&mut self, task: &Task) -> Result<Option<Task>, StoreError> {
        let key = (task.queue.clone(), task.id.clone());
        if let Some(existing) = self.tasks.get(&key) {
            return Ok(Some(existing.clone()));
        }
        self.tasks.insert(key, task.clone());
        Ok(None)
    }
    fn remove(&mut self, queue: &str, id: &str) -> Result<(), StoreError> {
        self.tasks.remove(&(queue.to_owned(), id.to_owned()));
        Ok(())
    }
    fn due_add(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError> {
        self.due.insert((due_ms, queue.to_owned(), id.to_owned()));
        Ok(())
    }
    fn due_remove(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError> {
        self.due.remove(&(due_ms, queue.to_owned(), id.to_owned()));
        Ok(())
    }
    fn due_upto(
        &mut self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, String)>, StoreError> {
        Ok(self
            .due
            .iter()
            .take_while(|(due, _, _)| *due <= now_ms)
            .take(limit)
            .cloned()
            .collect())
    }
    fn ready_add(&mut self, queue: &str, at_ms: u64, id: &str) -> Result<(), StoreError> {
        self.ready.insert((queue.to_owned(), at_ms, id.to_owned()));
        Ok(())
    }
    fn ready_remove(&mut self, queue: &str, at_ms: u64, id: &str) -> Result<(), StoreError> {
        self.ready.remove(&(queue.to_owned(), at_ms, id.to_owned()));
        Ok(())
    }
    fn ready_first(&mut self, queue: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .ready
            .range((queue.to_owned(), 0, String::new())..)
            .take_while(|(q, _, _)| q == queue)
            .take(limit)
            .map(|(_, _, id)| id.clone())
            .collect())
    }
    fn count(&mut self, queue: &str, state: TaskState, delta: i64) {
        match self.counts.get_mut(queue) {
            Some(counts) => counts[state.index()] += delta,
            None => self.counts.entry(queue.to_owned()).or_default()[state.index()] += delta,
        }
    }
}

impl Inner {
    /// Applies `commands` in order (see [`Store::apply`]).
    pub(crate) fn apply(
        &mut self,
        now_ms: u64,
        commands: &[Command],
    ) -> Result<Vec<Outcome>, StoreError> {
        let outcomes = commands
            .iter()
            .map(|command| engine::apply_one(self, now_ms, command))
            .collect::<Result<Vec<_>, _>>()?;
        self.forget_empty_queues();
        Ok(outcomes)
    }

    pub(crate) fn forget_empty_queues(&mut self) {
        self.counts
            .retain(|_, counts| counts.iter().any(|c| *c != 0));
    }

    pub(crate) fn list(
        &self,
        queue: &str,
        state: Option<TaskState>,
        after: Option<&str>,
        limit: usize,
    ) -> Page {
        let mut page = Page::default();
        let mut scanned = 0;
        for task in self.tasks.queue_from(queue, after.unwrap_or("")) {
            let id = &task.id;
            if after == Some(id.as_str()) {
                continue;
            }
            scanned += 1;
            if state.is_none_or(|s| s == task.state) {
                page.tasks.push(task.clone());
            }
            if page.tasks.len() >= limit || scanned >= LIST_SCAN_BUDGET {
                page.next_cursor = Some(id.clone());
                return page;
            }
        }
        page
    }

    pub(crate) fn queues(&self) -> Vec<QueueCounts> {
        self.counts
            .iter()
            .map(|(queue, counts)| QueueCounts {
                queue: queue.clone(),
                counts: counts.map(|c| c.max(0) as u64),
            })
            .collect()
    }

    /// Adds the scheduled tasks of `queue` due before `until` in the due index to `counts` (one
    /// per slice of `buckets`). The due index also holds lease expiries and purge times; each entry
    /// of the range costs a lookup of its task's state.
    pub(crate) fn timeline(&self, queue: &str, buckets: &Buckets, counts: &mut [u64], until: u64) {
        let mut key = (String::new(), String::new());
        for (due, q, id) in self
            .due
            .range((buckets.from_ms, String::new(), String::new())..)
        {
            if *due >= until {
                break;
            }
            let Some(i) = buckets.index(*due) else { break };
            if q != queue {
                continue;
            }
            key.0.clone_from(q);
            key.1.clone_from(id);
            if self
                .tasks
                .get(&key)
                .is_some_and(|t| t.state == TaskState::Scheduled)
            {
                counts[i] += 1;
            }
        }
    }

    /// Up to `want` scheduled tasks of `queue` after `after`, in due order, not past `bound` and
    /// due before `until`; and where the scan stopped if [`LIST_SCAN_BUDGET`] entries (of every
    /// queue) ran out first.
    pub(crate) fn list_due(
        &self,
        queue: &str,
        after: Option<&DueCursor>,
        want: usize,
        bound: Option<&DueCursor>,
        until: u64,
    ) -> (Vec<Task>, Option<DueCursor>) {
        use std::ops::Bound;
        let start = match after {
            Some(c) => Bound::Excluded((c.due_ms, queue.to_owned(), c.id.clone())),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut key = (String::new(), String::new());
        for (scanned, (due, q, id)) in self.due.range((start, Bound::Unbounded)).enumerate() {
            if *due >= until {
                break;
            }
            if bound
                .is_some_and(|b| (*due, q.as_str(), id.as_str()) > (b.due_ms, queue, b.id.as_str()))
            {
                break;
            }
            if scanned >= LIST_SCAN_BUDGET {
                return (out, Some(DueCursor::resume_after(queue, *due, q, id)));
            }
            if q != queue {
                continue;
            }
            key.0.clone_from(q);
            key.1.clone_from(id);
            if let Some(task) = self.tasks.get(&key)
                && task.state == TaskState::Scheduled
            {
                out.push(task.clone());
                if out.len() >= want {
                    break;
                }
            }
        }
        (out, None)
    }

    pub(crate) fn due_times(&self, from_ms: u64, to_ms: u64, limit: usize) -> DueTimes {
        let mut out = DueTimes::default();
        for (due, _, _) in self.due.range((from_ms, String::new(), String::new())..) {
            if *due > to_ms {
                break;
            }
            if out.times.last() != Some(due) {
                if out.times.len() >= limit {
                    out.truncated = true;
                    break;
                }
                out.times.push(*due);
            }
        }
        out
    }
}

impl Store for MemoryStore {
    fn apply(&self, now_ms: u64, commands: &[Command]) -> Result<Vec<Outcome>, StoreError> {
        self.lock().apply(now_ms, commands)
    }

    fn get(&self, queue: &str, id: &str) -> Result<Option<Task>, StoreError> {
        self.lock().get(queue, id)
    }

    fn list(
        &self,
        queue: &str,
        state: Option<TaskState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        Ok(self.lock().list(queue, state, after, limit))
    }

    fn queues(&self) -> Result<Vec<QueueCounts>, StoreError> {
        Ok(self.lock().queues())
    }

    fn due_times(&self, from_ms: u64, to_ms: u64, limit: usize) -> Result<DueTimes, StoreError> {
        Ok(self.lock().due_times(from_ms, to_ms, limit))
    }

    fn timeline(&self, queue: &str, buckets: &Buckets) -> Result<Timeline, StoreError> {
        let mut out = Timeline::empty(buckets);
        self.lock()
            .timeline(queue, buckets, &mut out.counts, u64::MAX);
        Ok(out)
    }

    fn list_due(
        &self,
        queue: &str,
        after: Option<&DueCursor>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        let (tasks, stopped) = self
            .lock()
            .list_due(queue, after, limit + 1, None, u64::MAX);
        Ok(due_page(tasks, stopped, limit))
    }

    fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
