//! Wake-ups for long-polling reserves, one `Notify` per queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Per-queue notifications that ready tasks arrived. Entries are created by the first reserve on a
/// queue and kept (one small allocation per queue name ever reserved from).
#[derive(Debug, Default)]
pub struct Waiters {
    queues: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Waiters {
    pub fn get(&self, queue: &str) -> Arc<Notify> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.entry(queue.to_owned()).or_default().clone()
    }

    /// Wakes every reserve waiting on `queue`.
    pub fn wake(&self, queue: &str) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(notify) = queues.get(queue) {
            notify.notify_waiters();
        }
    }
}
