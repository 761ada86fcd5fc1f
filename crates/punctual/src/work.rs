//! `punctual work QUEUE --exec CMD`: a ready-made worker that runs a shell command per task.
//!
//! It long-polls for tasks, runs `sh -c CMD` for each with the payload on stdin (a JSON string as the
//! string itself, any other JSON as the exact text scheduled) and
//! `PUNCTUAL_QUEUE`, `PUNCTUAL_TASK_ID`, `PUNCTUAL_ATTEMPT` in the environment, acks on exit 0 and
//! nacks otherwise with the tail of stderr as the error. While a command runs, its lease is extended
//! every half lease. On SIGTERM/SIGINT it stops reserving, lets running commands finish, and exits.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::client::segment;
use punctual_core::duration::parse_duration_ms;

/// Most bytes of stderr kept as a failed task's error.
const ERROR_TAIL_BYTES: usize = 2048;

#[derive(clap::Args)]
pub struct WorkOpts {
    /// The queue to take tasks from.
    queue: String,
    /// The command, run through `sh -c` once per task.
    #[arg(long)]
    exec: String,
    /// Commands running at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Lease per task; extended every half lease while the command runs.
    #[arg(long, default_value = "30s")]
    lease: String,
    /// The server to talk to.
    #[arg(long, env = "PUNCTUAL_URL", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// Bearer token for a server started with --auth-token.
    #[arg(long, env = "PUNCTUAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// A reserve answer, as much of it as the worker needs.
#[derive(serde::Deserialize)]
struct Reserved {
    tasks: Vec<Leased>,
}

#[derive(serde::Deserialize)]
struct Leased {
    id: String,
    lease_token: String,
    attempt: u64,
    #[serde(default)]
    payload: Option<Box<serde_json::value::RawValue>>,
}

/// What a command gets on stdin: a string payload as the string itself (`"hi"` gives `hi`), any
/// other JSON as the exact text that was scheduled, and nothing for no payload or `null`.
fn stdin_text(payload: Option<&serde_json::value::RawValue>) -> String {
    let Some(raw) = payload else {
        return String::new();
    };
    match raw.get() {
        "null" => String::new(),
        text if text.starts_with('"') => serde_json::from_str::<String>(text).unwrap_or_default(),
        text => text.to_owned(),
    }
}

struct Worker {
    http: reqwest::Client,
    base: String,
    queue: String,
    exec: String,
    lease_ms: u64,
}

impl Worker {
    fn task_url(&self, id: &str, action: &str) -> String {
        format!(
            "{}/v1/queues/{}/tasks/{}/{action}",
            self.base,
            segment(&self.queue),
            segment(id)
        )
    }

    async fn reserve(&self, max: usize) -> Result<Vec<Leased>> {
        let response = self
            .http
            .post(format!(
                "{}/v1/queues/{}/reserve",
                self.base,
                segment(&self.queue)
            ))
            .json(&json!({"max": max, "wait_ms": 20_000, "lease_ms": self.lease_ms}))
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("reserve answered {status}: {text}");
        }
        // Read with the payload as raw text: re-serializing it would reorder its keys.
        let answer: Reserved = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("reserve answered an unexpected body ({e}): {text:.200}")
        })?;
        Ok(answer.tasks)
    }

    /// Runs the command for one task and settles it.
    async fn run(&self, task: Leased) {
        let Leased {
            id,
            lease_token: token,
            attempt,
            payload,
        } = task;
        let stdin = stdin_text(payload.as_deref());
        let outcome = self.execute(&id, &token, attempt, stdin.as_bytes()).await;
        let settle = match &outcome {
            Ok(()) => self
                .http
                .post(self.task_url(&id, "ack"))
                .json(&json!({"lease_token": token})),
            Err(error) => {
                eprintln!(
                    "punctual work: task {id} attempt {attempt} failed: {}",
                    error.lines().next().unwrap_or("")
                );
                self.http
                    .post(self.task_url(&id, "nack"))
                    .json(&json!({"lease_token": token, "error": error}))
            }
        };
        match settle.send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => eprintln!("punctual work: settling task {id} answered {}", r.status()),
            Err(e) => eprintln!("punctual work: cannot settle task {id}: {e}"),
        }
    }

    /// Runs `sh -c exec`; `Err` carries the error text for the nack.
    async fn execute(
        &self,
        id: &str,
        token: &str,
        attempt: u64,
        stdin: &[u8],
    ) -> Result<(), String> {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.exec)
            .env("PUNCTUAL_QUEUE", &self.queue)
            .env("PUNCTUAL_TASK_ID", id)
            .env("PUNCTUAL_ATTEMPT", attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            // A SIGINT from the terminal goes to the whole process group; the worker decides when
            // its commands stop, so they get their own group.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start sh: {e}"))?;
        if let Some(mut input) = child.stdin.take() {
            // A command that does not read its stdin closes the pipe early; that is not an error.
            let _ = input.write_all(stdin).await;
        }
        let mut stderr = child.stderr.take();
        let read_stderr = async move {
            let mut buffer = Vec::new();
            if let Some(stderr) = stderr.as_mut() {
                let _ = stderr.read_to_end(&mut buffer).await;
            }
            buffer
        };
        let extend_every = Duration::from_millis((self.lease_ms / 2).max(50));
        let keep_lease = async {
            loop {
                tokio::time::sleep(extend_every).await;
                let extended = self
                    .http
                    .post(self.task_url(id, "extend"))
                    .json(&json!({"lease_token": token, "lease_ms": self.lease_ms}))
                    .send()
                    .await;
                if let Ok(r) = extended
                    && !r.status().is_success()
                {
                    eprintln!(
                        "punctual work: extending the lease of task {id} answered {}",
                        r.status()
                    );
                }
            }
        };
        let (status, stderr) = tokio::select! {
            done = async { tokio::join!(child.wait(), read_stderr) } => done,
            _ = keep_lease => unreachable!("the lease keeper never ends"),
        };
        let status = status.map_err(|e| format!("waiting for the command: {e}"))?;
        if status.success() {
            return Ok(());
        }
        let tail_start = stderr.len().saturating_sub(ERROR_TAIL_BYTES);
        let tail = String::from_utf8_lossy(&stderr[tail_start..])
            .trim()
            .to_owned();
        let code = status
            .code()
            .map_or_else(|| "a signal".to_owned(), |c| format!("code {c}"));
        Err(if tail.is_empty() {
            format!("exited with {code}")
        } else {
            format!("exited with {code}: {tail}")
        })
    }
}

pub async fn run(opts: WorkOpts) -> Result<()> {
    if opts.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let lease_ms = parse_duration_ms(&opts.lease).map_err(anyhow::Error::msg)?;
    let worker = Arc::new(Worker {
        http: crate::client::http_client(opts.token.as_deref())?,
        base: opts.server.trim_end_matches('/').to_owned(),
        queue: opts.queue,
        exec: opts.exec,
        lease_ms,
    });
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let stopping = stopping.clone();
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            eprintln!("punctual work: stopping; letting running commands finish");
            stopping.store(true, Ordering::SeqCst);
        });
    }
    let slots = Arc::new(Semaphore::new(opts.concurrency));
    let mut backoff = Duration::from_millis(100);
    while !stopping.load(Ordering::SeqCst) {
        // Reserve only as many tasks as there are free slots.
        let first = slots.clone().acquire_many_owned(1).await?;
        let mut permits = vec![first];
        while let Ok(more) = slots.clone().try_acquire_owned() {
            permits.push(more);
        }
        let reserved = tokio::select! {
            r = worker.reserve(permits.len()) => r,
            _ = wait_for(&stopping) => break,
        };
        let tasks = match reserved {
            Ok(tasks) => {
                backoff = Duration::from_millis(100);
                tasks
            }
            Err(error) => {
                eprintln!("punctual work: {error:#}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        for task in tasks {
            let Some(permit) = permits.pop() else { break };
            let worker = worker.clone();
            tokio::spawn(async move {
                worker.run(task).await;
                drop(permit);
            });
        }
    }
    // Wait for every running command to finish and be settled.
    let _ = slots.acquire_many(opts.concurrency as u32).await?;
    Ok(())
}

async fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::stdin_text;
    use serde_json::value::RawValue;

    #[test]
    fn strings_are_raw_and_json_is_kept_as_sent() {
        let raw = |t: &str| RawValue::from_string(t.to_owned()).unwrap();
        assert_eq!(
            stdin_text(Some(&raw(r#""hello \"you\"""#))),
            r#"hello "you""#
        );
        assert_eq!(
            stdin_text(Some(&raw(r#"{"z":1, "a":2}"#))),
            r#"{"z":1, "a":2}"#
        );
        assert_eq!(stdin_text(Some(&raw("null"))), "");
        assert_eq!(stdin_text(None), "");
        assert_eq!(
            stdin_text(Some(&raw("12345678901234567890123"))),
            "12345678901234567890123"
        );
    }
}
