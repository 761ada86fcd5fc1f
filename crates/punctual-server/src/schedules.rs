//! Recurring schedules: named, durable rules that create an ordinary task for each occurrence.
//!
//! A schedule is stored as a task of the queue [`SCHEDULES_QUEUE`], id `<queue>/<name>`, whose
//! payload is the [`Stored`] schedule (its spec, and how far it has been materialised) and whose due
//! time is its next *materialisation*: half a second before its next occurrence. The timer fires it
//! like any task, and a *materialiser* on some node leases it, so exactly one node at a time works on
//! a schedule, with no leader election; it creates the occurrences due within the next second as
//! tasks whose ids derive from the schedule's name and the occurrence's time (so a repeat creates
//! nothing), and in the same commit gives the record back (`Renew`) with its cursor moved on and due
//! at the next materialisation. A node that dies holding a record loses the lease, not the schedule:
//! after a restart (leases are not durable) or once the lease runs out, it is materialised again,
//! and the derived ids keep each occurrence single.

use std::sync::Arc;

use axum::http::StatusCode;
use punctual_core::schedule::{Missed, Plan, Rule, plan};
use punctual_core::{Backoff, Task, TaskState, Webhook};
use punctual_store::{Command, Outcome, PutWhen};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::service::{
    ExponentialSpec, ReserveRequest, ScheduleRequest, Service, build_task, check_queue, present,
    unexpected,
};

/// The queue that holds every schedule's record (`<queue>/<name>`). Its name is reserved.
pub const SCHEDULES_QUEUE: &str = "punctual.schedules";
/// Occurrences are created this long before their time, so they fire as precisely as one-shot tasks.
pub const AHEAD_MS: u64 = 1_000;
/// A record is due this long before its next occurrence.
const WAKE_BEFORE_MS: u64 = 500;
/// An occurrence found more than this late at materialisation was missed (the server was away)
/// and follows the schedule's `missed` policy.
pub const GRACE_MS: u64 = 1_000;
/// How many records one materialiser round leases, and for how long. A round takes milliseconds;
/// the lease is short because a node that dies holding it (its lease made durable by a later
/// commit) keeps the schedule from every node until it runs out.
const ROUND_MAX: usize = 100;
const ROUND_LEASE_MS: u64 = 2_000;
/// How many times an API write waits for a record that a materialiser holds at that moment.
const BUSY_RETRIES: u32 = 200;
const BUSY_WAIT_MS: u64 = 2;
/// Occurrences shown in a schedule's `next_runs`.
pub const NEXT_RUNS: usize = 5;
/// Most schedules one listing answers.
pub const LIST_MAX: usize = 1_000;

/// The metric of occurrences, by queue, schedule and outcome (`created`, `skipped`).
pub const OCCURRENCES: &str = "punctual_schedule_occurrences_total";

/// The body of `PUT /v1/queues/{queue}/schedules/{name}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    pub every_ms: Option<u64>,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub payload: Option<Box<RawValue>>,
    pub webhook: Option<Webhook>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u32")]
    pub max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_vec_u64")]
    pub backoff_ms: Option<Vec<u64>>,
    pub backoff: Option<ExponentialSpec>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    pub lease_ms: Option<u64>,
    pub start_at: Option<String>,
    pub end_at: Option<String>,
    pub missed: Option<String>,
    pub overlap: Option<String>,
    pub paused: Option<bool>,
}

/// A schedule as its record keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub queue: String,
    pub name: String,
    pub every_ms: Option<u64>,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    /// The occurrences' task fields, as given.
    pub payload: Option<String>,
    pub webhook: Option<Webhook>,
    pub max_attempts: Option<u32>,
    pub backoff_ms: Option<Vec<u64>>,
    pub backoff: Option<ExponentialSpec>,
    pub lease_ms: Option<u64>,
    pub start_at_ms: Option<u64>,
    pub end_at_ms: Option<u64>,
    /// `skip`, `latest` or `all`.
    pub missed: String,
    /// `allow` or `skip`.
    pub overlap: String,
    pub paused: bool,
    /// An every-N rule counts from here (its start, or when it was created).
    pub anchor_ms: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Every occurrence at or before this was created or skipped.
    pub cursor_ms: u64,
    /// The latest occurrences created (at most [`RECENT_RUNS`]), oldest first; some may be ahead.
    #[serde(default)]
    pub runs: Vec<u64>,
    /// The task of the latest occurrence created.
    pub last_task_id: Option<String>,
    pub created: u64,
    pub skipped: u64,
}

/// How many of the latest occurrence times a record keeps, to tell the last that has come.
const RECENT_RUNS: usize = 16;

impl Stored {
    pub fn rule(&self) -> Result<Rule, ApiError> {
        let rule = match (&self.every_ms, &self.cron) {
            (Some(every_ms), None) => Rule::every(*every_ms, self.anchor_ms),
            (None, Some(cron)) => Rule::cron(cron, self.timezone.as_deref()),
            _ => {
                return Err(ApiError::invalid(
                    "a schedule needs either every_ms or cron, not both",
                ));
            }
        };
        rule.map_err(|e| ApiError::invalid(format!("{}: {}", e.field, e.message)))
    }

    fn missed(&self) -> Missed {
        Missed::parse(&self.missed).unwrap_or_default()
    }

    /// The task fields of every occurrence, as a schedule request.
    fn request(&self, id: String) -> ScheduleRequest {
        ScheduleRequest {
            id: Some(id),
            payload: self
                .payload
                .as_ref()
                .and_then(|p| RawValue::from_string(p.clone()).ok()),
            max_attempts: self.max_attempts,
            backoff_ms: self.backoff_ms.clone(),
            backoff: self.backoff.clone(),
            webhook: self.webhook.clone(),
            lease_ms: self.lease_ms,
            ..ScheduleRequest::default()
        }
    }

    /// When the record is next due: shortly before the next occurrence, never while paused or
    /// when no occurrence is left.
    fn wake_at(&self, next_ms: Option<u64>) -> u64 {
        match next_ms {
            Some(next) if !self.paused => next.saturating_sub(WAKE_BEFORE_MS),
            _ => punctual_core::NEVER_MS,
        }
    }
}

/// The record id of schedule `name` of `queue`.
pub fn record_id(queue: &str, name: &str) -> String {
    format!("{queue}/{name}")
}

/// The id of the occurrence of `name` at `at_ms`: the same on every node.
pub fn occurrence_id(name: &str, at_ms: u64) -> String {
    format!("{name}@{at_ms}")
}

/// A schedule as the API shows it.
#[derive(Debug, Serialize)]
pub struct ScheduleView {
    pub queue: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    pub timezone: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<Vec<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<ExponentialSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_at: Option<String>,
    pub missed: String,
    pub overlap: String,
    pub paused: bool,
    pub created_at: String,
    pub updated_at: String,
    /// The latest occurrence whose time has come.
    pub last_run_at: Option<String>,
    pub last_run_at_ms: Option<u64>,
    pub last_task_id: Option<String>,
    /// Occurrences whose task was created (up to a second ahead of its time).
    pub occurrences_created: u64,
    pub occurrences_skipped: u64,
    pub next_runs: Vec<NextRun>,
}

#[derive(Debug, Serialize)]
pub struct NextRun {
    pub run_at: String,
    pub run_at_ms: u64,
}

/// What a schedule write did.
pub struct Written {
    pub created: bool,
    pub view: ScheduleView,
}

fn parse_missed(text: Option<&str>) -> Result<String, ApiError> {
    match text {
        None => Ok(Missed::default().as_str().to_owned()),
        Some(t) => Missed::parse(t)
            .map(|m| m.as_str().to_owned())
            .ok_or_else(|| ApiError::invalid("missed must be \"skip\", \"latest\" or \"all\"")),
    }
}

fn parse_overlap(text: Option<&str>) -> Result<String, ApiError> {
    match text {
        None | Some("allow") => Ok("allow".into()),
        Some("skip") => Ok("skip".into()),
        Some(_) => Err(ApiError::invalid("overlap must be \"allow\" or \"skip\"")),
    }
}

fn check_name(service: &Service, name: &str) -> Result<(), ApiError> {
    service
        .config
        .limits
        .check_queue(name)
        .map_err(|m| ApiError::invalid(m.replace("queue name", "schedule name")))
}

fn time_field(text: Option<&str>, field: &str) -> Result<Option<u64>, ApiError> {
    text.map(|t| {
        punctual_core::time::parse_rfc3339_ms(t)
            .map_err(|e| ApiError::invalid(format!("{field}: {e}")))
    })
    .transpose()
}

impl Service {
    /// Creates or replaces schedule `name` of `queue`.
    pub async fn put_schedule(
        &self,
        queue: &str,
        name: &str,
        spec: ScheduleSpec,
    ) -> Result<Written, ApiError> {
        check_queue(self, queue)?;
        check_name(self, name)?;
        let now_ms = self.clock.now_ms();
        let existing = self.stored(queue, name).await?;
        let start_at_ms = time_field(spec.start_at.as_deref(), "start_at")?;
        let end_at_ms = time_field(spec.end_at.as_deref(), "end_at")?;
        if let (Some(start), Some(end)) = (start_at_ms, end_at_ms)
            && end < start
        {
            return Err(ApiError::invalid("end_at is before start_at"));
        }
        let payload = crate::service::payload_text(self, spec.payload)?;
        let mut stored = Stored {
            queue: queue.to_owned(),
            name: name.to_owned(),
            every_ms: spec.every_ms,
            cron: spec.cron,
            timezone: spec.timezone,
            payload,
            webhook: spec.webhook,
            max_attempts: spec.max_attempts,
            backoff_ms: spec.backoff_ms,
            backoff: spec.backoff,
            lease_ms: spec.lease_ms,
            start_at_ms,
            end_at_ms,
            missed: parse_missed(spec.missed.as_deref())?,
            overlap: parse_overlap(spec.overlap.as_deref())?,
            paused: spec.paused.unwrap_or(false),
            anchor_ms: start_at_ms.unwrap_or(now_ms),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            // Nothing before the schedule existed (or before its start) is an occurrence.
            cursor_ms: now_ms.max(start_at_ms.map_or(0, |s| s.saturating_sub(1))),
            runs: Vec::new(),
            last_task_id: None,
            created: 0,
            skipped: 0,
        };
        if stored.every_ms.is_some() && stored.timezone.is_some() {
            return Err(ApiError::invalid(
                "timezone applies to cron; an every_ms schedule counts real time",
            ));
        }
        if stored.rule()?.next_after(now_ms).is_none() {
            return Err(ApiError::invalid(
                "cron: the expression matches no date from now on (such as 30 February)",
            ));
        }
        // The occurrences' task fields, validated as a task request would be.
        build_task(self, queue, stored.request(occurrence_id(name, 0)), now_ms)?;
        if let Some(old) = &existing {
            // A replacement keeps its history and does not create what fell before it.
            stored.created_at_ms = old.created_at_ms;
            stored.created = old.created;
            stored.skipped = old.skipped;
            stored.runs = old.runs.clone();
            stored.last_task_id = old.last_task_id.clone();
            if old.every_ms == stored.every_ms && start_at_ms.is_none() {
                stored.anchor_ms = old.anchor_ms;
            }
            stored.cursor_ms = stored.cursor_ms.max(old.cursor_ms.min(now_ms));
        }
        self.write_record(&stored, now_ms).await?;
        Ok(Written {
            created: existing.is_none(),
            view: self.schedule_view(&stored, now_ms)?,
        })
    }

    /// Writes a schedule's record, due at its first materialisation (never while paused). Waits a
    /// moment while a materialiser holds the record.
    async fn write_record(&self, stored: &Stored, now_ms: u64) -> Result<(), ApiError> {
        let next_ms = stored
            .rule()?
            .next_after(stored.cursor_ms)
            .filter(|n| stored.end_at_ms.is_none_or(|end| *n <= end));
        let run_at_ms = stored.wake_at(next_ms).max(now_ms);
        let record = self.record_task(stored, run_at_ms);
        let outcome = self
            .when_free(&stored.queue, &stored.name, || Command::Put {
                task: Box::new(record.clone()),
                when: PutWhen::Always,
                keep_due: false,
            })
            .await?;
        match outcome {
            Outcome::Put { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Commits a command on a schedule's record (made afresh for each try), waiting a moment while
    /// a materialiser holds the record (it is `ready` or `leased` for the instant of a round).
    async fn when_free(
        &self,
        queue: &str,
        name: &str,
        command: impl Fn() -> Command,
    ) -> Result<Outcome, ApiError> {
        for round in 0..=BUSY_RETRIES {
            if round > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(BUSY_WAIT_MS)).await;
            }
            match self.writer.submit_one(command()).await? {
                Outcome::WrongState(TaskState::Ready | TaskState::Leased) => continue,
                outcome => return Ok(outcome),
            }
        }
        Err(busy(queue, name))
    }

    fn record_task(&self, stored: &Stored, run_at_ms: u64) -> Task {
        // A record never dies: a lease that runs out (a node died holding it) is retried at once.
        Task {
            payload: Some(serde_json::to_string(stored).unwrap_or_default()),
            ..Task::new(
                SCHEDULES_QUEUE,
                record_id(&stored.queue, &stored.name),
                run_at_ms,
                self.config.limits.max_attempts,
                Backoff::Ladder {
                    steps_ms: Vec::new(),
                },
            )
        }
    }

    /// Schedule `name` of `queue` as stored, if it exists.
    pub async fn stored(&self, queue: &str, name: &str) -> Result<Option<Stored>, ApiError> {
        let id = record_id(queue, name);
        let task = self.read(move |s| s.get(SCHEDULES_QUEUE, &id)).await?;
        Ok(task.and_then(|t| parse_record(&t)))
    }

    /// Schedule `name` of `queue` as the API shows it.
    pub async fn get_schedule(&self, queue: &str, name: &str) -> Result<ScheduleView, ApiError> {
        check_queue(self, queue)?;
        let stored = self
            .stored(queue, name)
            .await?
            .ok_or_else(|| no_schedule(queue, name))?;
        self.schedule_view(&stored, self.clock.now_ms())
    }

    /// The schedules of `queue` (of every queue when `None`), by queue and name (at most
    /// [`LIST_MAX`]).
    pub async fn list_schedules(&self, queue: Option<&str>) -> Result<Vec<ScheduleView>, ApiError> {
        if let Some(queue) = queue {
            check_queue(self, queue)?;
        }
        let prefix = queue.map(|q| format!("{q}/")).unwrap_or_default();
        let now_ms = self.clock.now_ms();
        let mut views = Vec::new();
        // Record ids are `<queue>/<name>`: start just before the prefix (`.` sorts before `/`).
        let mut cursor = queue.map(|q| format!("{q}."));
        while views.len() < LIST_MAX {
            let page = self
                .list(SCHEDULES_QUEUE, None, cursor.clone(), Some(1000))
                .await?;
            let mut past = false;
            for task in &page.tasks {
                if !task.id.starts_with(&prefix) {
                    past |= task.id.as_str() > prefix.as_str();
                    continue;
                }
                if let Some(stored) = parse_record(task) {
                    views.push(self.schedule_view(&stored, now_ms)?);
                }
            }
            match page.next_cursor {
                Some(next) if !past => cursor = Some(next),
                _ => break,
            }
        }
        Ok(views)
    }

    /// Deletes a schedule. Occurrences already created (within the next second) stay.
    pub async fn delete_schedule(&self, queue: &str, name: &str) -> Result<(), ApiError> {
        check_queue(self, queue)?;
        let id = record_id(queue, name);
        let outcome = self
            .when_free(queue, name, || Command::Cancel {
                queue: SCHEDULES_QUEUE.into(),
                id: id.clone(),
            })
            .await?;
        match outcome {
            Outcome::Cancelled(_) => Ok(()),
            Outcome::NotFound => Err(no_schedule(queue, name)),
            other => Err(unexpected(&other)),
        }
    }

    /// Pauses or resumes a schedule. A resumed schedule goes on from now: what fell while it was
    /// paused is not created.
    pub async fn pause_schedule(
        &self,
        queue: &str,
        name: &str,
        paused: bool,
    ) -> Result<ScheduleView, ApiError> {
        check_queue(self, queue)?;
        let now_ms = self.clock.now_ms();
        let mut stored = self
            .stored(queue, name)
            .await?
            .ok_or_else(|| no_schedule(queue, name))?;
        if stored.paused != paused {
            stored.paused = paused;
            stored.updated_at_ms = now_ms;
            if !paused {
                stored.cursor_ms = stored.cursor_ms.max(now_ms);
            }
            self.write_record(&stored, now_ms).await?;
        }
        self.schedule_view(&stored, now_ms)
    }

    /// One extra occurrence now; its task is the answer.
    pub async fn trigger_schedule(&self, queue: &str, name: &str) -> Result<Task, ApiError> {
        check_queue(self, queue)?;
        let now_ms = self.clock.now_ms();
        let stored = self
            .stored(queue, name)
            .await?
            .ok_or_else(|| no_schedule(queue, name))?;
        let id = format!("{name}@trigger-{now_ms}");
        let task = build_task(self, queue, stored.request(id), now_ms)?;
        let outcome = self
            .writer
            .submit_one(Command::Schedule(Box::new(task)))
            .await?;
        metrics::counter!(OCCURRENCES, "queue" => queue.to_owned(), "schedule" => name.to_owned(), "outcome" => "triggered").increment(1);
        crate::service::schedule_answer(outcome).map(|(_, task)| task)
    }

    pub fn schedule_view(&self, stored: &Stored, now_ms: u64) -> Result<ScheduleView, ApiError> {
        let rule = stored.rule()?;
        let fmt = |ms: u64| rule.format_local(ms);
        let last_run = stored.runs.iter().rev().find(|at| **at <= now_ms).copied();
        let from = now_ms.max(stored.start_at_ms.map_or(0, |s| s.saturating_sub(1)));
        let next_runs = if stored.paused {
            Vec::new()
        } else {
            rule.between(from, stored.end_at_ms.unwrap_or(u64::MAX), NEXT_RUNS)
                .into_iter()
                .map(|at| NextRun {
                    run_at: fmt(at),
                    run_at_ms: at,
                })
                .collect()
        };
        Ok(ScheduleView {
            queue: stored.queue.clone(),
            name: stored.name.clone(),
            every_ms: stored.every_ms,
            cron: stored.cron.clone(),
            timezone: rule.zone_name().to_owned(),
            payload: stored
                .payload
                .as_ref()
                .and_then(|p| RawValue::from_string(p.clone()).ok()),
            webhook: stored.webhook.clone(),
            max_attempts: stored.max_attempts,
            backoff_ms: stored.backoff_ms.clone(),
            backoff: stored.backoff.clone(),
            lease_ms: stored.lease_ms,
            start_at: stored.start_at_ms.map(fmt),
            end_at: stored.end_at_ms.map(fmt),
            missed: stored.missed.clone(),
            overlap: stored.overlap.clone(),
            paused: stored.paused,
            created_at: fmt(stored.created_at_ms),
            updated_at: fmt(stored.updated_at_ms),
            last_run_at: last_run.map(fmt),
            last_run_at_ms: last_run,
            last_task_id: stored.last_task_id.clone(),
            occurrences_created: stored.created,
            occurrences_skipped: stored.skipped,
            next_runs,
        })
    }
}

fn parse_record(task: &Task) -> Option<Stored> {
    let stored = task
        .payload
        .as_deref()
        .and_then(|p| serde_json::from_str::<Stored>(p).ok());
    if stored.is_none() {
        tracing::warn!(id = %task.id, "a schedule record does not parse; ignored");
    }
    stored
}

fn no_schedule(queue: &str, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no schedule {name:?} in queue {queue:?}"),
    )
}

fn busy(queue: &str, name: &str) -> ApiError {
    ApiError::conflict(
        "schedule_busy",
        format!("schedule {name:?} of queue {queue:?} is being materialised at this moment; retry"),
    )
}

/// Materialises schedules whose records fall due, until shutdown. Every node runs one.
pub async fn materialiser(service: Arc<Service>, shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        let request = ReserveRequest {
            max: Some(ROUND_MAX),
            wait_ms: Some(30_000.min(service.config.limits.max_wait_ms)),
            lease_ms: Some(ROUND_LEASE_MS.min(service.config.limits.max_lease_ms)),
        };
        let records = match service.reserve(SCHEDULES_QUEUE, request).await {
            Ok(records) => records,
            Err(error) => {
                if *shutdown.borrow() {
                    return;
                }
                tracing::warn!(error = %error.message, "the schedule materialiser could not take schedules; trying again in 1 s");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        if records.is_empty() {
            continue;
        }
        // Every record of the round in one commit: one fsync for all of them.
        let mut commands = Vec::new();
        let mut counts = Vec::new();
        for record in &records {
            match materialise(&service, record).await {
                Ok((mut more, count)) => {
                    commands.append(&mut more);
                    counts.push(count);
                }
                Err(error) => {
                    tracing::warn!(schedule = %record.id, error = %error.message, "could not materialise a schedule; it is tried again when its lease ends");
                }
            }
        }
        if let Err(error) = service.writer.submit(commands).await {
            tracing::warn!(error = %error.message, "could not commit a round of schedules; they are tried again when their leases end");
            continue;
        }
        for count in counts {
            count.record();
        }
    }
}

/// What one materialisation created and skipped, for the metric once it is committed.
struct Count {
    queue: String,
    name: String,
    created: u64,
    skipped: u64,
}

impl Count {
    fn record(self) {
        if self.created > 0 {
            metrics::counter!(OCCURRENCES, "queue" => self.queue.clone(), "schedule" => self.name.clone(), "outcome" => "created").increment(self.created);
        }
        if self.skipped > 0 {
            metrics::counter!(OCCURRENCES, "queue" => self.queue, "schedule" => self.name, "outcome" => "skipped").increment(self.skipped);
        }
    }
}

/// One round of one schedule: the commands that create its occurrences up to a second ahead and
/// renew its record, to be committed together.
async fn materialise(service: &Service, record: &Task) -> Result<(Vec<Command>, Count), ApiError> {
    let token = record
        .lease
        .as_ref()
        .map(|l| l.token.clone())
        .unwrap_or_default();
    let now_ms = service.clock.now_ms();
    let Some(mut stored) = parse_record(record) else {
        // Unreadable: park it rather than spin on it.
        let renew = Command::Renew {
            queue: SCHEDULES_QUEUE.into(),
            id: record.id.clone(),
            token,
            run_at_ms: punctual_core::NEVER_MS,
            payload: None,
        };
        let count = Count {
            queue: String::new(),
            name: record.id.clone(),
            created: 0,
            skipped: 0,
        };
        return Ok((vec![renew], count));
    };
    let rule = stored.rule()?;
    let mut commands = Vec::new();
    let (mut created, mut skipped) = (0u64, 0u64);
    let mut next_ms = None;
    if !stored.paused {
        let mut planned: Plan = plan(
            &rule,
            stored.cursor_ms,
            now_ms,
            AHEAD_MS,
            GRACE_MS,
            (stored.start_at_ms, stored.end_at_ms),
            stored.missed(),
        );
        skipped += planned.skipped;
        if stored.overlap == "skip" && !planned.create.is_empty() {
            // One at a time, and only once the previous occurrence's task is finished.
            let first = planned.create[0];
            skipped += (planned.create.len() - 1) as u64;
            planned.create.truncate(1);
            planned.cursor_ms = first;
            planned.next_ms = rule
                .next_after(first)
                .filter(|n| stored.end_at_ms.is_none_or(|end| *n <= end));
            if let Some(previous) = &stored.last_task_id {
                let (queue, id) = (stored.queue.clone(), previous.clone());
                let running = service
                    .read(move |s| s.get(&queue, &id))
                    .await?
                    .is_some_and(|t| {
                        matches!(
                            t.state,
                            TaskState::Scheduled | TaskState::Ready | TaskState::Leased
                        )
                    });
                if running {
                    planned.create.clear();
                    skipped += 1;
                }
            }
        }
        for &at in &planned.create {
            let id = occurrence_id(&stored.name, at);
            let mut task = build_task(service, &stored.queue, stored.request(id.clone()), now_ms)?;
            task.run_at_ms = at;
            commands.push(Command::Schedule(Box::new(task)));
            stored.runs.push(at);
            stored.last_task_id = Some(id);
            created += 1;
        }
        stored.cursor_ms = planned.cursor_ms;
        next_ms = planned.next_ms;
    }
    if stored.runs.len() > RECENT_RUNS {
        stored.runs.drain(..stored.runs.len() - RECENT_RUNS);
    }
    stored.created += created;
    stored.skipped += skipped;
    commands.push(Command::Renew {
        queue: SCHEDULES_QUEUE.into(),
        id: record.id.clone(),
        token,
        run_at_ms: stored.wake_at(next_ms),
        payload: Some(serde_json::to_string(&stored).unwrap_or_default()),
    });
    let count = Count {
        queue: stored.queue.clone(),
        name: stored.name.clone(),
        created,
        skipped,
    };
    Ok((commands, count))
}
