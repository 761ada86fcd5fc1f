//! Real `redis-server` processes on free loopback ports, for tests and benchmarks: a standalone server,
//! or a cluster of masters joined with `redis-cli --cluster create`. Each lives in its own temporary
//! directory and is killed when dropped. Nothing here talks to a Redis already running on the machine.

// Start-up deadlines only; this module is test and benchmark support, never server behaviour.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process.
pub struct RedisServer {
    /// The plain-text port (also open on a TLS server, for `cli()` and the start-up check).
    pub port: u16,
    /// The TLS port of a server started with [`RedisServer::start_tls`].
    pub tls_port: Option<u16>,
    /// Where its certificates are (see [`RedisServer::tls_file`]).
    certs: Option<PathBuf>,
    child: Child,
    /// Kills the server if this process dies without dropping it (a server in a `static`, a panic that
    /// aborts): a test run never leaves servers behind.
    watchdog: Child,
    dir: PathBuf,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// A free port a Redis Cluster node can use: its bus listens 10 000 ports higher, at most 65535.
fn server_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 {
            return port;
        }
    }
}

fn unique_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "punctual-redis-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut answer = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && &answer == b"+PONG\r\n"
}

/// A shell loop that waits for this process to end, then kills `pid` and removes `dir`.
fn watchdog(pid: u32, dir: &std::path::Path) -> std::io::Result<Child> {
    let script = format!(
        "while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null; rm -rf '{dir}'",
        parent = std::process::id(),
        dir = dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Runs `openssl` with `args` in `dir`; an error carries what it printed.
fn openssl(dir: &std::path::Path, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run openssl: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Writes a throw-away CA (`ca.crt`) into `dir`, and a server (`server.*`, for 127.0.0.1 and
/// localhost) and a client (`client.*`) certificate it signed, with their keys.
fn make_certificates(dir: &std::path::Path) -> std::io::Result<()> {
    // Extensions make X.509 v3 certificates, the only version rustls (webpki) accepts. Cluster nodes
    // also show their server certificate as clients of each other on the cluster bus.
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=Punctual test CA",
        ],
    )?;
    for who in ["server", "client"] {
        let (key, csr, crt) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
        );
        let subject = format!("/CN=punctual-test-{who}");
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                &subject,
            ],
        )?;
        let ext = format!("{who}.ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        )?;
    }
    Ok(())
}

/// redis-server arguments for TLS with the certificates in `certs` (absolute paths).
fn tls_args(certs: &std::path::Path, client_certificates: bool) -> Vec<String> {
    let file = |name: &str| certs.join(name).display().to_string();
    vec![
        "--tls-cert-file".into(),
        file("server.crt"),
        "--tls-key-file".into(),
        file("server.key"),
        "--tls-ca-cert-file".into(),
        file("ca.crt"),
        "--tls-auth-clients".into(),
        (if client_certificates { "yes" } else { "no" }).into(),
    ]
}

impl RedisServer {
    /// Starts a server with persistence off, plus `extra` arguments (e.g. `--appendonly yes`).
    pub fn start(extra: &[&str]) -> std::io::Result<RedisServer> {
        Self::spawn(unique_dir("server"), None, extra)
    }

    /// Starts a server that also listens for TLS (certificates from a throw-away CA made with the
    /// `openssl` command; see [`RedisServer::tls_file`]). With `client_certificates`, a TLS client must
    /// show a certificate that CA signed.
    pub fn start_tls(client_certificates: bool) -> std::io::Result<RedisServer> {
        let dir = unique_dir("tls");
        make_certificates(&dir)?;
        let args = tls_args(&dir, client_certificates);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(dir.clone(), Some(dir), &args)
    }

    fn spawn(dir: PathBuf, certs: Option<PathBuf>, extra: &[&str]) -> std::io::Result<RedisServer> {
        for _ in 0..5 {
            let port = server_port();
            let tls_port = certs.is_some().then(server_port);
            let mut command = Command::new("redis-server");
            if let Some(tls_port) = tls_port {
                command.args(["--tls-port", &tls_port.to_string()]);
            }
            let mut child = command
                .current_dir(&dir)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot run redis-server: {e}"))
                })?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if ping(port) {
                    let watchdog = watchdog(child.id(), &dir)?;
                    return Ok(RedisServer {
                        port,
                        tls_port,
                        certs,
                        child,
                        watchdog,
                        dir,
                    });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // The port was taken after all: try another.
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(std::io::Error::other("redis-server did not start"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The `rediss://` URL of a server started with [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}/"))
    }

    /// A file made for a TLS server: `ca.crt`, `client.crt`, `client.key`.
    pub fn tls_file(&self, name: &str) -> PathBuf {
        self.certs.as_ref().unwrap_or(&self.dir).join(name)
    }

    /// The server's process id (to read its memory or CPU).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `redis-cli` against this server and answers its output.
    pub fn cli(&self, args: &[&str]) -> std::io::Result<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of masters without replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// The certificates of a TLS cluster, shared by its nodes.
    certs: Option<PathBuf>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> std::io::Result<RedisCluster> {
        Self::start_with(masters, None)
    }

    /// A cluster whose nodes speak TLS to clients and to each other (`tls-cluster yes`, so they
    /// announce their TLS ports), with one throw-away CA; clients need no certificate of their own.
    pub fn start_tls(masters: usize) -> std::io::Result<RedisCluster> {
        let certs = unique_dir("tls-cluster");
        make_certificates(&certs)?;
        Self::start_with(masters, Some(certs))
    }

    fn start_with(masters: usize, certs: Option<PathBuf>) -> std::io::Result<RedisCluster> {
        let mut args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            // Relative to the server's own --dir.
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ]
        .map(String::from)
        .into();
        if let Some(certs) = &certs {
            args.extend(tls_args(certs, false));
            args.extend(["--tls-cluster".into(), "yes".into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut nodes = Vec::new();
        for _ in 0..masters {
            nodes.push(RedisServer::spawn(
                unique_dir("cluster"),
                certs.clone(),
                &args,
            )?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        // redis-cli waits for the nodes to meet with no end of its own: bounded by coreutils' timeout.
        let out = Command::new("timeout")
            .args(["30", "redis-cli", "--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run redis-cli: {e}")))?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "redis-cli --cluster create failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let ok = nodes.iter().all(|n| {
                n.cli(&["cluster", "info"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            if ok {
                return Ok(RedisCluster { nodes, certs });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(std::io::Error::other("the cluster did not become ready"))
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The `rediss://` URLs of a cluster started with [`RedisCluster::start_tls`].
    pub fn tls_urls(&self) -> Vec<String> {
        self.nodes.iter().filter_map(RedisServer::tls_url).collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        if let Some(certs) = &self.certs {
            let _ = std::fs::remove_dir_all(certs);
        }
    }
}
