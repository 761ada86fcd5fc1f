//! The group-commit writer: one OS thread that owns every write to the store.
//!
//! Requests send their commands over a channel and wait. The thread takes everything queued (up to
//! `max_commit_commands`), applies it in one store transaction — one fsync for the lot when any command is
//! durable — and only then answers each request. Throughput comes from batching, never from skipping fsync.
//! After a commit it applies the side effects: new due times go to the timer window, queues with new
//! ready tasks wake their long-polls, counters are bumped.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use punctual_core::{Task, TaskState};
use punctual_store::{Command, LAZY_FLUSH_MS, Notice, Outcome, Store, StoreError, Taker};
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::error::ApiError;
use crate::metrics as m;
use crate::timer::Timer;

struct Job {
    commands: Vec<Command>,
    reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
}

enum Message {
    Job(Job),
    Park(Park),
    /// Another node made tasks of these queues ready: serve the long-polls waiting for them.
    Ready(Vec<String>),
    /// Commit what is queued, then end the thread (later submissions get "shutting down").
    Stop,
}

/// A handle to the writer thread. Cloning is cheap; the thread ends when every handle is dropped.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Message>,
    /// A `Flush` is on its way (see [`Writer::flush_soon`]).
    flush_armed: Arc<AtomicBool>,
}

/// What the writer touches after each commit.
pub struct Effects {
    pub timer: Arc<Timer>,
    /// Woken when webhook tasks become ready.
    pub push_wake: Arc<tokio::sync::Notify>,
    /// Set once a commit finds the store poisoned (a failed fsync): the server then shuts down and
    /// exits non-zero, so a supervisor restarts it and recovery runs.
    pub poisoned: tokio::sync::watch::Sender<bool>,
}

impl Writer {
    pub fn start(
        store: Arc<dyn Store>,
        clock: Clock,
        effects: Effects,
        max_commit_commands: usize,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("punctual-writer".into())
            .spawn(move || run(rx, store.as_ref(), clock, &effects, max_commit_commands))
            .expect("spawn writer thread");
        let writer = Writer {
            tx,
            flush_armed: Arc::new(AtomicBool::new(false)),
        };
        (writer, thread)
    }

    /// Makes the lazy commits applied so far durable within [`LAZY_FLUSH_MS`], even when no durable
    /// write follows them: sends a [`Command::Flush`] that long from now, unless one is on its way
    /// (which, sent later than anything applied before this call, covers it too). Call it after a
    /// commit with lazy acks has been applied; needs a tokio runtime.
    pub fn flush_soon(&self) {
        if self.flush_armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let writer = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(LAZY_FLUSH_MS)).await;
            // Cleared before the flush is sent: a lazy commit applied after this point arms the next.
            writer.flush_armed.store(false, Ordering::Release);
            if let Err(error) = writer.submit(vec![Command::Flush]).await {
                tracing::debug!(error = %error.message, "flush of lazy acks not committed");
            }
        });
    }

    /// Applies `commands` in the next group commit and returns their outcomes.
    pub async fn submit(&self, commands: Vec<Command>) -> Result<Vec<Outcome>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Job(Job { commands, reply }))
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        match answer.await {
            Ok(result) => result.map_err(ApiError::from),
            Err(_) => Err(ApiError::unavailable("the server is shutting down")),
        }
    }

    /// Sends a reserve to the writer: it is answered as soon as tasks of its queue are leased to it,
    /// with an empty list once its deadline has passed, or at shutdown. The caller also gives up on its
    /// own a little after `deadline_ms`.
    pub fn park(&self, park: Park) -> Result<(), ApiError> {
        self.tx
            .send(Message::Park(park))
            .map_err(|_| ApiError::unavailable("the server is shutting down"))
    }

    /// [`submit`](Self::submit) for a plain thread (the timer driver).
    pub fn submit_blocking(&self, commands: Vec<Command>) -> Result<Vec<Outcome>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Job(Job { commands, reply }))
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        match answer.blocking_recv() {
            Ok(result) => result.map_err(ApiError::from),
            Err(_) => Err(ApiError::unavailable("the server is shutting down")),
        }
    }

    /// Tells the writer that another node made tasks of `queues` ready (a shared store's notice).
    pub fn ready_elsewhere(&self, queues: Vec<String>) {
        let _ = self.tx.send(Message::Ready(queues));
    }

    /// Asks the thread to finish what is queued and stop, even while other handles are alive.
    pub fn stop(&self) {
        let _ = self.tx.send(Message::Stop);
    }

    pub async fn submit_one(&self, command: Command) -> Result<Outcome, ApiError> {
        let mut outcomes = self.submit(vec![command]).await?;
        outcomes
            .pop()
            .ok_or_else(|| ApiError::unavailable("the store returned no outcome"))
    }
}

/// A reserve request handed to the writer. It is committed like a `Command::Reserve`; if that finds
/// nothing and its deadline has not passed, it waits in the writer for tasks of its queue.
///
/// Waiting here, rather than waking the HTTP handler to ask again, lets the writer lease newly ready
/// tasks to it right after (or in) the commit that made them ready: no second trip through the queue
/// of requests, where it could wait behind another request's fsync.
pub struct Park {
    pub queue: String,
    pub max: usize,
    pub lease_ms: Option<u64>,
    pub default_lease_ms: u64,
    pub token_prefix: String,
    /// After this the writer no longer serves it; the handler answers empty a little later.
    pub deadline_ms: u64,
    pub reply: oneshot::Sender<Result<Vec<Task>, StoreError>>,
}

impl Park {
    /// Still worth serving: the client is waiting and its deadline has not passed.
    fn live(&self, now_ms: u64) -> bool {
        !self.reply.is_closed() && self.deadline_ms > now_ms
    }

    fn taker(&self) -> Taker {
        Taker {
            queue: self.queue.clone(),
            max: self.max,
            lease_ms: self.lease_ms,
            default_lease_ms: self.default_lease_ms,
            token_prefix: self.token_prefix.clone(),
        }
    }

    fn command(&self) -> Command {
        Command::Reserve {
            queue: self.queue.clone(),
            max: self.max,
            lease_ms: self.lease_ms,
            default_lease_ms: self.default_lease_ms,
            token_prefix: self.token_prefix.clone(),
        }
    }
}

struct Loop<'a> {
    store: &'a dyn Store,
    clock: Clock,
    effects: &'a Effects,
    parked: HashMap<String, VecDeque<Park>>,
    /// Releases of tasks leased to a long-poll whose client had gone by the time its answer was
    /// ready (see [`Loop::release_orphans`]).
    orphans: Vec<Command>,
}

/// The tasks of a `Reserved` outcome (none for anything else).
fn reserved(outcome: Outcome) -> Vec<Task> {
    match outcome {
        Outcome::Reserved(tasks) => tasks,
        _ => Vec::new(),
    }
}

fn copy_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::Poisoned(message) => StoreError::Poisoned(message.clone()),
        StoreError::Unavailable(message) => StoreError::Unavailable(message.clone()),
        StoreError::NoSpace(message) => StoreError::NoSpace(message.clone()),
        other => StoreError::Storage(other.to_string()),
    }
}

impl Loop<'_> {
    /// Applies one transaction and its side effects; returns the outcomes and the queues that got
    /// ready tasks.
    fn apply(&mut self, commands: &[Command]) -> Result<(Vec<Outcome>, Vec<String>), StoreError> {
        #[allow(clippy::disallowed_methods)]
        // Measures commit duration only; never drives behavior.
        let started = Instant::now();
        let now_ms = self.clock.now_ms();
        let result = self.store.apply(now_ms, commands);
        metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::COMMIT_COMMANDS).record(commands.len() as f64);
        match result {
            Ok(outcomes) => {
                let Committed {
                    ready,
                    due_tasks,
                    untagged,
                } = after_commit(self.effects, now_ms, commands, &outcomes, self.store);
                if ready.iter().any(|q| q == punctual_store::PUSH_INDEX) {
                    self.effects.push_wake.notify_one();
                }
                if self.store.shared() {
                    // Other nodes' windows look as far ahead as this one's: a later due time would be
                    // dropped on arrival, and their refills read it from the store in time.
                    let horizon = now_ms.saturating_add(self.effects.timer.span_ms());
                    let mut due_times = untagged;
                    due_times.retain(|t| *t <= horizon);
                    let mut due_tasks = due_tasks;
                    due_tasks.retain(|(t, _, _)| *t <= horizon);
                    self.store.publish(Notice {
                        due_times,
                        due_tasks,
                        ready_queues: ready.clone(),
                        resync: false,
                    });
                }
                Ok((outcomes, ready))
            }
            Err(error) => {
                if matches!(error, StoreError::NoSpace(_)) {
                    tracing::warn!(%error, commands = commands.len(), "store commit refused");
                } else {
                    tracing::error!(%error, commands = commands.len(), "store commit failed");
                }
                if matches!(error, StoreError::Poisoned(_)) {
                    self.effects.poisoned.send_replace(true);
                }
                Err(error)
            }
        }
    }

    /// Takes every live parked reserve (for a tick to serve).
    fn take_parked(&mut self) -> Vec<Park> {
        let now_ms = self.clock.now_ms();
        self.parked
            .drain()
            .flat_map(|(_, list)| list)
            .filter(|p| p.live(now_ms))
            .collect()
    }

    /// Answers a reserve that was just served: with its tasks if it got any; otherwise it waits
    /// (parked) until its deadline, after which it is answered empty.
    fn settle_park(&mut self, park: Park, tasks: Vec<Task>) {
        if !tasks.is_empty() {
            if let Err(Ok(tasks)) = park.reply.send(Ok(tasks)) {
                // The client (or its handler, after its deadline and grace) left while the commit that
                // leased these ran. Nobody holds the leases: give the tasks back now rather than after
                // the lease runs out, which left them stuck for the whole lease (60 s in the bench)
                // whenever a slow commit outlasted a long-poll's grace.
                tracing::debug!(tasks = tasks.len(), "a long-poll left while being served");
                self.orphans.extend(tasks.into_iter().filter_map(|task| {
                    let token = task.lease?.token;
                    Some(Command::Release {
                        queue: task.queue,
                        id: task.id,
                        token,
                        delay_ms: 0,
                    })
                }));
            }
            return;
        }
        let now_ms = self.clock.now_ms();
        if park.reply.is_closed() {
            return;
        }
        if park.deadline_ms <= now_ms {
            let _ = park.reply.send(Ok(Vec::new()));
            return;
        }
        let queue = self.parked.entry(park.queue.clone()).or_default();
        queue.retain(|p| p.live(now_ms));
        queue.push_back(park);
    }

    /// Releases what [`Loop::settle_park`] leased to clients that had gone, and serves the long-polls
    /// waiting on those queues. Releasing is not durable, like leasing: after a crash the tasks are
    /// handed out again either way.
    fn release_orphans(&mut self) {
        // Serving the waiting long-polls can orphan more (their clients may be leaving too); each
        // round needs a client that left, so this ends.
        while !self.orphans.is_empty() {
            let releases = std::mem::take(&mut self.orphans);
            metrics::counter!(m::ORPHANED_LEASES).increment(releases.len() as u64);
            match self.apply(&releases) {
                Ok((_, ready)) => self.serve_parked(&ready),
                // The leases then run out as before; `apply` has logged why.
                Err(_) => return,
            }
        }
    }

    fn serve_parked(&mut self, queues: &[String]) {
        let now_ms = self.clock.now_ms();
        let mut waiting: Vec<Park> = Vec::new();
        for queue in queues {
            if let Some(list) = self.parked.get_mut(queue) {
                waiting.extend(list.drain(..).filter(|p| p.live(now_ms)));
            }
        }
        if waiting.is_empty() {
            return;
        }
        let commands: Vec<Command> = waiting.iter().map(Park::command).collect();
        match self.apply(&commands) {
            Ok((outcomes, _)) => {
                for (park, outcome) in waiting.into_iter().zip(outcomes) {
                    self.settle_park(park, reserved(outcome));
                }
            }
            Err(error) => {
                for park in waiting {
                    let _ = park.reply.send(Err(copy_error(&error)));
                }
            }
        }
    }
}

fn run(
    mut rx: mpsc::UnboundedReceiver<Message>,
    store: &dyn Store,
    clock: Clock,
    effects: &Effects,
    max_commit_commands: usize,
) {
    let mut state = Loop {
        store,
        clock,
        effects,
        parked: HashMap::new(),
        orphans: Vec::new(),
    };
    let mut jobs: Vec<Job> = Vec::new();
    let mut parks: Vec<Park> = Vec::new();
    let mut ready_elsewhere: Vec<String> = Vec::new();
    let mut stopping = false;
    while !stopping {
        let mut total = match rx.blocking_recv() {
            Some(Message::Ready(queues)) => {
                ready_elsewhere.extend(queues);
                0
            }
            Some(Message::Job(first)) => {
                let n = first.commands.len();
                jobs.push(first);
                n
            }
            Some(Message::Park(park)) => {
                parks.push(park);
                1
            }
            Some(Message::Stop) | None => break,
        };
        while total < max_commit_commands {
            match rx.try_recv() {
                Ok(Message::Job(job)) => {
                    total += job.commands.len();
                    jobs.push(job);
                }
                Ok(Message::Park(park)) => {
                    total += 1;
                    parks.push(park);
                }
                Ok(Message::Ready(queues)) => ready_elsewhere.extend(queues),
                Ok(Message::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // Everything gathered was in flight at the same time, so any order is a valid serialization.
        // Non-durable work (leases, timer ticks) goes first in its own commit so that it never waits
        // for the fsync of durable work gathered with it.
        let (durable, fast): (Vec<Job>, Vec<Job>) = jobs
            .drain(..)
            .partition(|job| job.commands.iter().any(Command::is_durable));
        if !fast.is_empty() || !parks.is_empty() {
            run_jobs(&mut state, fast, std::mem::take(&mut parks));
        }
        if !durable.is_empty() {
            run_jobs(&mut state, durable, Vec::new());
        }
        if !ready_elsewhere.is_empty() {
            ready_elsewhere.sort_unstable();
            ready_elsewhere.dedup();
            if ready_elsewhere
                .iter()
                .any(|q| q == punctual_store::PUSH_INDEX)
            {
                state.effects.push_wake.notify_one();
            }
            state.serve_parked(&std::mem::take(&mut ready_elsewhere));
        }
        state.release_orphans();
    }
    // Shutting down: make leases and timer work durable, so that after a clean restart consumers can
    // still ack what they hold instead of the tasks being handed out again.
    if let Err(error) = state.apply(&[Command::Sync]) {
        tracing::error!(%error, "final sync at shutdown failed");
    }
    // Long-polls end empty.
    for (_, list) in state.parked.drain() {
        for park in list {
            let _ = park.reply.send(Ok(Vec::new()));
        }
    }
}

/// Commits the jobs' commands and the parks' reserves in one transaction and answers them.
fn run_jobs(state: &mut Loop<'_>, jobs: Vec<Job>, parks: Vec<Park>) {
    let mut commands: Vec<Command> = Vec::with_capacity(jobs.len() + parks.len());
    let mut sizes = Vec::with_capacity(jobs.len());
    let mut jobs = jobs;
    for job in &mut jobs {
        sizes.push(job.commands.len());
        commands.append(&mut job.commands);
    }
    commands.extend(parks.iter().map(Park::command));
    // Waiting consumers ride along with a tick: the commit that fires tasks also leases them.
    let mut tick_parks: Vec<Park> = Vec::new();
    if let Some(Command::Tick { takers, .. }) = commands
        .iter_mut()
        .find(|c| matches!(c, Command::Tick { .. }))
    {
        tick_parks = state.take_parked();
        takers.extend(tick_parks.iter().map(Park::taker));
    }
    match state.apply(&commands) {
        Ok((mut outcomes, ready)) => {
            let taken = outcomes
                .iter_mut()
                .find_map(|o| match o {
                    Outcome::Ticked(report) => Some(std::mem::take(&mut report.taken)),
                    _ => None,
                })
                .unwrap_or_default();
            let mut taken = taken.into_iter();
            for park in tick_parks {
                state.settle_park(park, taken.next().unwrap_or_default());
            }
            let mut outcomes = outcomes.into_iter();
            for (job, size) in jobs.into_iter().zip(sizes) {
                let _ = job.reply.send(Ok(outcomes.by_ref().take(size).collect()));
            }
            for (park, outcome) in parks.into_iter().zip(outcomes) {
                state.settle_park(park, reserved(outcome));
            }
            // Only now, with every unserved long-poll parked again, serve those whose queues got ready tasks.
            state.serve_parked(&ready);
        }
        Err(error) => {
            for job in jobs {
                let _ = job.reply.send(Err(copy_error(&error)));
            }
            for park in parks.into_iter().chain(tick_parks) {
                let _ = park.reply.send(Err(copy_error(&error)));
            }
        }
    }
}

/// Feeds new due times to the timer and bumps counters; returns the queues that got ready tasks and
/// the new due times.
fn after_commit<'a>(
    effects: &Effects,
    now_ms: u64,
    commands: &'a [Command],
    outcomes: &'a [Outcome],
    store: &dyn Store,
) -> Committed {
    let shared = store.shared();
    let mut due_times: Vec<u64> = Vec::new();
    // Only on a shared store: the same due times with their task where known, for other nodes.
    let mut due_tasks: Vec<(u64, String, String)> = Vec::new();
    let mut untagged: Vec<u64> = Vec::new();
    let mut note = |task: &Task, due_times: &mut Vec<u64>| {
        if let Some(due) = task.due_at_ms() {
            if shared {
                due_tasks.push((due, task.queue.clone(), task.id.clone()));
                // Another node fires it: this timer would only wake to race that node.
                if !store.owns(&task.queue, &task.id) {
                    return;
                }
            }
            due_times.push(due);
        }
    };
    let mut wake_queues: Vec<&str> = Vec::new();
    // Counters are summed per (metric, queue) and recorded once per commit: a batch of 1000 schedules
    // is one registry lookup, not a thousand.
    let mut counts: HashMap<(&'static str, &str), u64> = HashMap::new();
    let mut count =
        |name: &'static str, queue: &'a str, n: u64| *counts.entry((name, queue)).or_default() += n;
    for (command, outcome) in commands.iter().zip(outcomes) {
        match outcome {
            Outcome::Created(task) | Outcome::Updated(task) | Outcome::Acked(task) => {
                note(task, &mut due_times);
                if task.state == TaskState::Ready {
                    wake_queues.push(punctual_store::ready_target(task));
                }
                let counter = match (command, outcome) {
                    (_, Outcome::Created(_)) => Some(m::SCHEDULED),
                    (_, Outcome::Acked(_)) => Some(m::ACKED),
                    (Command::Nack { .. }, _) => Some(m::NACKED),
                    _ => None,
                };
                if let Some(name) = counter {
                    count(name, &task.queue, 1);
                }
                if matches!(command, Command::Nack { .. }) {
                    log_failed_attempt(
                        &task.queue,
                        &task.id,
                        task.attempt,
                        task.last_error.as_deref().unwrap_or(""),
                        (task.state != TaskState::Dead).then_some(task.run_at_ms),
                    );
                    if task.state == TaskState::Dead {
                        count(m::DEAD, &task.queue, 1);
                    }
                }
            }
            Outcome::Reserved(tasks) => {
                if let Some(first) = tasks.first() {
                    let lateness = metrics::histogram!(m::LATENESS, "queue" => first.queue.clone());
                    for task in tasks {
                        note(task, &mut due_times);
                        let lateness_ms = now_ms.saturating_sub(task.run_at_ms);
                        lateness.record(lateness_ms as f64 / 1000.0);
                    }
                    count(m::DELIVERED, &first.queue, tasks.len() as u64);
                }
            }
            Outcome::Put {
                written: Some(task),
                previous,
            } => {
                note(task, &mut due_times);
                if task.state == TaskState::Ready {
                    wake_queues.push(punctual_store::ready_target(task));
                }
                if previous
                    .as_ref()
                    .is_none_or(|p| p.state != TaskState::Scheduled)
                {
                    count(m::SCHEDULED, &task.queue, 1);
                }
            }
            Outcome::Cancelled(task) => count(m::CANCELLED, &task.queue, 1),
            Outcome::Ticked(report) => {
                due_times.extend(&report.due_times);
                if shared {
                    untagged.extend(&report.due_times);
                }
                for tasks in report.taken.iter().filter(|t| !t.is_empty()) {
                    let lateness =
                        metrics::histogram!(m::LATENESS, "queue" => tasks[0].queue.clone());
                    for task in tasks {
                        note(task, &mut due_times);
                        lateness.record(now_ms.saturating_sub(task.run_at_ms) as f64 / 1000.0);
                    }
                    count(m::DELIVERED, &tasks[0].queue, tasks.len() as u64);
                }
                wake_queues.extend(report.ready_queues.iter().map(String::as_str));
                if report.expired > 0 {
                    metrics::counter!(m::EXPIRED).increment(report.expired);
                }
                for queue in &report.dead {
                    count(m::DEAD, queue, 1);
                }
                for failure in &report.lease_failures {
                    log_failed_attempt(
                        &failure.queue,
                        &failure.id,
                        failure.attempt,
                        punctual_store::LEASE_EXPIRED,
                        failure.retry_at_ms,
                    );
                }
            }
            _ => {}
        }
    }
    for ((name, queue), n) in counts {
        metrics::counter!(name, "queue" => queue.to_owned()).increment(n);
    }
    effects.timer.insert_all(&due_times);
    wake_queues.sort_unstable();
    wake_queues.dedup();
    Committed {
        ready: wake_queues.into_iter().map(str::to_owned).collect(),
        due_tasks,
        untagged,
    }
}

/// One line at `info` for each failed attempt: whether the task will be retried (and when) or is dead.
fn log_failed_attempt(queue: &str, id: &str, attempt: u32, reason: &str, retry_at_ms: Option<u64>) {
    match retry_at_ms {
        Some(at) => tracing::info!(
            queue,
            id,
            attempt,
            reason,
            retry_at = %punctual_core::time::format_rfc3339_ms(at),
            "attempt failed; the task will be retried"
        ),
        None => tracing::info!(
            queue,
            id,
            attempt,
            reason,
            "attempt failed; the task is dead"
        ),
    }
}

/// What a commit tells the rest: queues that got ready tasks, and new due times (with their task
/// where known).
struct Committed {
    ready: Vec<String>,
    due_tasks: Vec<(u64, String, String)>,
    untagged: Vec<u64>,
}
