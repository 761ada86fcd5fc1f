//! Helpers shared by the binary's tests: spawning `punctual serve` for real, waiting for it, a seeded RNG.
#![allow(dead_code, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A fresh directory, `punctual-<tag>-<pid>-<n>-<nanos>`. The counter `n` keeps tests that start
/// at once apart: the time alone gave two crash tests the same directory in CI. The time keeps a
/// later run whose process id repeats away from an old run's leftovers.
pub fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir =
        std::env::temp_dir().join(format!("punctual-{tag}-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_punctual")
}

/// A real `punctual serve` process.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub addr: String,
    pub dir: PathBuf,
    /// The extra arguments it was started with (a restart reuses them).
    pub args: Vec<String>,
}

impl Server {
    pub fn spawn(dir: &Path, addr: &str, extra: &[&str]) -> Child {
        Self::spawn_logging(dir, addr, extra, "warn", Stdio::inherit())
    }

    /// Like [`spawn`](Self::spawn), logging at `level` to `stderr`.
    pub fn spawn_logging(
        dir: &Path,
        addr: &str,
        extra: &[&str],
        level: &str,
        stderr: Stdio,
    ) -> Child {
        let mut command = Command::new(bin());
        command.arg("serve");
        // A node on Redis keeps no data of its own.
        if !extra.iter().any(|a| a.starts_with("--redis")) {
            command.arg("--data-dir").arg(dir);
        }
        command
            .args(["--http", addr])
            .args(extra)
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn punctual serve")
    }

    pub async fn start(dir: &Path, extra: &[&str]) -> Server {
        Self::start_logging(dir, extra, "warn", Stdio::inherit()).await
    }

    /// A server that logs at `level` to `stderr` (a file, for a test that reads the log).
    pub async fn start_logging(dir: &Path, extra: &[&str], level: &str, stderr: Stdio) -> Server {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Self::spawn_logging(dir, &addr, extra, level, stderr);
        let server = Server {
            child,
            url: format!("http://{addr}"),
            addr,
            dir: dir.to_owned(),
            args: extra.iter().map(|a| a.to_string()).collect(),
        };
        server.wait_healthy().await;
        server
    }

    pub async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "server did not become healthy");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub async fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = Self::spawn(&self.dir, &self.addr, &args);
        self.wait_healthy().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// xorshift64*: small, seeded, reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn from_env_or_time() -> Rng {
        let seed = std::env::var("PUNCTUAL_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("seed: PUNCTUAL_TEST_SEED={seed}");
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
