//! The group-commit writer: one OS thread that owns every write to the store.
//!
//! Requests send their commands over a channel and wait. The thread takes everything queued (up to
//! `max_commit_commands`), applies it in one store transaction — one fsync for the lot when any command is
//! durable — and only then answers each request. Throughput comes from batching, never from skipping fsync.
//! After a commit it applies the side effects: new due times go to the timer window, queues with new
//! ready tasks wake their long-polls, counters are bumped.

use std::sync::Arc;
use std::time::Instant;

use punctual_core::TaskState;
use punctual_store::{Command, Outcome, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::error::ApiError;
use crate::metrics as m;
use crate::timer::Timer;
use crate::waiters::Waiters;

struct Job {
    commands: Vec<Command>,
    reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
}

enum Message {
    Job(Job),
    /// Commit what is queued, then end the thread (later submissions get "shutting down").
    Stop,
}

/// A handle to the writer thread. Cloning is cheap; the thread ends when every handle is dropped.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Message>,
}

/// What the writer touches after each commit.
pub struct Effects {
    pub timer: Arc<Timer>,
    pub waiters: Arc<Waiters>,
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
        (Writer { tx }, thread)
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

fn run(
    mut rx: mpsc::UnboundedReceiver<Message>,
    store: &dyn Store,
    clock: Clock,
    effects: &Effects,
    max_commit_commands: usize,
) {
    let mut jobs: Vec<Job> = Vec::new();
    let mut commands: Vec<Command> = Vec::new();
    let mut stopping = false;
    while !stopping {
        match rx.blocking_recv() {
            Some(Message::Job(first)) => jobs.push(first),
            Some(Message::Stop) | None => break,
        }
        let mut total = jobs[0].commands.len();
        while total < max_commit_commands {
            match rx.try_recv() {
                Ok(Message::Job(job)) => {
                    total += job.commands.len();
                    jobs.push(job);
                }
                Ok(Message::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let sizes: Vec<usize> = jobs.iter().map(|j| j.commands.len()).collect();
        for job in &mut jobs {
            commands.append(&mut job.commands);
        }
        #[allow(clippy::disallowed_methods)]
        // Measures commit duration only; never drives behavior.
        let started = Instant::now();
        let now_ms = clock.now_ms();
        let result = store.apply(now_ms, &commands);
        metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::COMMIT_COMMANDS).record(commands.len() as f64);
        match result {
            Ok(outcomes) => {
                after_commit(effects, now_ms, &commands, &outcomes);
                let mut outcomes = outcomes.into_iter();
                for (job, size) in jobs.drain(..).zip(sizes) {
                    let _ = job.reply.send(Ok(outcomes.by_ref().take(size).collect()));
                }
            }
            Err(error) => {
                tracing::error!(%error, commands = commands.len(), "store commit failed");
                let message = error.to_string();
                let poisoned = matches!(error, StoreError::Poisoned(_));
                for job in jobs.drain(..) {
                    let copy = if poisoned {
                        StoreError::Poisoned(message.clone())
                    } else {
                        StoreError::Storage(message.clone())
                    };
                    let _ = job.reply.send(Err(copy));
                }
            }
        }
        commands.clear();
    }
}

fn after_commit(effects: &Effects, now_ms: u64, commands: &[Command], outcomes: &[Outcome]) {
    let mut due_times: Vec<u64> = Vec::new();
    let mut wake_queues: Vec<&str> = Vec::new();
    for (command, outcome) in commands.iter().zip(outcomes) {
        match outcome {
            Outcome::Created(task) | Outcome::Updated(task) | Outcome::Acked(task) => {
                due_times.extend(task.due_at_ms());
                if task.state == TaskState::Ready {
                    wake_queues.push(&task.queue);
                }
                let counter = match (command, outcome) {
                    (_, Outcome::Created(_)) => Some(m::SCHEDULED),
                    (_, Outcome::Acked(_)) => Some(m::ACKED),
                    (Command::Nack { .. }, _) => Some(m::NACKED),
                    _ => None,
                };
                if let Some(name) = counter {
                    metrics::counter!(name, "queue" => task.queue.clone()).increment(1);
                }
                if matches!(command, Command::Nack { .. }) && task.state == TaskState::Dead {
                    metrics::counter!(m::DEAD, "queue" => task.queue.clone()).increment(1);
                }
            }
            Outcome::Reserved(tasks) => {
                for task in tasks {
                    due_times.extend(task.due_at_ms());
                    let lateness_ms = now_ms.saturating_sub(task.run_at_ms);
                    metrics::histogram!(m::LATENESS, "queue" => task.queue.clone())
                        .record(lateness_ms as f64 / 1000.0);
                }
                if let Some(task) = tasks.first() {
                    metrics::counter!(m::DELIVERED, "queue" => task.queue.clone())
                        .increment(tasks.len() as u64);
                }
            }
            Outcome::Cancelled(task) => {
                metrics::counter!(m::CANCELLED, "queue" => task.queue.clone()).increment(1);
            }
            Outcome::Ticked(report) => {
                due_times.extend(&report.due_times);
                wake_queues.extend(report.ready_queues.iter().map(String::as_str));
                if report.expired > 0 {
                    metrics::counter!(m::EXPIRED).increment(report.expired);
                }
                for queue in &report.dead {
                    metrics::counter!(m::DEAD, "queue" => queue.clone()).increment(1);
                }
            }
            _ => {}
        }
    }
    effects.timer.insert_all(&due_times);
    wake_queues.sort_unstable();
    wake_queues.dedup();
    for queue in wake_queues {
        effects.waiters.wake(queue);
    }
}
