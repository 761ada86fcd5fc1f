//! The client commands: `schedule`, `get`, `cancel`, `reschedule`, `retry`, `ack`, `nack`, `ls`,
//! `stats`. Each prints a table or, with `--json`, one JSON object per line.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use punctual_core::duration::parse_duration_ms;

/// Talks to one server.
pub struct Client {
    base: String,
    http: reqwest::Client,
    pub json: bool,
}

/// An HTTP client that sends `Authorization: Bearer <token>` when a token is given.
pub fn http_client(token: Option<&str>) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the token must be printable ASCII")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

/// Fills `delay_ms` (from `--in`) or `run_at` (from `--at`) and `payload` (from `--payload`).
fn set_time_and_payload(
    body: &mut Value,
    in_: Option<String>,
    at: Option<String>,
    payload: Option<String>,
) -> Result<()> {
    match (in_, at) {
        (Some(_), Some(_)) => bail!("give --in or --at, not both"),
        (Some(delay), None) => {
            body["delay_ms"] = parse_duration_ms(&delay)
                .map_err(anyhow::Error::msg)?
                .into()
        }
        (None, Some(at)) => body["run_at"] = at.into(),
        (None, None) => {}
    }
    if let Some(payload) = payload {
        body["payload"] = serde_json::from_str(&payload)
            .context("--payload must be JSON (quote strings: '\"text\"')")?;
    }
    Ok(())
}

/// A non-2xx answer, with the server's error code and message.
fn describe_error(status: reqwest::StatusCode, body: &Value) -> String {
    match (
        body["error"]["code"].as_str(),
        body["error"]["message"].as_str(),
    ) {
        (Some(code), Some(message)) => format!("{status}: {code}: {message}"),
        _ => format!("{status}: {body}"),
    }
}

/// Percent-encodes one path segment.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(server: &str, json: bool, token: Option<&str>) -> Result<Client> {
        let base = server.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("--server must be an http:// URL, got {server:?}");
        }
        Ok(Client {
            base,
            http: http_client(token)?,
            json,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(reqwest::StatusCode, Value)> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the Punctual server at {}", self.base))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .context("reading the server's answer")?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            bail!("{}", describe_error(status, &body));
        }
        Ok((status, body))
    }

    fn print_task(&self, task: &Value) {
        if self.json {
            println!("{task}");
            return;
        }
        println!("queue        {}", task["queue"].as_str().unwrap_or(""));
        println!("id           {}", task["id"].as_str().unwrap_or(""));
        println!("state        {}", task["state"].as_str().unwrap_or(""));
        println!("run_at       {}", task["run_at"].as_str().unwrap_or(""));
        println!(
            "attempt      {} of {}",
            task["attempt"], task["max_attempts"]
        );
        if let Some(error) = task["last_error"].as_str() {
            println!("last_error   {error}");
        }
        if !task["payload"].is_null() {
            println!("payload      {}", task["payload"]);
        }
    }

    pub async fn schedule(&self, queue: &str, spec: ScheduleSpec) -> Result<()> {
        let mut body = json!({});
        if let Some(id) = spec.id {
            body["id"] = id.into();
        }
        set_time_and_payload(&mut body, spec.in_, spec.at, None)?;
        spec.fields.apply(&mut body)?;
        let (status, task) = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/queues/{}/tasks", segment(queue)),
                Some(body),
            )
            .await?;
        if !self.json {
            println!(
                "{} {} in {} at {}",
                if status == reqwest::StatusCode::CREATED {
                    "scheduled"
                } else {
                    "already scheduled:"
                },
                task["id"].as_str().unwrap_or(""),
                queue,
                task["run_at"].as_str().unwrap_or("")
            );
            return Ok(());
        }
        self.print_task(&task);
        Ok(())
    }

    pub async fn get(&self, queue: &str, id: &str) -> Result<()> {
        let (_, task) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/queues/{}/tasks/{}", segment(queue), segment(id)),
                None,
            )
            .await?;
        self.print_task(&task);
        Ok(())
    }

    pub async fn cancel(&self, queue: &str, id: &str) -> Result<()> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/queues/{}/tasks/{}", segment(queue), segment(id)),
            None,
        )
        .await?;
        if self.json {
            println!("{}", json!({"cancelled": id}));
        } else {
            println!("cancelled {id} in {queue}");
        }
        Ok(())
    }

    pub async fn reschedule(
        &self,
        queue: &str,
        id: &str,
        in_: Option<String>,
        at: Option<String>,
        payload: Option<String>,
    ) -> Result<()> {
        let mut body = json!({});
        set_time_and_payload(&mut body, in_, at, payload)?;
        let (_, task) = self
            .call(
                reqwest::Method::PATCH,
                &format!("/v1/queues/{}/tasks/{}", segment(queue), segment(id)),
                Some(body),
            )
            .await?;
        self.print_task(&task);
        Ok(())
    }

    /// Dead → ready, with new attempts.
    pub async fn retry(&self, queue: &str, id: &str) -> Result<()> {
        let (_, task) = self
            .call(
                reqwest::Method::POST,
                &self.task_path(queue, id, "/retry"),
                None,
            )
            .await?;
        if self.json {
            println!("{task}");
        } else {
            println!(
                "retrying {id} in {queue}: it is {}",
                task["state"].as_str().unwrap_or("")
            );
        }
        Ok(())
    }

    pub async fn ack(&self, queue: &str, id: &str, lease_token: &str) -> Result<()> {
        self.call(
            reqwest::Method::POST,
            &self.task_path(queue, id, "/ack"),
            Some(json!({ "lease_token": lease_token })),
        )
        .await?;
        if self.json {
            println!("{}", json!({"acked": id, "queue": queue}));
        } else {
            println!("acked {id} in {queue}");
        }
        Ok(())
    }

    pub async fn nack(
        &self,
        queue: &str,
        id: &str,
        lease_token: &str,
        error: Option<String>,
        delay: Option<String>,
    ) -> Result<()> {
        let mut body = json!({ "lease_token": lease_token });
        if let Some(error) = error {
            body["error"] = error.into();
        }
        if let Some(delay) = delay {
            body["delay_ms"] = parse_duration_ms(&delay)
                .map_err(anyhow::Error::msg)?
                .into();
        }
        let (_, task) = self
            .call(
                reqwest::Method::POST,
                &self.task_path(queue, id, "/nack"),
                Some(body),
            )
            .await?;
        if self.json {
            println!("{task}");
        } else if task["state"] == "dead" {
            println!("nacked {id} in {queue}: no attempts left, it is dead");
        } else {
            println!(
                "nacked {id} in {queue}: attempt {} of {} runs at {}",
                task["attempt"].as_u64().unwrap_or(0) + 1,
                task["max_attempts"],
                task["run_at"].as_str().unwrap_or("")
            );
        }
        Ok(())
    }

    fn task_path(&self, queue: &str, id: &str, action: &str) -> String {
        format!(
            "/v1/queues/{}/tasks/{}{action}",
            segment(queue),
            segment(id)
        )
    }

    /// The names of every queue the server lists.
    async fn queue_names(&self) -> Result<Vec<String>> {
        let (_, all) = self.call(reqwest::Method::GET, "/v1/queues", None).await?;
        Ok(all["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q["queue"].as_str().map(str::to_owned))
            .collect())
    }

    /// Lists `queue`'s tasks, or every queue's when `queue` is `None`.
    pub async fn ls(&self, queue: Option<&str>, state: Option<String>, limit: usize) -> Result<()> {
        let queues = match queue {
            Some(queue) => vec![queue.to_owned()],
            None => self.queue_names().await?,
        };
        let mut rows: Vec<Value> = Vec::new();
        for queue in &queues {
            rows.extend(self.list_one(queue, state.as_deref(), limit).await?);
        }
        if self.json {
            for task in &rows {
                println!("{task}");
            }
            return Ok(());
        }
        let text = |task: &Value, key: &str| task[key].as_str().unwrap_or("").to_owned();
        let table: Vec<[String; 5]> = rows
            .iter()
            .map(|t| {
                [
                    text(t, "queue"),
                    text(t, "id"),
                    text(t, "state"),
                    text(t, "run_at"),
                    format!("{}/{}", t["attempt"], t["max_attempts"]),
                ]
            })
            .collect();
        print_table(&["QUEUE", "ID", "STATE", "RUN_AT", "ATTEMPT"], &table, 4);
        Ok(())
    }

    async fn list_one(&self, queue: &str, state: Option<&str>, limit: usize) -> Result<Vec<Value>> {
        let mut tasks = Vec::new();
        let mut cursor: Option<String> = None;
        while tasks.len() < limit {
            let mut path = format!(
                "/v1/queues/{}/tasks?limit={}",
                segment(queue),
                (limit - tasks.len()).min(1000)
            );
            if let Some(state) = state {
                path.push_str(&format!("&state={}", segment(state)));
            }
            if let Some(cursor) = &cursor {
                path.push_str(&format!("&cursor={}", segment(cursor)));
            }
            let (_, page) = self.call(reqwest::Method::GET, &path, None).await?;
            tasks.extend(page["tasks"].as_array().into_iter().flatten().cloned());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        tasks.truncate(limit);
        Ok(tasks)
    }

    pub async fn stats(&self, queue: Option<&str>) -> Result<()> {
        let queues = match queue {
            Some(queue) => {
                let (_, counts) = self
                    .call(
                        reqwest::Method::GET,
                        &format!("/v1/queues/{}", segment(queue)),
                        None,
                    )
                    .await?;
                vec![counts]
            }
            None => {
                let (_, all) = self.call(reqwest::Method::GET, "/v1/queues", None).await?;
                all["queues"].as_array().cloned().unwrap_or_default()
            }
        };
        if self.json {
            for q in &queues {
                println!("{q}");
            }
            return Ok(());
        }
        let states = ["scheduled", "ready", "leased", "succeeded", "dead"];
        let table: Vec<[String; 6]> = queues
            .iter()
            .map(|q| {
                let mut row: [String; 6] = Default::default();
                row[0] = q["queue"].as_str().unwrap_or("").to_owned();
                for (i, state) in states.iter().enumerate() {
                    row[i + 1] = q[*state].to_string();
                }
                row
            })
            .collect();
        print_table(
            &["QUEUE", "SCHEDULED", "READY", "LEASED", "SUCCEEDED", "DEAD"],
            &table,
            1,
        );
        Ok(())
    }
}

/// Prints rows under a header, each column as wide as its widest cell; columns from `first_right`
/// on are right-aligned (numbers).
fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]], first_right: usize) {
    let mut widths: [usize; N] = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            if i >= first_right {
                out.push_str(&format!("{cell:>width$}"));
            } else {
                out.push_str(&format!("{cell:<width$}"));
            }
        }
        println!("{}", out.trim_end());
    };
    line(*header);
    for row in rows {
        line(std::array::from_fn(|i| row[i].as_str()));
    }
}

/// `--backoff-exp INITIAL[,FACTOR[,MAX]]` as the API's `backoff` object.
fn exponential(text: &str) -> Result<Value> {
    let mut parts = text.split(',').map(str::trim);
    let mut backoff = json!({});
    if let Some(initial) = parts.next() {
        backoff["initial_ms"] = parse_duration_ms(initial)
            .map_err(anyhow::Error::msg)?
            .into();
    }
    if let Some(factor) = parts.next() {
        let factor: f64 = factor.parse().with_context(|| {
            format!("--backoff-exp: the factor must be a number, got {factor:?}")
        })?;
        backoff["factor"] = factor.into();
    }
    if let Some(max) = parts.next() {
        backoff["max_ms"] = parse_duration_ms(max).map_err(anyhow::Error::msg)?.into();
    }
    if parts.next().is_some() {
        bail!("--backoff-exp takes INITIAL[,FACTOR[,MAX]], e.g. 1s,2,10m; got {text:?}");
    }
    Ok(backoff)
}

/// What `punctual schedule` asks for.
#[derive(clap::Args)]
pub struct ScheduleSpec {
    /// Delay from now: 500ms, 10s, 5min, 1h30m, 2d.
    #[arg(long = "in", value_name = "DURATION")]
    pub in_: Option<String>,
    /// Due time, RFC 3339 with a zone (2026-11-22T09:30:00Z, 2026-11-22T10:30:00+01:00).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Task id (default: generated). Scheduling the same id and spec again is a no-op.
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub fields: TaskFields,
}

/// The fields of a task (or of each occurrence of a recurring schedule).
#[derive(clap::Args)]
pub struct TaskFields {
    /// Payload as JSON ('{"order":123}', or '"text"' for a string); delivered as sent.
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,
    /// Attempts before the task is dead (default: the server's, 5 unless configured).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Retry ladder, e.g. 10s,30s,1m (the last step repeats).
    #[arg(long, value_name = "DURATIONS", conflicts_with = "backoff_exp")]
    pub backoff: Option<String>,
    /// Exponential backoff: INITIAL[,FACTOR[,MAX]], e.g. 1s,2,10m (jittered).
    #[arg(long, value_name = "INITIAL,FACTOR,MAX")]
    pub backoff_exp: Option<String>,
    /// Lease length when this task is handed out (default: the reserve's or the server's).
    #[arg(long, value_name = "DURATION")]
    pub lease: Option<String>,
    /// Deliver by POSTing to this URL.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// A header for the webhook request, "Name: value" (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE", requires = "webhook")]
    pub headers: Vec<String>,
    /// How long a webhook request may take (default: the server's, 10s).
    #[arg(long, value_name = "DURATION", requires = "webhook")]
    pub webhook_timeout: Option<String>,
}

impl TaskFields {
    /// Sets these fields in a request body.
    pub fn apply(self, body: &mut Value) -> Result<()> {
        if let Some(payload) = self.payload {
            body["payload"] = serde_json::from_str(&payload)
                .context("--payload must be JSON (quote strings: '\"text\"')")?;
        }
        if let Some(n) = self.max_attempts {
            body["max_attempts"] = n.into();
        }
        if let Some(backoff) = self.backoff {
            let steps = backoff
                .split(',')
                .map(parse_duration_ms)
                .collect::<Result<Vec<u64>, String>>()
                .map_err(anyhow::Error::msg)?;
            body["backoff_ms"] = steps.into();
        }
        if let Some(exp) = self.backoff_exp {
            body["backoff"] = exponential(&exp)?;
        }
        if let Some(lease) = self.lease {
            body["lease_ms"] = parse_duration_ms(&lease)
                .map_err(anyhow::Error::msg)?
                .into();
        }
        if let Some(url) = self.webhook {
            let mut webhook = json!({ "url": url });
            for header in &self.headers {
                let Some((name, value)) = header.split_once(':') else {
                    bail!("--header must be \"Name: value\", got {header:?}");
                };
                webhook["headers"][name.trim()] = value.trim().into();
            }
            if let Some(timeout) = self.webhook_timeout {
                webhook["timeout_ms"] = parse_duration_ms(&timeout)
                    .map_err(anyhow::Error::msg)?
                    .into();
            }
            body["webhook"] = webhook;
        }
        Ok(())
    }
}

/// What `punctual every` asks for.
#[derive(clap::Args)]
pub struct EverySpec {
    /// Every this long: 200ms, 10s, 5m, 1h, 1d.
    #[arg(
        long,
        value_name = "DURATION",
        required_unless_present = "cron",
        conflicts_with = "cron"
    )]
    pub every: Option<String>,
    /// A cron expression: 5 fields, 6 with seconds first, or @hourly/@daily/@weekly/@monthly/@yearly.
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// The IANA time zone the cron expression is read in (default UTC), e.g. Europe/Berlin.
    #[arg(long = "tz", value_name = "ZONE", requires = "cron")]
    pub timezone: Option<String>,
    /// No occurrence before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub start_at: Option<String>,
    /// No occurrence after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub end_at: Option<String>,
    /// What to create for occurrences missed while the server was down: skip, latest (default), all.
    #[arg(long, value_name = "POLICY")]
    pub missed: Option<String>,
    /// Do not create an occurrence while the previous one's task is not finished.
    #[arg(long)]
    pub no_overlap: bool,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
    #[command(flatten)]
    pub fields: TaskFields,
}

impl Client {
    /// Creates or replaces a recurring schedule.
    pub async fn every(&self, queue: &str, name: &str, spec: EverySpec) -> Result<()> {
        let mut body = json!({});
        if let Some(every) = spec.every {
            body["every_ms"] = parse_duration_ms(&every)
                .map_err(anyhow::Error::msg)?
                .into();
        }
        if let Some(cron) = spec.cron {
            body["cron"] = cron.into();
        }
        if let Some(zone) = spec.timezone {
            body["timezone"] = zone.into();
        }
        for (field, value) in [
            ("start_at", spec.start_at),
            ("end_at", spec.end_at),
            ("missed", spec.missed),
        ] {
            if let Some(value) = value {
                body[field] = value.into();
            }
        }
        if spec.no_overlap {
            body["overlap"] = "skip".into();
        }
        if spec.paused {
            body["paused"] = true.into();
        }
        spec.fields.apply(&mut body)?;
        let (status, schedule) = self
            .call(
                reqwest::Method::PUT,
                &schedule_path(queue, name),
                Some(body),
            )
            .await?;
        if self.json {
            println!("{schedule}");
            return Ok(());
        }
        println!(
            "{} schedule {name} in {queue}",
            if status == reqwest::StatusCode::CREATED {
                "created"
            } else {
                "replaced"
            }
        );
        print_next_runs(&schedule);
        Ok(())
    }

    /// Lists the schedules of one queue, or of every queue.
    pub async fn schedules(&self, queue: Option<&str>) -> Result<()> {
        let path = match queue {
            Some(queue) => format!("/v1/queues/{}/schedules", segment(queue)),
            None => "/v1/schedules".to_owned(),
        };
        let (_, body) = self.call(reqwest::Method::GET, &path, None).await?;
        if !self.json {
            println!(
                "{:<16} {:<24} {:<30} {:<7} {:>8} {:>8}  NEXT RUN",
                "QUEUE", "NAME", "RULE", "STATE", "CREATED", "SKIPPED"
            );
        }
        for schedule in body["schedules"].as_array().into_iter().flatten() {
            if self.json {
                println!("{schedule}");
                continue;
            }
            let rule = match (schedule["every_ms"].as_u64(), schedule["cron"].as_str()) {
                (Some(ms), _) => format!(
                    "every {}",
                    humantime::format_duration(std::time::Duration::from_millis(ms))
                ),
                (None, Some(cron)) => {
                    format!("{cron} {}", schedule["timezone"].as_str().unwrap_or(""))
                }
                _ => String::new(),
            };
            let state = if schedule["paused"] == true {
                "paused"
            } else {
                "active"
            };
            println!(
                "{:<16} {:<24} {:<30} {:<7} {:>8} {:>8}  {}",
                schedule["queue"].as_str().unwrap_or(""),
                schedule["name"].as_str().unwrap_or(""),
                rule,
                state,
                schedule["occurrences_created"].as_u64().unwrap_or(0),
                schedule["occurrences_skipped"].as_u64().unwrap_or(0),
                schedule["next_runs"][0]["run_at"].as_str().unwrap_or("-")
            );
        }
        Ok(())
    }

    /// Deletes a schedule.
    pub async fn unschedule(&self, queue: &str, name: &str) -> Result<()> {
        self.call(reqwest::Method::DELETE, &schedule_path(queue, name), None)
            .await?;
        if self.json {
            println!("{}", json!({"deleted": name}));
        } else {
            println!("deleted schedule {name} in {queue}");
        }
        Ok(())
    }

    /// Pauses or resumes a schedule.
    pub async fn pause(&self, queue: &str, name: &str, pause: bool) -> Result<()> {
        let action = if pause { "pause" } else { "resume" };
        let (_, schedule) = self
            .call(
                reqwest::Method::POST,
                &format!("{}/{action}", schedule_path(queue, name)),
                None,
            )
            .await?;
        if self.json {
            println!("{schedule}");
        } else {
            println!("{action}d schedule {name} in {queue}");
            print_next_runs(&schedule);
        }
        Ok(())
    }
}

fn schedule_path(queue: &str, name: &str) -> String {
    format!("/v1/queues/{}/schedules/{}", segment(queue), segment(name))
}

fn print_next_runs(schedule: &Value) {
    for run in schedule["next_runs"].as_array().into_iter().flatten() {
        println!("  next  {}", run["run_at"].as_str().unwrap_or(""));
    }
}
