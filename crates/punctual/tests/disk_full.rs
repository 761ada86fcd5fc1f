//! The journal store on a disk that fills up: a real tmpfs of a few MiB mounted by the test (it runs
//! as root, as CI does here). Below the free-space threshold new tasks get `507`; on a really full
//! disk a commit that cannot be written gets `507` and changes nothing; reads and health stay fine;
//! writes resume by themselves once space returns; nothing acknowledged is lost.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, temp_dir};

/// A tmpfs of `mib` MiB, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = temp_dir("tmpfs");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a tmpfs and must run as root (as CI does): mount exited {status}"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fill(path: &Path, mib: usize) {
    std::fs::write(path, vec![0x5a; mib << 20]).unwrap();
}

async fn schedule(
    http: &reqwest::Client,
    server: &Server,
    id: &str,
    payload_kib: usize,
) -> (u16, serde_json::Value) {
    let body = format!(
        r#"{{"id":"{id}","delay_ms":600000,"payload":"{}"}}"#,
        "p".repeat(payload_kib << 10)
    );
    let response = http
        .post(format!("{}/v1/queues/q/tasks", server.url))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn healthy(http: &reqwest::Client, server: &Server) -> bool {
    http.get(format!("{}/healthz", server.url))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Schedules until the server answers something other than 201; answers the ids acknowledged and that
/// answer.
async fn until_refused(
    http: &reqwest::Client,
    server: &Server,
    prefix: &str,
) -> (Vec<String>, u16, serde_json::Value) {
    let mut acked = Vec::new();
    for n in 0..2_000 {
        let id = format!("{prefix}{n}");
        let (status, body) = schedule(http, server, &id, 64).await;
        if status != 201 {
            return (acked, status, body);
        }
        acked.push(id);
    }
    panic!("the disk never filled");
}

async fn resumes(http: &reqwest::Client, server: &Server, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = schedule(http, server, id, 1).await;
        if status == 201 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "writes never resumed: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_tasks_with_507_and_recovers_by_itself() {
    let disk = Tmpfs::mount(24);
    let filler = disk.0.join("filler");
    fill(&filler, 12);
    let data = disk.0.join("data");
    let http = reqwest::Client::new();

    // Below the threshold (8 MiB free kept): 507 before the disk is full.
    let mut server = Server::start(&data, &["--store", "journal", "--min-free-disk-mb", "8"]).await;
    let (acked, status, body) = until_refused(&http, &server, "t").await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--min-free-disk-mb"),
        "{body}"
    );
    assert!(!acked.is_empty());
    assert!(
        healthy(&http, &server).await,
        "a full disk is not a poisoned store"
    );
    let got = http
        .get(format!("{}/v1/queues/q/tasks/{}", server.url, acked[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200, "reads keep working");
    // Space returns: writes resume without a restart.
    std::fs::remove_file(&filler).unwrap();
    resumes(&http, &server, "after-threshold").await;

    // Really full (the threshold off): the commit that cannot be written is refused, nothing else.
    server.kill9();
    fill(&filler, 12);
    let mut server = Server::start(&data, &["--store", "journal", "--min-free-disk-mb", "0"]).await;
    let (more, status, body) = until_refused(&http, &server, "u").await;
    assert_eq!(status, 507, "{body}");
    assert!(healthy(&http, &server).await, "ENOSPC does not poison");
    let refused = format!("u{}", more.len());
    let missing = http
        .get(format!("{}/v1/queues/q/tasks/{refused}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404, "the refused task was not kept");
    std::fs::remove_file(&filler).unwrap();
    resumes(&http, &server, "after-enospc").await;

    // Everything acknowledged survives a restart.
    server.kill9();
    server.restart().await;
    for id in acked
        .iter()
        .chain(&more)
        .chain(["after-threshold".to_owned(), "after-enospc".to_owned()].iter())
    {
        let got = http
            .get(format!("{}/v1/queues/q/tasks/{id}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 200, "{id} was acknowledged and is gone");
    }
}
