//! The binary end to end: client commands against a real server, clean stop on SIGTERM, and a clear
//! startup error for a damaged data file.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Server, bin, temp_dir};

fn punctual(server: &Server, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("PUNCTUAL_URL", &server.url)
        .output()
        .expect("run punctual")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_work_against_a_real_server() {
    let dir = temp_dir("cli");
    let server = Server::start(&dir, &[]).await;

    let schedule_o1 = [
        "schedule",
        "orders",
        "--in",
        "30m",
        "--id",
        "o-1",
        "--payload",
        r#"{"order":1}"#,
        "--max-attempts",
        "3",
        "--backoff",
        "10s,30s,1m",
    ];
    let out = stdout(&punctual(&server, &schedule_o1));
    assert!(out.starts_with("scheduled o-1 in orders at "), "{out}");
    let again = stdout(&punctual(&server, &schedule_o1));
    assert!(again.starts_with("already scheduled"), "{again}");

    let json = stdout(&punctual(&server, &["get", "orders", "o-1", "--json"]));
    let task: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(task["state"], "scheduled");
    assert_eq!(
        task["backoff_ms"],
        serde_json::json!([10_000, 30_000, 60_000])
    );
    assert_eq!(task["max_attempts"], 3);

    let moved = stdout(&punctual(
        &server,
        &[
            "reschedule",
            "orders",
            "o-1",
            "--at",
            "2030-01-01T00:00:00Z",
            "--json",
        ],
    ));
    assert!(moved.contains("2030-01-01T00:00:00.000Z"), "{moved}");

    stdout(&punctual(
        &server,
        &["schedule", "orders", "--in", "1h", "--id", "o-2"],
    ));
    let listing = stdout(&punctual(
        &server,
        &["ls", "orders", "--state", "scheduled"],
    ));
    assert!(
        listing.contains("o-1") && listing.contains("o-2"),
        "{listing}"
    );

    let stats = stdout(&punctual(&server, &["stats"]));
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("orders") && l.split_whitespace().nth(1) == Some("2")),
        "{stats}"
    );

    stdout(&punctual(&server, &["cancel", "orders", "o-2"]));
    let missing = punctual(&server, &["get", "orders", "o-2"]);
    assert!(!missing.status.success());
    let error = String::from_utf8_lossy(&missing.stderr);
    assert!(
        error.contains("404") && error.contains("not_found"),
        "{error}"
    );

    let bad = punctual(&server, &["schedule", "orders", "--in", "soon"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid duration"));

    let away = Command::new(bin())
        .args(["get", "orders", "o-1", "--server", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&away.stderr).contains("cannot reach"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_data_survives() {
    let dir = temp_dir("term");
    let mut server = Server::start(&dir, &[]).await;
    stdout(&punctual(
        &server,
        &["schedule", "q", "--in", "1h", "--id", "keep"],
    ));
    // A long-poll in flight must not hold up the shutdown.
    let url = server.url.clone();
    let poll = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/queues/q/reserve"))
            .body(r#"{"wait_ms": 60000}"#)
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert!(
        Command::new("kill")
            .arg(server.child.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let answer = poll.await.unwrap().expect("the long-poll got an answer");
    assert!(answer.status().is_success());
    server.restart().await;
    let got = stdout(&punctual(&server, &["get", "q", "keep"]));
    assert!(got.contains("scheduled"), "{got}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_send_the_token() {
    let dir = temp_dir("auth");
    let server = Server::start(&dir, &["--auth-token", "t0k3n"]).await;
    let refused = punctual(&server, &["schedule", "q", "--in", "1h", "--id", "a"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let accepted = Command::new(bin())
        .args(["schedule", "q", "--in", "1h", "--id", "a"])
        .env("PUNCTUAL_URL", &server.url)
        .env("PUNCTUAL_TOKEN", "t0k3n")
        .output()
        .unwrap();
    assert!(stdout(&accepted).starts_with("scheduled a"));
    assert!(
        stdout(&punctual(&server, &["get", "q", "a", "--token", "t0k3n"])).contains("scheduled")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn settings_come_from_flags_over_env_over_file() {
    let dir = temp_dir("config");
    let file = dir.join("punctual.toml");
    std::fs::write(
        &file,
        "cache_mb = 10\nretention_ms = 1000\nmax_batch = 50\nhttp = \"127.0.0.1:7999\"\n",
    )
    .unwrap();
    let output = Command::new(bin())
        .args([
            "serve",
            "--print-config",
            "--protect-metrics",
            "--cache-mb",
            "30",
            "--config",
        ])
        .arg(&file)
        .env("PUNCTUAL_CACHE_MB", "20")
        .env("PUNCTUAL_RETENTION_MS", "2000")
        .output()
        .unwrap();
    let settings: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        settings["cache_mb"], 30,
        "the flag beats the env var and the file"
    );
    assert_eq!(settings["retention_ms"], 2000, "the env var beats the file");
    assert_eq!(settings["max_batch"], 50, "the file beats the default");
    assert_eq!(settings["http"], "127.0.0.1:7999");
    assert_eq!(settings["default_lease_ms"], 30000, "the default");
    assert_eq!(
        settings["protect_metrics"], true,
        "a bare --protect-metrics means true"
    );

    // Tokens from a file (one per line, # comments) add to those from flags; the limits' settings.
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "# ops\nfirst-token\n\n  second-token  \n").unwrap();
    std::fs::write(
        &file,
        "max_connections = 500\nidle_timeout_ms = 5000\nwebhook_allow = [\"10.0.0.0/8\", \".internal\"]\n",
    )
    .unwrap();
    let output = Command::new(bin())
        .args([
            "serve",
            "--print-config",
            "--auth-token",
            "third",
            "--auth-token-file",
        ])
        .arg(&tokens)
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let settings: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(settings["auth_token_count"], 3, "{settings}");
    assert!(
        !settings.to_string().contains("first-token"),
        "tokens are never printed"
    );
    assert_eq!(settings["max_connections"], 500);
    assert_eq!(settings["idle_timeout_ms"], 5000);
    assert_eq!(settings["header_read_timeout_ms"], 10000);
    assert_eq!(
        settings["webhook_allow"],
        serde_json::json!(["10.0.0.0/8", ".internal"])
    );
    std::fs::write(&file, "webhook_allow = [\"not a network!\"]\n").unwrap();
    let bad = Command::new(bin())
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("webhook_allow"));

    std::fs::write(&file, "retention = 5\n").unwrap();
    let bad = Command::new(bin())
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let error = String::from_utf8_lossy(&bad.stderr);
    assert!(
        error.contains("retention") && error.contains("punctual.toml"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_data_file_is_a_clear_startup_error() {
    let dir = temp_dir("damaged");
    std::fs::write(
        dir.join("punctual.redb"),
        b"this is not a database at all, not even close".repeat(100),
    )
    .unwrap();
    let output = Command::new(bin())
        .args(["serve", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("punctual.redb") && error.contains("error"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `path` holds a line with every one of `words`, and returns it.
async fn log_line(path: &std::path::Path, words: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {words:?} in:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Failed and dead tasks are visible: one log line per failed attempt (nack, webhook, lease expiry),
/// the startup count, and `ls --all-queues --state dead`, `retry`, `ack`, `nack` and `stats` from the
/// command line, each with `--json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_dead_tasks_are_visible() {
    let dir = temp_dir("visible");
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server =
        Server::start_logging(&dir, &["--webhook-allow-private"], "info", log.into()).await;
    log_line(&log_path, &["recovered tasks", "scheduled=0"]).await;
    let http = reqwest::Client::new();
    let reserve = |queue: &str| {
        let request = http
            .post(format!("{}/v1/queues/{queue}/reserve", server.url))
            .body(r#"{"wait_ms": 5000}"#);
        async move {
            let answer: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
            answer["tasks"][0].clone()
        }
    };
    let run = |args: &[&str]| stdout(&punctual(&server, args));

    run(&[
        "schedule",
        "mail",
        "--id",
        "m1",
        "--max-attempts",
        "2",
        "--backoff",
        "0s",
    ]);
    let leased = reserve("mail").await;
    let token = leased["lease_token"].as_str().unwrap();
    let out = run(&[
        "nack",
        "mail",
        "m1",
        "--lease-token",
        token,
        "--error",
        "smtp 451",
    ]);
    assert!(out.contains("attempt 2 of 2"), "{out}");
    log_line(
        &log_path,
        &[
            "will be retried",
            "queue=\"mail\"",
            "id=\"m1\"",
            "attempt=1",
            "smtp 451",
        ],
    )
    .await;
    let leased = reserve("mail").await;
    let token = leased["lease_token"].as_str().unwrap();
    let out = run(&[
        "nack",
        "mail",
        "m1",
        "--lease-token",
        token,
        "--error",
        "smtp 550",
        "--json",
    ]);
    let task: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(task["state"], "dead");
    log_line(
        &log_path,
        &["the task is dead", "id=\"m1\"", "attempt=2", "smtp 550"],
    )
    .await;

    // A webhook to a closed port fails; a lease that nobody settles expires.
    run(&[
        "schedule",
        "hooks",
        "--id",
        "w1",
        "--max-attempts",
        "1",
        "--webhook",
        "http://127.0.0.1:9/x",
    ]);
    log_line(
        &log_path,
        &["webhook attempt failed", "id=\"w1\"", "127.0.0.1:9"],
    )
    .await;
    run(&[
        "schedule",
        "slow",
        "--id",
        "s1",
        "--max-attempts",
        "1",
        "--lease",
        "100ms",
    ]);
    assert_eq!(reserve("slow").await["id"], "s1");
    log_line(
        &log_path,
        &["the task is dead", "id=\"s1\"", "lease expired"],
    )
    .await;

    // Every dead task, across queues.
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let out = run(&["ls", "--all-queues", "--state", "dead", "--json"]);
        let ids: Vec<String> = out
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        if ids.len() == 3 || Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead, ["w1", "m1", "s1"], "by queue name: hooks, mail, slow");
    let table = run(&["ls", "--all-queues", "--state", "dead"]);
    assert!(
        table.lines().next().unwrap().starts_with("QUEUE"),
        "{table}"
    );
    assert!(table.contains("mail") && table.contains("m1"), "{table}");

    let out = run(&["retry", "mail", "m1"]);
    assert!(out.contains("ready"), "{out}");
    let leased = reserve("mail").await;
    run(&[
        "ack",
        "mail",
        "m1",
        "--lease-token",
        leased["lease_token"].as_str().unwrap(),
    ]);
    let task: serde_json::Value =
        serde_json::from_str(run(&["get", "mail", "m1", "--json"]).trim()).unwrap();
    assert_eq!(task["state"], "succeeded");
    // A wrong token: the CLI fails with the server's code.
    let wrong = punctual(&server, &["ack", "slow", "s1", "--lease-token", "nope"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("task_finished"));

    // stats: one JSON object per line; the table's columns line up.
    let lines: Vec<serde_json::Value> = run(&["stats", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines
            .iter()
            .all(|q| q["queue"].is_string() && q["dead"].is_u64())
    );
    let table = run(&["stats"]);
    let rows: Vec<&str> = table.lines().collect();
    let header_end = rows[0].find("DEAD").unwrap() + "DEAD".len();
    assert!(rows.iter().all(|r| r.len() == header_end), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `schedule` sets webhook headers and timeout, the lease length and an exponential backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_sets_every_task_field() {
    let dir = temp_dir("fields");
    let server = Server::start(&dir, &["--webhook-allow", "127.0.0.0/8"]).await;
    let out = stdout(&punctual(
        &server,
        &[
            "schedule",
            "hooks",
            "--id",
            "h1",
            "--in",
            "1h",
            "--webhook",
            "http://127.0.0.1:9/x",
            "--header",
            "x-api-key: s3cret",
            "--header",
            "X-Trace:abc",
            "--webhook-timeout",
            "5s",
            "--lease",
            "2min",
            "--backoff-exp",
            "1s,3,10m",
            "--json",
        ],
    ));
    let task: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(task["webhook"]["headers"]["x-api-key"], "s3cret", "{task}");
    assert_eq!(task["webhook"]["headers"]["X-Trace"], "abc", "{task}");
    assert_eq!(task["webhook"]["timeout_ms"], 5_000);
    assert_eq!(task["lease_ms"], 120_000);
    assert_eq!(task["backoff"]["initial_ms"], 1_000);
    assert_eq!(task["backoff"]["factor"], 3.0);
    assert_eq!(task["backoff"]["max_ms"], 600_000);
    let bad = punctual(&server, &["schedule", "q", "--backoff-exp", "1s,2,1m,9"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INITIAL[,FACTOR[,MAX]]"));
    let help = stdout(
        &Command::new(bin())
            .args(["schedule", "--help"])
            .output()
            .unwrap(),
    );
    for arg in ["<QUEUE>", "--max-attempts", "--backoff-exp", "--header"] {
        let line = help.lines().find(|l| l.contains(arg)).unwrap_or_default();
        let described = help
            .lines()
            .skip_while(|l| !l.contains(arg))
            .take(2)
            .any(|l| l.trim().len() > arg.len() + 12);
        assert!(described, "{arg} has no help text: {line:?}\n{help}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A data directory of the redb store (the earlier default) opens with the journal store, the
/// default now: every task is migrated (the redb file kept as `punctual.redb.migrated`), and
/// `--store redb` on a journal directory is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redb_data_directory_migrates_to_the_journal_store() {
    let dir = temp_dir("migrate");
    let mut server = Server::start(&dir, &["--store", "redb"]).await;
    for i in 0..30 {
        stdout(&punctual(
            &server,
            &[
                "schedule",
                "orders",
                "--in",
                "1h",
                "--id",
                &format!("o{i}"),
                "--payload",
                &format!("{{\"n\":{i}}}"),
            ],
        ));
    }
    stdout(&punctual(&server, &["cancel", "orders", "o3"]));
    server.kill9();
    let mut server = Server::start(&dir, &[]).await;
    assert!(dir.join("punctual.redb.migrated").exists());
    assert!(!dir.join("punctual.redb").exists());
    let listing = stdout(&punctual(&server, &["ls", "orders", "--json"]));
    let ids: Vec<String> = listing
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 29, "{ids:?}");
    assert!(!ids.contains(&"o3".to_owned()));
    let task: serde_json::Value =
        serde_json::from_str(stdout(&punctual(&server, &["get", "orders", "o7", "--json"])).trim())
            .unwrap();
    assert_eq!(task["payload"], serde_json::json!({"n": 7}));
    // The migrated tasks survive a kill -9 of the journal store.
    server.kill9();
    server.restart().await;
    assert_eq!(
        stdout(&punctual(&server, &["ls", "orders", "--json"]))
            .lines()
            .count(),
        29
    );
    server.kill9();
    let refused = Command::new(bin())
        .args(["serve", "--store", "redb", "--data-dir"])
        .arg(&dir)
        .args(["--http", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("without --store redb"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_schedule_commands() {
    let server = Server::start(&temp_dir("cli-every"), &[]).await;
    let out = stdout(&punctual(
        &server,
        &[
            "every",
            "reports",
            "daily",
            "--cron",
            "0 9 * * MON-FRI",
            "--tz",
            "Europe/Berlin",
            "--payload",
            r#"{"report":"sales"}"#,
            "--max-attempts",
            "2",
        ],
    ));
    assert!(
        out.starts_with("created schedule daily in reports"),
        "{out}"
    );
    assert_eq!(out.matches("T09:00:00+01:00").count(), 5, "{out}");
    let out = stdout(&punctual(
        &server,
        &[
            "every",
            "sync",
            "feeds",
            "--every",
            "5m",
            "--no-overlap",
            "--missed",
            "all",
        ],
    ));
    assert!(out.starts_with("created schedule feeds in sync"), "{out}");
    let json = stdout(&punctual(&server, &["schedules", "sync", "--json"]));
    let schedule: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(schedule["every_ms"], 300_000);
    assert_eq!(schedule["overlap"], "skip");
    assert_eq!(schedule["missed"], "all");
    let table = stdout(&punctual(&server, &["schedules"]));
    assert!(table.contains("0 9 * * MON-FRI Europe/Berlin"), "{table}");
    assert!(table.contains("every 5m"), "{table}");
    let out = stdout(&punctual(&server, &["pause", "reports", "daily"]));
    assert!(out.starts_with("paused schedule daily"), "{out}");
    let table = stdout(&punctual(&server, &["schedules", "reports"]));
    assert!(table.contains("paused"), "{table}");
    stdout(&punctual(&server, &["resume", "reports", "daily"]));
    stdout(&punctual(&server, &["unschedule", "reports", "daily"]));
    let gone = punctual(&server, &["unschedule", "reports", "daily"]);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("no schedule"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    let bad = punctual(&server, &["every", "sync", "bad", "--cron", "61 * * * *"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("field 1 (minute)"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
