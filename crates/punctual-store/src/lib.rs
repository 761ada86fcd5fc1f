//! The narrow `Store` trait of Punctual and its backends.
//!
//! A store applies a batch of [`Command`]s in one transaction ([`Store::apply`]) and answers a few reads.
//! The transition logic is written once, in `engine`, over a small transaction interface, so every backend
//! behaves the same; the [`conformance`] suite checks that from the outside.
//!
//! - [`MemoryStore`]: `BTreeMap`s behind a lock; the test oracle.
//! - [`RedbStore`]: the embedded, durable default (one redb file).
//! - [`RedisStore`]: the distributed mode, on a standalone Redis or a Redis Cluster shared by many nodes.

mod codec;
mod cold;
pub mod conformance;
mod engine;
pub mod idtable;
pub mod journal;
mod journal_store;
mod memory;
mod redb_store;
mod redis_store;
pub mod redis_testing;

use punctual_core::{LeaseCheck, Task, TaskState};
use thiserror::Error;

pub use codec::FORMAT_VERSION;
pub use cold::SliceGeometry;
pub use engine::{LEASE_EXPIRED, ready_target};
pub use journal_store::{JournalStats, JournalStore, JournalStoreOptions};
pub use memory::MemoryStore;
pub use redb_store::{RedbOptions, RedbStore};
pub use redis_store::{
    MAX_SHARDS, OWNER_GRACE_MS, RedisOptions, RedisStore, RedisTarget, RedisTls,
};

/// A store failure. Expected outcomes (not found, lease lost, …) are [`Outcome`]s, not errors.
#[derive(Debug, Error)]
pub enum StoreError {
    /// An earlier commit failed; the store refuses writes until restarted, because it can no longer
    /// tell what reached the disk.
    #[error("store is poisoned after an earlier commit failure: {0}")]
    Poisoned(String),
    #[error("storage error: {0}")]
    Storage(String),
    /// The disk is full: this commit was refused and nothing of it was kept; the store stays usable
    /// and writes succeed again once there is space.
    #[error("no space left for the store: {0}")]
    NoSpace(String),
    /// The store cannot be reached right now (a Redis connection failed or timed out, or replicas did
    /// not confirm in time); the request may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt record for {queue}/{id}: {reason}")]
    Corrupt {
        queue: String,
        id: String,
        reason: String,
    },
    #[error(
        "data file {path} was written with format version {found}; this build reads version {expected}"
    )]
    FormatVersion {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("cannot open data file {path}: {reason}")]
    Open { path: String, reason: String },
}

/// One state change. A batch of commands is applied in order in one transaction.
#[derive(Debug, Clone)]
pub enum Command {
    /// Create a task (its `run_at_ms`, policy and fingerprint set by the caller); idempotent by fingerprint.
    Schedule(Box<Task>),
    /// Move a scheduled or ready task; `payload: Some(None)` clears the payload.
    Reschedule {
        queue: String,
        id: String,
        run_at_ms: Option<u64>,
        payload: Option<Option<String>>,
    },
    /// Delete a task that is not leased.
    Cancel { queue: String, id: String },
    /// Lease up to `max` ready tasks of a queue, oldest due first.
    Reserve {
        queue: String,
        max: usize,
        /// Lease length asked by the consumer; else the task's own, else `default_lease_ms`.
        lease_ms: Option<u64>,
        default_lease_ms: u64,
        /// Unique per command; lease tokens are this plus a counter.
        token_prefix: String,
    },
    Ack {
        queue: String,
        id: String,
        token: String,
        retention_ms: u64,
    },
    /// An `Ack` whose caller is told before the commit is durable: a crash may lose it, and the
    /// task is then handed out again. For the Redis front end's fired keys, whose events have
    /// already been handed out (pub/sub is at-least-once after a crash either way).
    AckLazy {
        queue: String,
        id: String,
        token: String,
        retention_ms: u64,
    },
    Nack {
        queue: String,
        id: String,
        token: String,
        error: Option<String>,
        /// Replaces the policy's delay.
        delay_ms: Option<u64>,
        /// Keeps the policy's delay but waits at least this long (a webhook's `Retry-After`).
        min_delay_ms: Option<u64>,
    },
    /// Gives a leased task back without counting the attempt, due again after `delay_ms`.
    Release {
        queue: String,
        id: String,
        token: String,
        delay_ms: u64,
    },
    /// Gives a leased task back as `scheduled` at `run_at_ms` with a fresh set of attempts, and
    /// `payload` when given: the lease holder renews a task that stands for something ongoing (a
    /// recurring schedule's record, due again at its next materialisation).
    Renew {
        queue: String,
        id: String,
        token: String,
        run_at_ms: u64,
        payload: Option<String>,
    },
    /// Changes nothing, but its commit is durable: it makes every earlier non-durable commit (leases,
    /// ticks, releases) durable too. Sent at clean shutdown; the journal store also checkpoints.
    Sync,
    /// Changes nothing, but its commit is durable, like `Sync` without the shutdown's checkpoint:
    /// sent a short while after lazy acks ([`LAZY_FLUSH_MS`]) so that they reach the disk even when
    /// no durable write follows them. A store with nothing waiting writes nothing.
    Flush,
    /// Lease up to `max` ready webhook tasks of any queue, oldest due first, for the webhook sender.
    /// Each lease lasts the task's webhook timeout plus `grace_ms`.
    ReservePush {
        max: usize,
        default_timeout_ms: u64,
        grace_ms: u64,
        token_prefix: String,
    },
    Extend {
        queue: String,
        id: String,
        token: String,
        lease_ms: u64,
    },
    /// A dead task back to ready.
    Retry { queue: String, id: String },
    /// Writes a task over whatever has its id, as Redis's `SET` writes a key: a scheduled task (a
    /// live key) or a finished one (an expired key, kept for its value) is replaced, subject to
    /// `when`. A task that is firing right now (`ready` or `leased`) is not touched: `WrongState`.
    /// With `keep_due`, a live task's due time is kept (`SET … KEEPTTL`). Answers `Outcome::Put`.
    Put {
        task: Box<Task>,
        when: PutWhen,
        keep_due: bool,
    },
    /// Deletes a task only while it is `scheduled` (a live key): `Cancelled`, else `NotFound` or
    /// `WrongState`. Unlike `Cancel`, it never removes a fired task whose delivery is pending.
    Delete { queue: String, id: String },
    /// Moves a `scheduled` task's due time (`EXPIRE`, `PERSIST`): `Updated`, else `NotFound` or
    /// `WrongState`. A due time at or before now makes it ready: it fires.
    SetDue {
        queue: String,
        id: String,
        run_at_ms: u64,
    },
    /// Adds `by` to the integer a task's payload holds (a JSON integer, or a JSON string of one), as
    /// Redis's `INCRBY`; a task that is not live is replaced by `template` holding `by`. The due
    /// time is kept. `Updated`/`Created`, `NotInteger`, or `WrongState` while firing.
    Incr { template: Box<Task>, by: i64 },
    /// Process due-index entries at or before now: fire, expire leases, purge. At most `limit`.
    /// Tasks that become ready go straight to `takers` (waiting consumers) while they have room,
    /// after each taker first got its queue's older ready tasks: one commit fires and leases them.
    Tick { limit: usize, takers: Vec<Taker> },
}

/// When a [`Command::Put`] writes, judged on the live (`scheduled`) task with its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutWhen {
    Always,
    /// Only if there is no live task (`SET … NX`).
    Absent,
    /// Only if there is one (`SET … XX`).
    Present,
}

/// A waiting consumer to whom a tick hands tasks directly, like a [`Command::Reserve`].
#[derive(Debug, Clone, PartialEq)]
pub struct Taker {
    pub queue: String,
    pub max: usize,
    pub lease_ms: Option<u64>,
    pub default_lease_ms: u64,
    pub token_prefix: String,
}

impl Command {
    /// Whether the caller is told of this command only after an fsync.
    ///
    /// Leases and timer-driven transitions are not: losing them in a crash only means the task is
    /// handed out again (at-least-once), and keeping them off the fsync path keeps delivery fast.
    /// They become durable with the next durable commit, which always comes before any ack.
    pub fn is_durable(&self) -> bool {
        !matches!(
            self,
            Command::Reserve { .. }
                | Command::AckLazy { .. }
                | Command::Extend { .. }
                | Command::Tick { .. }
                | Command::ReservePush { .. }
                | Command::Release { .. }
        )
    }
}

/// The name under which ready webhook tasks of every queue are indexed: tasks with a webhook are
/// never handed to pull consumers, only to the webhook sender (`Command::ReservePush`). It cannot
/// collide with a queue name, which may not contain control characters.
pub const PUSH_INDEX: &str = "\u{1}push";

/// How long lazy acks ([`Command::AckLazy`]) may wait for a durable commit before the server sends
/// a [`Command::Flush`]: the most a crash can lose of them when no other write follows.
pub const LAZY_FLUSH_MS: u64 = 200;

/// What the timer tick did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickReport {
    /// Queues that got newly ready tasks (to wake their long-polls); [`PUSH_INDEX`] for webhook tasks.
    pub ready_queues: Vec<String>,
    /// Scheduled tasks that became ready.
    pub fired: u64,
    /// Leases that expired (each a failed attempt).
    pub expired: u64,
    /// Tasks that died because their last lease expired, by queue.
    pub dead: Vec<String>,
    /// Each expired lease: which task, which attempt failed, and when it runs again (`None`: dead).
    pub lease_failures: Vec<LeaseFailure>,
    /// Succeeded tasks removed after their retention.
    pub purged: u64,
    /// New due times created (retries after an expired lease).
    pub due_times: Vec<u64>,
    /// The limit was hit: tick again at once.
    pub more: bool,
    /// Tasks leased to each taker, in the order of `Command::Tick::takers`.
    pub taken: Vec<Vec<Task>>,
}

/// A lease that expired in a tick (a failed attempt), for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseFailure {
    pub queue: String,
    pub id: String,
    pub attempt: u32,
    /// When the next attempt is due; `None` when the task died.
    pub retry_at_ms: Option<u64>,
}

/// The answer to one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Created(Task),
    /// Same id, same fingerprint: the existing task, unchanged.
    Existing(Task),
    /// Same id, different request: the existing task, unchanged.
    Conflict(Task),
    /// Rescheduled, nacked, extended or retried.
    Updated(Task),
    Cancelled(Task),
    Acked(Task),
    Reserved(Vec<Task>),
    NotFound,
    /// The command does not apply in the task's state (e.g. cancel while leased).
    WrongState(TaskState),
    /// The lease token no longer holds the task.
    LeaseLost(LeaseCheck),
    Ticked(TickReport),
    /// A `Sync` or a `Flush` was committed durably.
    Synced,
    /// What a [`Command::Put`] found (`previous`, in whatever state) and wrote (`None`: its `when`
    /// was not met, nothing changed).
    Put {
        previous: Option<Box<Task>>,
        written: Option<Box<Task>>,
    },
    /// [`Command::Incr`] on a payload that is not an integer, or a sum out of range.
    NotInteger,
}

/// Task counts of one queue, indexed by [`TaskState::index`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub queue: String,
    pub counts: [u64; 5],
}

impl QueueCounts {
    pub fn get(&self, state: TaskState) -> u64 {
        self.counts[state.index()]
    }
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    pub tasks: Vec<Task>,
    /// Pass back as `after` for the next page; `None` at the end.
    pub next_cursor: Option<String>,
}

/// A position in a queue's listing of scheduled tasks in due order: after the task due at `due_ms`
/// with id `id` (tasks due at the same time are in id order). Its text form is `<due_ms>:<id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct DueCursor {
    pub due_ms: u64,
    pub id: String,
}

impl DueCursor {
    pub fn of(task: &Task) -> DueCursor {
        DueCursor {
            due_ms: task.run_at_ms,
            id: task.id.clone(),
        }
    }

    pub fn parse(text: &str) -> Option<DueCursor> {
        let (due, id) = text.split_once(':')?;
        Some(DueCursor {
            due_ms: due.parse().ok()?,
            id: id.to_owned(),
        })
    }

    /// Whether `task` comes after this position.
    pub fn before(&self, task: &Task) -> bool {
        (task.run_at_ms, task.id.as_str()) > (self.due_ms, self.id.as_str())
    }

    /// The position of `queue`'s listing that resumes after the entry `(due_ms, other, id)` of an
    /// index ordered by due time, then queue, then id (where a scan stopped on another queue's entry).
    pub fn resume_after(queue: &str, due_ms: u64, other: &str, id: &str) -> DueCursor {
        match other.cmp(queue) {
            std::cmp::Ordering::Less => DueCursor {
                due_ms,
                id: String::new(),
            },
            std::cmp::Ordering::Equal => DueCursor {
                due_ms,
                id: id.to_owned(),
            },
            std::cmp::Ordering::Greater => DueCursor {
                due_ms: due_ms.saturating_add(1),
                id: String::new(),
            },
        }
    }
}

impl std::fmt::Display for DueCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.due_ms, self.id)
    }
}

/// One page of scheduled tasks in due order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DuePage {
    pub tasks: Vec<Task>,
    /// Pass back as `after` for the next page; `None` at the end.
    pub next: Option<DueCursor>,
}

/// Distinct due times in a range, for the timer window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueTimes {
    pub times: Vec<u64>,
    /// The scan stopped before `to_ms`.
    pub truncated: bool,
}

/// Equal slices of a time range, for counting scheduled tasks by due time ([`Store::timeline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    pub from_ms: u64,
    /// Each slice's width (at least 1 ms); the range ends at `from_ms + width_ms * count`.
    pub width_ms: u64,
    pub count: usize,
}

impl Buckets {
    /// `count` equal slices covering `[from_ms, to_ms)`, the last one reaching up to `width_ms - 1`
    /// past `to_ms` when the range does not divide evenly. `None` for an empty range or no slices.
    pub fn new(from_ms: u64, to_ms: u64, count: usize) -> Option<Buckets> {
        if to_ms <= from_ms || count == 0 {
            return None;
        }
        let width_ms = (to_ms - from_ms).div_ceil(count as u64);
        from_ms.checked_add(width_ms.checked_mul(count as u64)?)?;
        Some(Buckets {
            from_ms,
            width_ms,
            count,
        })
    }

    pub fn to_ms(&self) -> u64 {
        self.from_ms + self.width_ms * self.count as u64
    }

    /// The slice `at_ms` falls in, if any.
    pub fn index(&self, at_ms: u64) -> Option<usize> {
        let i = at_ms.checked_sub(self.from_ms)? / self.width_ms;
        (i < self.count as u64).then_some(i as usize)
    }
}

/// Scheduled tasks of one queue counted by due time, one count per slice of a [`Buckets`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    pub counts: Vec<u64>,
    /// 1 when every task is counted in the slice its due time falls in. Larger when the store's
    /// index groups due times coarser than that (the journal store's cold tier, docs/storage.md):
    /// then a task may be counted in an earlier slice than its own, by less than this many ms.
    pub resolution_ms: u64,
}

impl Timeline {
    pub fn empty(buckets: &Buckets) -> Timeline {
        Timeline {
            counts: vec![0; buckets.count],
            resolution_ms: 1,
        }
    }
}

/// Most index entries one listing scans before it returns a (possibly short) page with a cursor.
pub const LIST_SCAN_BUDGET: usize = 20_000;

/// News one node sends the others that share its store: due times it committed (so their timers wake for
/// them) and queues that got ready tasks (so their long-polls are served).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notice {
    /// Due times (as received: those this node should look at).
    pub due_times: Vec<u64>,
    /// Due times with their task (queue, id), when sending: the store passes each on only to the node
    /// that owns the task's shard, the others would merely race it (docs/distributed.md).
    pub due_tasks: Vec<(u64, String, String)>,
    pub ready_queues: Vec<String>,
    /// Notices may have been missed (the subscription was re-established), or shards changed owners (a
    /// node joined or left): re-read due times from the store.
    pub resync: bool,
}

impl Notice {
    /// Only a request to re-read due times.
    pub fn resync() -> Notice {
        Notice {
            resync: true,
            ..Notice::default()
        }
    }
}

/// The narrow storage interface the server sees.
pub trait Store: Send + Sync + 'static {
    /// Applies `commands` in order in one transaction, durable (fsynced) if any command
    /// [`is_durable`](Command::is_durable). Answers one outcome per command, or an error for all.
    fn apply(&self, now_ms: u64, commands: &[Command]) -> Result<Vec<Outcome>, StoreError>;

    fn get(&self, queue: &str, id: &str) -> Result<Option<Task>, StoreError>;

    /// Tasks of a queue in id order after `after`, optionally only those in `state`.
    fn list(
        &self,
        queue: &str,
        state: Option<TaskState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// The scheduled tasks of `queue` in due order (then id order) after `after`, from the due
    /// index. A page may be short (even empty) with a `next` cursor when the scan budget ran out.
    fn list_due(
        &self,
        queue: &str,
        after: Option<&DueCursor>,
        limit: usize,
    ) -> Result<DuePage, StoreError>;

    /// Counts per state of every queue that has tasks.
    fn queues(&self) -> Result<Vec<QueueCounts>, StoreError>;

    /// Distinct due times in `[from_ms, to_ms]`, ascending, at most `limit`.
    fn due_times(&self, from_ms: u64, to_ms: u64, limit: usize) -> Result<DueTimes, StoreError>;

    /// Scheduled tasks of `queue` counted by due time in each of `buckets`, from the store's due-time
    /// index (the tasks themselves are not read where the index allows it).
    fn timeline(&self, queue: &str, buckets: &Buckets) -> Result<Timeline, StoreError>;

    /// `Err` once the store is poisoned.
    fn health(&self) -> Result<(), StoreError>;

    /// Whether other nodes may change this store (then the server publishes and subscribes to notices,
    /// and re-reads due times periodically).
    fn shared(&self) -> bool {
        false
    }

    /// Whether this node fires the task `queue`/`id` when it falls due: on a shared store, whether it
    /// owns the task's shard (docs/distributed.md); other nodes' tasks are left out of its timer.
    fn owns(&self, _queue: &str, _id: &str) -> bool {
        true
    }

    /// Tells the other nodes what this node just committed. Best effort: a lost notice only delays the
    /// other nodes until their next periodic re-read.
    fn publish(&self, _notice: Notice) {}

    /// Delivers the other nodes' notices to `sink`, on a thread of the store's, until the store is dropped.
    fn subscribe(&self, _sink: Box<dyn Fn(Notice) + Send + Sync>) {}
}

/// Bytes a data directory holds, and free on its file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    pub used_bytes: u64,
    pub free_bytes: u64,
}

/// The files under `dir` (recursively) and the free space of its file system; `None` if it cannot
/// be read.
pub fn disk_usage(dir: &std::path::Path) -> Option<DiskUsage> {
    fn walk(dir: &std::path::Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(DiskUsage {
        used_bytes: walk(dir),
        free_bytes: stat.f_bavail.saturating_mul(stat.f_frsize),
    })
}

/// The store's wire and disk parsers, for the fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes one stored record (the redb value format); an error, never a panic, on bad bytes.
    pub fn decode_record(bytes: &[u8]) -> bool {
        crate::codec::decode("q", "id", bytes).is_ok()
    }

    /// Decodes one pub/sub notice of the distributed mode.
    pub fn decode_notice(text: &str) -> bool {
        crate::redis_store::decode_notice_for_fuzzing(text)
    }
}
