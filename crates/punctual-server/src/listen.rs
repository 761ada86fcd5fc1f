//! The HTTP listener: accepts connections up to a cap, serves each with hyper's HTTP/1, and closes
//! those that are idle or that send their request head too slowly.
//!
//! `axum::serve` has no timeouts and no connection cap, so a few thousand idle or slowloris sockets
//! could exhaust the process's file descriptors and lock every other client out. Here:
//! - a connection waiting for a request may stay idle for `idle_timeout_ms`;
//! - once its first byte arrives, the request head must be complete within `header_read_timeout_ms`;
//! - the body has `body_read_timeout_ms` (enforced where handlers read it, `api::read_body`);
//! - past `max_connections`, a new connection is answered `503` with `Connection: close` at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connection limits, each a named setting (docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// From a request's first byte to the end of its head.
    pub header_read_timeout_ms: u64,
    /// From the start of the body to its last byte.
    pub body_read_timeout_ms: u64,
    /// How long a connection may wait for its next request.
    pub idle_timeout_ms: u64,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
        }
    }
}

/// Where a connection is in its request cycle, as its timeouts see it.
const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// Shared by a connection's socket wrapper (which sees bytes) and its service (which sees requests):
/// the phase in the low two bits, and above them a count of phase changes, so the wrapper can tell
/// that a connection went through a whole request (idle → head → busy → idle) since it last looked
/// and re-arms its deadline. (Without the count, a connection in steady use kept its first idle
/// deadline and was closed between two requests after `idle_timeout_ms`.)
struct Phase(AtomicU64);

impl Phase {
    fn new() -> Phase {
        Phase(AtomicU64::new(u64::from(IDLE)))
    }

    /// The phase and the whole state word it came from.
    fn load(&self) -> (u8, u64) {
        let word = self.0.load(Ordering::Acquire);
        ((word & 3) as u8, word)
    }

    fn set(&self, phase: u8) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                Some((((word >> 2) + 1) << 2) | u64::from(phase))
            });
    }

    /// Idle → head, when a request's first byte arrives; no change in any other phase.
    fn head_started(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                ((word & 3) as u8 == IDLE).then_some((((word >> 2) + 1) << 2) | u64::from(HEAD))
            });
    }
}

/// The accepted socket, with the idle and head deadlines.
struct TimedIo {
    stream: TcpStream,
    phase: Arc<Phase>,
    limits: Arc<ConnLimits>,
    /// The deadline of the current phase, when it has one.
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The phase word `sleep` was armed for (any change re-arms it).
    armed: Option<u64>,
}

impl TimedIo {
    fn new(stream: TcpStream, phase: Arc<Phase>, limits: Arc<ConnLimits>) -> TimedIo {
        let idle = Duration::from_millis(limits.idle_timeout_ms);
        TimedIo {
            stream,
            phase,
            limits,
            sleep: Box::pin(tokio::time::sleep(idle)),
            armed: Some(u64::from(IDLE)),
        }
    }

    fn arm(&mut self, phase: u8, word: u64) {
        let after_ms = match phase {
            IDLE => self.limits.idle_timeout_ms,
            HEAD => self.limits.header_read_timeout_ms,
            _ => {
                self.armed = None;
                return;
            }
        };
        #[allow(clippy::disallowed_methods)] // A connection timeout, not task time.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(after_ms);
        self.sleep.as_mut().reset(deadline);
        self.armed = Some(word);
    }

    /// Fails the read when the phase's deadline has passed.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let (phase, word) = self.phase.load();
        if phase == BUSY {
            self.armed = None;
            return Ok(());
        }
        if self.armed != Some(word) {
            self.arm(phase, word);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            let what = if phase == IDLE {
                // Closing a quiet keep-alive connection is routine.
                tracing::debug!("closing an idle connection");
                "idle connection"
            } else {
                let limit_ms = self.limits.header_read_timeout_ms;
                HEAD_TIMEOUT_LOG.hit(crate::Clock.now_ms(), |n| {
                    tracing::warn!(
                        header_read_timeout_ms = limit_ms,
                        closed = n,
                        "closed connections whose request head did not arrive in time"
                    )
                });
                "request head not received in time"
            };
            return Err(io::Error::new(io::ErrorKind::TimedOut, what));
        }
        Ok(())
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    // The first byte of a request starts the head's deadline.
                    self.phase.head_started();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                self.check_deadline(cx)?;
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Marks the connection busy while a request is served, idle again once its response is ready.
#[derive(Clone)]
struct PhaseService {
    router: Router,
    phase: Arc<Phase>,
}

impl tower::Service<hyper::Request<hyper::body::Incoming>> for PhaseService {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<axum::response::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        self.phase.set(BUSY);
        let phase = self.phase.clone();
        let mut router = self.router.clone();
        Box::pin(async move {
            let response =
                tower::Service::call(&mut router, request.map(axum::body::Body::new)).await;
            phase.set(IDLE);
            response
        })
    }
}

/// Logs a hit limit at most once per 10 s (with how many times it was hit), so a flood does not
/// flood the log too.
pub(crate) struct RateLimitedLog {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    const fn new() -> Self {
        RateLimitedLog {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    pub(crate) fn hit(&self, now_ms: u64, log: impl FnOnce(u64)) {
        let last = self.last_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= 10_000
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log(self.suppressed.swap(0, Ordering::Relaxed) + 1);
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

static CAP_LOG: RateLimitedLog = RateLimitedLog::new();
static HEAD_TIMEOUT_LOG: RateLimitedLog = RateLimitedLog::new();
/// Bodies that did not arrive within the body-read timeout (logged by `api::read_body`).
pub(crate) static BODY_TIMEOUT_LOG: RateLimitedLog = RateLimitedLog::new();

/// The answer to a connection past the cap: a complete response, then close.
fn over_cap_response(max: usize) -> Vec<u8> {
    let body = format!(
        "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"the server already serves its \
         maximum of {max} connections (--max-connections); retry shortly\"}}}}"
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting and gives open
/// connections up to `grace` to finish.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    clock: crate::Clock,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let over_cap = Arc::new(over_cap_response(limits.max_connections));
    let accept_errors = RateLimitedLog::new();
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and the like: log (rarely) and back off instead of spinning.
                    accept_errors.hit(clock.now_ms(), |n| {
                        tracing::warn!(%error, times = n, "cannot accept a connection")
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let max = limits.max_connections;
            CAP_LOG.hit(clock.now_ms(), |n| {
                tracing::warn!(
                    max_connections = max,
                    refused = n,
                    "connection limit reached: new connections are answered 503"
                )
            });
            let answer = over_cap.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = stream.write_all(&answer).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
            continue;
        };
        let phase = Arc::new(Phase::new());
        let io = TimedIo::new(stream, phase.clone(), limits.clone());
        let service = hyper_util::service::TowerToHyperService::new(PhaseService {
            router: router.clone(),
            phase,
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // The head deadline is TimedIo's (hyper's own would also count idle time).
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace; closing them");
    }
    Ok(())
}

/// Raises this process's soft limit on open files to its hard limit, so the connection cap (not the
/// default soft limit of 1024) decides how many clients fit. Returns the limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_cap_answer_is_complete_http() {
        let text = String::from_utf8(over_cap_response(7)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }

    #[test]
    fn a_hit_limit_is_logged_once_per_ten_seconds() {
        let log = RateLimitedLog::new();
        let mut logged = Vec::new();
        for now_ms in [10_000, 10_001, 15_000, 20_000, 20_001] {
            log.hit(now_ms, |n| logged.push((now_ms, n)));
        }
        assert_eq!(logged, [(10_000, 1), (20_000, 3)]);
    }
}
