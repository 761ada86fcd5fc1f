//! Progress bars on stderr while the bench runs: redrawn in place on a terminal, one line per finished
//! step otherwise (so a log shows what ran and how long it took).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Inner {
    label: String,
    total: u64,
    done: AtomicU64,
    finished: AtomicBool,
    started: Instant,
}

impl Inner {
    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed).min(self.total);
        let share = if self.total == 0 {
            1.0
        } else {
            done as f64 / self.total as f64
        };
        let filled = (share * 30.0).round() as usize;
        format!(
            "{:<44} [{}{}] {:>3.0}% {done}/{} {:.1} s",
            self.label,
            "#".repeat(filled),
            " ".repeat(30 - filled),
            share * 100.0,
            self.total,
            self.started.elapsed().as_secs_f64()
        )
    }
}

/// A counter shown as a bar until it is finished or dropped.
#[derive(Clone)]
pub struct Bar(Arc<Inner>);

impl Bar {
    pub fn new(label: impl Into<String>, total: u64) -> Bar {
        let inner = Arc::new(Inner {
            label: label.into(),
            total,
            done: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            started: Instant::now(),
        });
        if std::io::stderr().is_terminal() {
            let ticking = Arc::downgrade(&inner);
            tokio::spawn(async move {
                while let Some(bar) = ticking.upgrade() {
                    if bar.finished.load(Ordering::Relaxed) {
                        break;
                    }
                    eprint!("\r{}", bar.line());
                    let _ = std::io::stderr().flush();
                    drop(bar);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        Bar(inner)
    }

    pub fn add(&self, n: u64) {
        self.0.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Prints the final state once; later calls do nothing.
    pub fn finish(&self) {
        if !self.0.finished.swap(true, Ordering::Relaxed) {
            let clear = if std::io::stderr().is_terminal() {
                "\r"
            } else {
                ""
            };
            eprintln!("{clear}{}", self.0.line());
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle of a bar nobody finished: show where it stopped.
        if !self.finished.load(Ordering::Relaxed) {
            eprintln!("\r{} (stopped)", self.line());
        }
    }
}
