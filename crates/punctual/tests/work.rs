//! `punctual work --exec` with real shell commands against a real server.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, bin, temp_dir};
use serde_json::{Value, json};

fn worker(server: &Server, args: &[&str], out: &std::path::Path) -> Child {
    Command::new(bin())
        .arg("work")
        .args(args)
        .env("PUNCTUAL_URL", &server.url)
        .env("OUT", out)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn schedule(server: &Server, queue: &str, body: Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/queues/{queue}/tasks", server.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

async fn get(server: &Server, queue: &str, id: &str) -> Value {
    reqwest::get(format!("{}/v1/queues/{queue}/tasks/{id}", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls until the task is in `state`, or panics after `within`.
async fn wait_state(
    server: &Server,
    queue: &str,
    id: &str,
    state: &str,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let task = get(server, queue, id).await;
        if task["state"] == state {
            return task;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} is {} not {state}: {task}",
            task["state"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    assert!(
        Command::new("kill")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    child.wait().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_acks_with_payload_and_environment() {
    let (dir, out) = (temp_dir("work-ok"), temp_dir("work-ok-out"));
    let server = Server::start(&dir, &[]).await;
    for i in 0..5 {
        schedule(
            &server,
            "jobs",
            json!({"id": format!("j{i}"), "payload": {"n": i}}),
        )
        .await;
    }
    let script = r#"cat > "$OUT/$PUNCTUAL_TASK_ID.in"; echo "$PUNCTUAL_QUEUE $PUNCTUAL_ATTEMPT" > "$OUT/$PUNCTUAL_TASK_ID.env""#;
    let mut child = worker(
        &server,
        &["jobs", "--exec", script, "--concurrency", "2"],
        &out,
    );
    for i in 0..5 {
        let task = wait_state(
            &server,
            "jobs",
            &format!("j{i}"),
            "succeeded",
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(task["attempt"], 1);
        let input = std::fs::read_to_string(out.join(format!("j{i}.in"))).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&input).unwrap(),
            json!({"n": i})
        );
        assert_eq!(
            std::fs::read_to_string(out.join(format!("j{i}.env"))).unwrap(),
            "jobs 1\n"
        );
    }
    assert!(terminate(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_nacks_with_the_stderr_tail_until_dead() {
    let (dir, out) = (temp_dir("work-fail"), temp_dir("work-fail-out"));
    let server = Server::start(&dir, &[]).await;
    schedule(
        &server,
        "jobs",
        json!({"id": "bad", "max_attempts": 2, "backoff_ms": [0]}),
    )
    .await;
    let mut child = worker(
        &server,
        &[
            "jobs",
            "--exec",
            r#"echo "boom on attempt $PUNCTUAL_ATTEMPT" >&2; exit 3"#,
        ],
        &out,
    );
    let task = wait_state(&server, "jobs", "bad", "dead", Duration::from_secs(10)).await;
    assert_eq!(task["attempt"], 2);
    assert_eq!(task["last_error"], "exited with code 3: boom on attempt 2");
    assert!(terminate(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_command_keeps_its_lease() {
    let (dir, out) = (temp_dir("work-long"), temp_dir("work-long-out"));
    let server = Server::start(&dir, &[]).await;
    schedule(&server, "jobs", json!({"id": "slow"})).await;
    // The command runs three times longer than the lease; without extensions the task would be redelivered.
    let mut child = worker(
        &server,
        &[
            "jobs",
            "--exec",
            "sleep 1.5; echo x >> \"$OUT/runs\"",
            "--lease",
            "500ms",
            "--concurrency",
            "2",
        ],
        &out,
    );
    let task = wait_state(
        &server,
        "jobs",
        "slow",
        "succeeded",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        task["attempt"], 1,
        "the lease was extended, so the task ran once: {task}"
    );
    assert_eq!(std::fs::read_to_string(out.join("runs")).unwrap(), "x\n");
    assert!(terminate(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_command_finish() {
    let (dir, out) = (temp_dir("work-term"), temp_dir("work-term-out"));
    let server = Server::start(&dir, &[]).await;
    schedule(&server, "jobs", json!({"id": "t"})).await;
    let mut child = worker(
        &server,
        &["jobs", "--exec", "sleep 1; touch \"$OUT/finished\""],
        &out,
    );
    wait_state(&server, "jobs", "t", "leased", Duration::from_secs(10)).await;
    let started = Instant::now();
    assert!(terminate(&mut child).success());
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "it waited for the command"
    );
    assert!(out.join("finished").exists());
    wait_state(&server, "jobs", "t", "succeeded", Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_server_is_retried_and_said() {
    let out = temp_dir("work-away");
    let child = Command::new(bin())
        .args([
            "work",
            "jobs",
            "--exec",
            "true",
            "--server",
            "http://127.0.0.1:9",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("retrying in"), "{stderr}");
    assert!(output.status.success());
    let _ = std::fs::remove_dir_all(out);
}
