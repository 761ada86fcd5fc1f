//! beanstalkd with its binlog on (`-b`, default fsync policy: never), `put` with a delay in whole
//! seconds, `reserve` + `delete`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::progress::Bar;
use super::subject::{
    Job, Sink, Subject, fan_out, free_port, fresh_dir, job_chunks, now_ms, now_us,
    parse_payload_bytes, rss_bytes, wait_until,
};
use super::{Ctx, System};

/// A minimal beanstalkd client: `put`, `reserve-with-timeout`, `delete` and `stats`.
struct Client {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: &str) -> Result<Client> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        Ok(Client {
            reader: tokio::io::BufReader::new(read),
            writer,
        })
    }

    async fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            bail!("beanstalkd closed the connection");
        }
        Ok(line.trim_end().to_owned())
    }

    async fn body(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut body = vec![0u8; len + 2];
        self.reader.read_exact(&mut body).await?;
        body.truncate(len);
        Ok(body)
    }

    /// Puts every job in one write, then reads every answer (pipelined, as for the others).
    async fn put_many(&mut self, jobs: &[Job]) -> Result<()> {
        let mut out = String::new();
        let now = now_ms();
        for job in jobs {
            // Delays are whole seconds: round up so no job comes early.
            let delay_s = job.due_ms.saturating_sub(now).div_ceil(1000);
            let body = job.payload();
            out.push_str(&format!(
                "put 1024 {delay_s} 60 {}\r\n{body}\r\n",
                body.len()
            ));
        }
        self.writer.write_all(out.as_bytes()).await?;
        for _ in jobs {
            let answer = self.line().await?;
            if !answer.starts_with("INSERTED") {
                bail!("beanstalkd answered {answer:?} to put");
            }
        }
        Ok(())
    }

    async fn reserve(&mut self, timeout_s: u64) -> Result<Option<(String, Vec<u8>)>> {
        self.writer
            .write_all(format!("reserve-with-timeout {timeout_s}\r\n").as_bytes())
            .await?;
        let answer = self.line().await?;
        let mut parts = answer.split_whitespace();
        match parts.next() {
            Some("RESERVED") => {
                let id = parts.next().unwrap_or("").to_owned();
                let len: usize = parts.next().unwrap_or("0").parse()?;
                Ok(Some((id, self.body(len).await?)))
            }
            Some("TIMED_OUT") | Some("DEADLINE_SOON") => Ok(None),
            _ => bail!("beanstalkd answered {answer:?} to reserve"),
        }
    }

    async fn delete(&mut self, id: &str) -> Result<()> {
        self.writer
            .write_all(format!("delete {id}\r\n").as_bytes())
            .await?;
        let answer = self.line().await?;
        if answer != "DELETED" {
            bail!("beanstalkd answered {answer:?} to delete");
        }
        Ok(())
    }

    /// The `stats` YAML as (key, value) lines.
    async fn stats(&mut self) -> Result<Vec<(String, String)>> {
        self.writer.write_all(b"stats\r\n").await?;
        let answer = self.line().await?;
        let len: usize = answer
            .strip_prefix("OK ")
            .context("stats answer without OK")?
            .parse()?;
        let body = String::from_utf8(self.body(len).await?)?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }
}

pub struct Beanstalkd {
    child: Child,
    addr: String,
    port: u16,
    dir: PathBuf,
}

fn spawn(port: u16, dir: &std::path::Path) -> Result<Child> {
    Command::new("beanstalkd")
        .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-b"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting beanstalkd (Debian: apt-get install -y beanstalkd)")
}

impl Subject for Beanstalkd {
    const SYSTEM: System = System::Beanstalkd;

    async fn start(ctx: &Ctx) -> Result<Beanstalkd> {
        let dir = fresh_dir(ctx, "beanstalkd")?;
        let port = free_port()?;
        let server = Beanstalkd {
            child: spawn(port, &dir)?,
            addr: format!("127.0.0.1:{port}"),
            port,
            dir,
        };
        wait_until(Duration::from_secs(10), "beanstalkd", || server.answers()).await?;
        Ok(server)
    }

    async fn schedule(
        &self,
        ctx: &Ctx,
        jobs: Vec<Job>,
        connections: usize,
        bar: &Bar,
    ) -> Result<f64> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(Client::connect(&self.addr).await?);
        }
        let chunks = job_chunks(&jobs, ctx.sizes.batch);
        fan_out(
            chunks,
            clients,
            bar,
            |mut client, (_, chunk): (usize, Vec<Job>)| async move {
                client.put_many(&chunk).await?;
                Ok(client)
            },
        )
        .await
    }

    /// Consumers `reserve` one job at a time (beanstalkd has no batch reserve), then `delete` it.
    async fn consume(
        &self,
        _ctx: &Ctx,
        consumers: usize,
        sink: Arc<Sink>,
        deadline: Instant,
    ) -> Result<()> {
        let mut workers = Vec::new();
        for _ in 0..consumers {
            let mut client = Client::connect(&self.addr).await?;
            let sink = sink.clone();
            workers.push(tokio::spawn(async move {
                while !sink.done() && Instant::now() < deadline {
                    let Some((id, body)) = client.reserve(1).await? else {
                        continue;
                    };
                    let at_us = now_us();
                    if let Some((n, due_ms)) = parse_payload_bytes(&body) {
                        sink.take(n, due_ms, at_us);
                    }
                    client.delete(&id).await?;
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        for worker in workers {
            worker.await??;
        }
        Ok(())
    }

    async fn memory_bytes(&self) -> Result<u64> {
        Ok(rss_bytes(self.child.id()))
    }

    async fn pending(&self) -> Result<u64> {
        let stats = Client::connect(&self.addr).await?.stats().await?;
        Ok(stats
            .iter()
            .filter(|(k, _)| {
                [
                    "current-jobs-ready",
                    "current-jobs-delayed",
                    "current-jobs-reserved",
                ]
                .contains(&k.as_str())
            })
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum())
    }

    async fn kill9_restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port, &self.dir)?;
        Ok(())
    }

    async fn answers(&self) -> bool {
        match Client::connect(&self.addr).await {
            Ok(mut client) => client.stats().await.is_ok(),
            Err(_) => false,
        }
    }

    async fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
