//! Progress bars on stderr while the bench runs, drawn by `indicatif`: redrawn in place on a
//! terminal; elsewhere (a log, CI) one line per finished step, so the log shows what ran and how long
//! it took.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

struct Inner {
    bar: ProgressBar,
    label: String,
}

impl Inner {
    /// The line a log gets for a step: label, count, time.
    fn summary(&self, how: &str) -> String {
        format!(
            "{:<44} {}/{} {:.1} s{how}",
            self.label,
            self.bar.position(),
            self.bar.length().unwrap_or(0),
            self.bar.elapsed().as_secs_f64()
        )
    }
}

/// A counter shown as a bar until it is finished or dropped.
#[derive(Clone)]
pub struct Bar(Arc<Inner>);

impl Bar {
    pub fn new(label: impl Into<String>, total: u64) -> Bar {
        let label = label.into();
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:<44} [{bar:30.cyan/blue}] {percent:>3}% {pos}/{len} {elapsed}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.clone());
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar(Arc::new(Inner { bar, label }))
    }

    pub fn add(&self, n: u64) {
        self.0.bar.inc(n);
    }

    /// Shows the final state once; later calls do nothing.
    pub fn finish(&self) {
        if self.0.bar.is_finished() {
            return;
        }
        self.0.bar.finish();
        if self.0.bar.is_hidden() {
            eprintln!("{}", self.0.summary(""));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle of a bar nobody finished: show where it stopped.
        if !self.bar.is_finished() {
            self.bar.abandon();
            eprintln!("{}", self.summary(" (stopped)"));
        }
    }
}
