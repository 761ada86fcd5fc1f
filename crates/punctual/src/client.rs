//! The client commands: `schedule`, `get`, `cancel`, `reschedule`, `ls`, `stats`.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::duration::parse_duration_ms;

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
        set_time_and_payload(&mut body, spec.in_, spec.at, spec.payload)?;
        if let Some(n) = spec.max_attempts {
            body["max_attempts"] = n.into();
        }
        if let Some(backoff) = spec.backoff {
            let steps = backoff
                .split(',')
                .map(parse_duration_ms)
                .collect::<Result<Vec<u64>, String>>()
                .map_err(anyhow::Error::msg)?;
            body["backoff_ms"] = steps.into();
        }
        if let Some(url) = spec.webhook {
            body["webhook"] = json!({ "url": url });
        }
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

    pub async fn ls(&self, queue: &str, state: Option<String>, limit: usize) -> Result<()> {
        let mut printed = 0usize;
        let mut cursor: Option<String> = None;
        if !self.json {
            println!(
                "{:<36} {:<10} {:<25} {:>8}",
                "ID", "STATE", "RUN_AT", "ATTEMPT"
            );
        }
        while printed < limit {
            let mut path = format!(
                "/v1/queues/{}/tasks?limit={}",
                segment(queue),
                (limit - printed).min(1000)
            );
            if let Some(state) = &state {
                path.push_str(&format!("&state={}", segment(state)));
            }
            if let Some(cursor) = &cursor {
                path.push_str(&format!("&cursor={}", segment(cursor)));
            }
            let (_, page) = self.call(reqwest::Method::GET, &path, None).await?;
            for task in page["tasks"].as_array().into_iter().flatten() {
                printed += 1;
                if self.json {
                    println!("{task}");
                } else {
                    println!(
                        "{:<36} {:<10} {:<25} {:>4}/{}",
                        task["id"].as_str().unwrap_or(""),
                        task["state"].as_str().unwrap_or(""),
                        task["run_at"].as_str().unwrap_or(""),
                        task["attempt"],
                        task["max_attempts"]
                    );
                }
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        Ok(())
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
            println!("{}", Value::Array(queues));
            return Ok(());
        }
        println!(
            "{:<32} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "QUEUE", "SCHEDULED", "READY", "LEASED", "SUCCEEDED", "DEAD"
        );
        for q in &queues {
            println!(
                "{:<32} {:>10} {:>10} {:>10} {:>10} {:>10}",
                q["queue"].as_str().unwrap_or(""),
                q["scheduled"],
                q["ready"],
                q["leased"],
                q["succeeded"],
                q["dead"]
            );
        }
        Ok(())
    }
}

/// What `punctual schedule` asks for.
pub struct ScheduleSpec {
    pub id: Option<String>,
    pub in_: Option<String>,
    pub at: Option<String>,
    pub payload: Option<String>,
    pub max_attempts: Option<u32>,
    pub backoff: Option<String>,
    pub webhook: Option<String>,
}
