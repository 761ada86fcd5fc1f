//! Keyspace events: a fired key is published as Redis publishes an expired key, but on time, kept
//! while nobody listens, and given to one subscriber of each group.
//!
//! For each database a *hub* long-polls the database's queue (`db<N>`): the timer fires a key, the
//! same commit leases it to the hub, and the hub hands the event to one member of every group whose
//! subscription matches, through that member's outbound queue. Then one commit acks the fired keys
//! and, for events no connected subscriber could take, keeps a ready task in the database's backlog
//! queue (`db<N>.expired`). A *drainer* hands the backlog out whenever a subscriber is connected.
//!
//! A group is, by default, one distinct subscription (an exact channel, or a pattern) together with
//! the connection's AUTH user, and its members are the connections holding it; in broadcast mode
//! every connection is a group of its own, as in Redis.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, watch};

use super::glob;
use crate::service::{ReserveRequest, Service};

/// Most fired keys one hub round leases.
const HUB_BATCH: usize = 1000;
/// How long a hub's long-poll waits before asking again.
const HUB_WAIT_MS: u64 = 30_000;
/// The lease a hub takes on a fired key or a waiting event; a crash before the ack commit hands the
/// key out again after a restart (the lease is not durable), or after this long.
const HUB_LEASE_MS: u64 = 10_000;
/// How long a waiting event that no connected subscriber matched stays away before it is tried again.
const BACKLOG_RETRY_MS: u64 = 1_000;

/// The settings of the events of the Redis front end.
#[derive(Debug, Clone)]
pub struct EventOptions {
    /// `SELECT` accepts `0..databases`; each database has its queue and hub.
    pub databases: u32,
    /// Queue name of database `N` is `<prefix><N>`; its backlog `<prefix><N>.expired`.
    pub queue_prefix: String,
    /// Every subscriber gets every event (Redis's behaviour) instead of one per group.
    pub broadcast: bool,
    /// Most events kept waiting per database; past it new ones are dropped (and counted).
    pub max_waiting: u64,
    /// A waiting event older than this is dropped when it is next handed out (and counted).
    pub retention_ms: u64,
    /// Events queued for one connection before it counts as full (the next member gets them).
    pub connection_queue: usize,
    /// The initial `notify-keyspace-events`.
    pub notify: String,
}

impl Default for EventOptions {
    fn default() -> Self {
        EventOptions {
            databases: 16,
            queue_prefix: "db".into(),
            broadcast: false,
            max_waiting: 1_000_000,
            retention_ms: 24 * 3600 * 1000,
            connection_queue: 65_536,
            notify: "xE".into(),
        }
    }
}

/// A subscription's group: who shares its events.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    user: Option<String>,
    pattern: bool,
    subscription: Vec<u8>,
    /// Broadcast mode: the connection alone.
    conn: Option<u64>,
}

/// One message for one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub group: GroupKey,
    pub db: u32,
    pub key: String,
    pub channel: Vec<u8>,
    /// For a pattern subscription: `pmessage` with this pattern.
    pub pattern: Option<Vec<u8>>,
    pub message: Vec<u8>,
}

struct Member {
    tx: mpsc::Sender<Delivery>,
    user: Option<String>,
    channels: Vec<Vec<u8>>,
    patterns: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Inner {
    members: BTreeMap<u64, Member>,
    /// Whose turn it is in each group.
    turns: HashMap<GroupKey, usize>,
}

/// The keyspace-notification classes of `notify-keyspace-events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(u16);

/// Class letters in Redis's order; `A` stands for the first ten.
const CLASSES: &[u8] = b"g$lshzxetd";
const NEW: u16 = 1 << 10;
const KEYSPACE: u16 = 1 << 11;
const KEYEVENT: u16 = 1 << 12;
const MISS: u16 = 1 << 13;
const ALL: u16 = (1 << 10) - 1;
const EXPIRED: u16 = 1 << 6;

impl Flags {
    /// Parses a `notify-keyspace-events` value; `None` for a character Redis refuses.
    pub fn parse(text: &[u8]) -> Option<Flags> {
        let mut flags = 0u16;
        for &c in text {
            flags |= match c {
                b'A' => ALL,
                b'n' => NEW,
                b'K' => KEYSPACE,
                b'E' => KEYEVENT,
                b'm' => MISS,
                c => 1 << CLASSES.iter().position(|&k| k == c)?,
            };
        }
        Some(Flags(flags))
    }

    /// The value as `CONFIG GET` shows it: classes in Redis's order (or `A`), then `n`, `K`, `E`, `m`.
    pub fn normalised(self) -> String {
        let mut out = String::new();
        if self.0 & ALL == ALL {
            out.push('A');
        } else {
            for (i, &c) in CLASSES.iter().enumerate() {
                if self.0 & (1 << i) != 0 {
                    out.push(c as char);
                }
            }
        }
        for (bit, c) in [(NEW, 'n'), (KEYSPACE, 'K'), (KEYEVENT, 'E'), (MISS, 'm')] {
            if self.0 & bit != 0 {
                out.push(c);
            }
        }
        out
    }

    fn keyspace_expired(self) -> bool {
        self.0 & EXPIRED != 0 && self.0 & KEYSPACE != 0
    }

    fn keyevent_expired(self) -> bool {
        self.0 & EXPIRED != 0 && self.0 & KEYEVENT != 0
    }
}

/// The events of every database: subscribers, groups, hubs and backlogs.
pub struct Events {
    service: Arc<Service>,
    pub options: EventOptions,
    inner: Mutex<Inner>,
    flags: Mutex<Flags>,
    /// Woken when a subscription is added, so drainers look at their backlog at once.
    subscribed: Notify,
    /// Events waiting in each database's backlog, as this node counts them.
    waiting: Vec<AtomicI64>,
}

/// The metric of events dropped, by database and reason (`full`, `retention`).
pub const DROPPED: &str = "punctual_resp_events_dropped_total";
/// The metric of events handed to subscribers, by database.
pub const PUBLISHED: &str = "punctual_resp_events_published_total";

impl Events {
    pub fn new(service: Arc<Service>, options: EventOptions) -> Arc<Events> {
        let flags = Flags::parse(options.notify.as_bytes()).unwrap_or(Flags(EXPIRED | KEYEVENT));
        let waiting = (0..options.databases).map(|_| AtomicI64::new(0)).collect();
        Arc::new(Events {
            service,
            options,
            inner: Mutex::new(Inner::default()),
            flags: Mutex::new(flags),
            subscribed: Notify::new(),
            waiting,
        })
    }

    pub fn queue(&self, db: u32) -> String {
        format!("{}{db}", self.options.queue_prefix)
    }

    pub fn backlog(&self, db: u32) -> String {
        format!("{}{db}.expired", self.options.queue_prefix)
    }

    pub fn flags(&self) -> Flags {
        *self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_flags(&self, flags: Flags) {
        *self.flags.lock().unwrap_or_else(|p| p.into_inner()) = flags;
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers connection `conn`'s outbound queue (once, at its first subscription).
    pub fn join(&self, conn: u64, tx: mpsc::Sender<Delivery>, user: Option<String>) {
        self.inner().members.entry(conn).or_insert(Member {
            tx,
            user,
            channels: Vec::new(),
            patterns: Vec::new(),
        });
    }

    /// Sets the connection's subscriptions (after each (P)(UN)SUBSCRIBE).
    pub fn subscriptions(&self, conn: u64, channels: &[Vec<u8>], patterns: &[Vec<u8>]) {
        let added = {
            let mut inner = self.inner();
            let Some(member) = inner.members.get_mut(&conn) else {
                return;
            };
            let added =
                channels.len() + patterns.len() > member.channels.len() + member.patterns.len();
            member.channels = channels.to_vec();
            member.patterns = patterns.to_vec();
            added
        };
        if added {
            self.subscribed.notify_waiters();
        }
    }

    /// Removes a closed connection; what was queued for it and not written goes to other members
    /// of its groups, or back to the backlog.
    pub fn leave(self: &Arc<Self>, conn: u64, unsent: Vec<Delivery>) {
        self.inner().members.remove(&conn);
        self.give_back(unsent);
    }

    /// Deliveries a connection will not write (it closed, or no longer holds their subscription):
    /// to other members of their groups, or back to the backlog.
    pub fn give_back(self: &Arc<Self>, unsent: Vec<Delivery>) {
        let mut back: Vec<(u32, String)> = Vec::new();
        for delivery in unsent {
            if !self.offer(&delivery.group, std::slice::from_ref(&delivery))
                && !back
                    .iter()
                    .any(|(db, key)| *db == delivery.db && *key == delivery.key)
            {
                back.push((delivery.db, delivery.key));
            }
        }
        if back.is_empty() {
            return;
        }
        let events = self.clone();
        tokio::spawn(async move {
            for (db, key) in back {
                if !events.room(db) {
                    continue;
                }
                let result = events
                    .service
                    .keys_fired(&events.queue(db), &[], &events.backlog(db), &[key])
                    .await;
                if let Err(error) = result {
                    tracing::warn!(db, error = %error.message, "could not keep an event a closed subscriber did not get");
                }
            }
        });
    }

    /// Gives `deliveries` (one group's) to one member of `group`, taking turns; `false` when no
    /// member could take them.
    fn offer(&self, group: &GroupKey, deliveries: &[Delivery]) -> bool {
        let mut inner = self.inner();
        let holders: Vec<u64> = inner
            .members
            .iter()
            .filter(|(id, m)| holds(**id, m, group))
            .map(|(id, _)| *id)
            .collect();
        if holders.is_empty() {
            inner.turns.remove(group);
            return false;
        }
        let turn = *inner.turns.get(group).unwrap_or(&0);
        for step in 0..holders.len() {
            let id = holders[(turn + step) % holders.len()];
            let Some(member) = inner.members.get(&id) else {
                continue;
            };
            let sent = match member.tx.try_reserve_many(deliveries.len()) {
                Ok(permits) => {
                    for (permit, delivery) in permits.zip(deliveries) {
                        permit.send(delivery.clone());
                    }
                    true
                }
                Err(_) => false,
            };
            if sent {
                inner.turns.insert(group.clone(), turn + step + 1);
                return true;
            }
        }
        false
    }

    /// Publishes the expiry of `key` in `db` to every group that matches; `true` when at least
    /// one group took it (or nothing is to be published: the flags are off).
    pub fn publish(&self, db: u32, key: &str) -> bool {
        let flags = self.flags();
        let mut messages: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(2);
        if flags.keyspace_expired() {
            messages.push((
                format!("__keyspace@{db}__:{key}").into_bytes(),
                b"expired".to_vec(),
            ));
        }
        if flags.keyevent_expired() {
            messages.push((
                format!("__keyevent@{db}__:expired").into_bytes(),
                key.as_bytes().to_vec(),
            ));
        }
        if messages.is_empty() {
            return true;
        }
        let mut groups: Vec<(GroupKey, Vec<Delivery>)> = Vec::new();
        {
            let inner = self.inner();
            for (id, member) in &inner.members {
                let subs = member
                    .channels
                    .iter()
                    .map(|c| (false, c))
                    .chain(member.patterns.iter().map(|p| (true, p)));
                for (pattern, sub) in subs {
                    let group = GroupKey {
                        user: member.user.clone(),
                        pattern,
                        subscription: sub.clone(),
                        conn: self.options.broadcast.then_some(*id),
                    };
                    if groups.iter().any(|(g, _)| *g == group) {
                        continue;
                    }
                    let deliveries: Vec<Delivery> = messages
                        .iter()
                        .filter(|(channel, _)| {
                            if pattern {
                                glob::matches(sub, channel)
                            } else {
                                sub == channel
                            }
                        })
                        .map(|(channel, message)| Delivery {
                            group: group.clone(),
                            db,
                            key: key.to_owned(),
                            channel: channel.clone(),
                            pattern: pattern.then(|| sub.clone()),
                            message: message.clone(),
                        })
                        .collect();
                    if !deliveries.is_empty() {
                        groups.push((group, deliveries));
                    }
                }
            }
        }
        let mut taken = false;
        for (group, deliveries) in &groups {
            taken |= self.offer(group, deliveries);
        }
        if taken {
            metrics::counter!(PUBLISHED, "db" => db.to_string()).increment(1);
        }
        taken
    }

    /// Whether any connection subscribes to something that may match `db`'s events.
    fn listened(&self, db: u32) -> bool {
        let keyevent = format!("__keyevent@{db}__:expired").into_bytes();
        let keyspace = format!("__keyspace@{db}__:").into_bytes();
        self.inner().members.values().any(|m| {
            !m.patterns.is_empty()
                || m.channels
                    .iter()
                    .any(|c| *c == keyevent || c.starts_with(&keyspace))
        })
    }

    /// Whether the backlog of `db` has room for one more event; counts a drop when not.
    fn room(&self, db: u32) -> bool {
        let Some(waiting) = self.waiting.get(db as usize) else {
            return false;
        };
        if waiting.load(Ordering::Relaxed) >= self.options.max_waiting as i64 {
            metrics::counter!(DROPPED, "db" => db.to_string(), "reason" => "full").increment(1);
            return false;
        }
        waiting.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Starts a hub and a drainer for every database.
    pub fn start(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for db in 0..self.options.databases {
            tasks.push(tokio::spawn(self.clone().hub(db, shutdown.clone())));
            tasks.push(tokio::spawn(self.clone().drainer(db, shutdown.clone())));
        }
        tasks
    }

    /// Sets the count of `db`'s waiting events from the store (other nodes may have added some).
    async fn count_waiting(&self, db: u32) {
        if let Ok(counts) = self.service.queue(self.backlog(db)).await {
            let n = counts.get(punctual_core::TaskState::Ready)
                + counts.get(punctual_core::TaskState::Scheduled);
            self.waiting[db as usize].store(n as i64, Ordering::Relaxed);
        }
    }

    async fn hub(self: Arc<Self>, db: u32, shutdown: watch::Receiver<bool>) {
        let (queue, backlog) = (self.queue(db), self.backlog(db));
        self.count_waiting(db).await;
        while !*shutdown.borrow() {
            let request = ReserveRequest {
                max: Some(HUB_BATCH),
                wait_ms: Some(HUB_WAIT_MS),
                lease_ms: Some(HUB_LEASE_MS),
            };
            let fired = match self.service.reserve(&queue, request).await {
                Ok(fired) => fired,
                Err(error) => {
                    tracing::warn!(db, error = %error.message, "the keyspace hub could not take fired keys; trying again in 1 s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            if fired.is_empty() {
                continue;
            }
            let mut leases = Vec::with_capacity(fired.len());
            let mut waiting = Vec::new();
            for task in &fired {
                let token = task
                    .lease
                    .as_ref()
                    .map(|l| l.token.clone())
                    .unwrap_or_default();
                leases.push((task.id.clone(), token));
                if !self.publish(db, &task.id) && self.room(db) {
                    waiting.push(task.id.clone());
                }
            }
            if let Err(error) = self
                .service
                .keys_fired(&queue, &leases, &backlog, &waiting)
                .await
            {
                tracing::warn!(db, error = %error.message, "could not record fired keys; they fire again when their leases end");
            }
        }
    }

    async fn drainer(self: Arc<Self>, db: u32, mut shutdown: watch::Receiver<bool>) {
        let backlog = self.backlog(db);
        while !*shutdown.borrow() {
            // While someone listens, long-poll the backlog: on a shared store another node may
            // have kept events there that this node's subscribers can take.
            if !self.listened(db) {
                tokio::select! {
                    () = self.subscribed.notified() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let request = ReserveRequest {
                max: Some(HUB_BATCH),
                wait_ms: Some(1_000),
                lease_ms: Some(HUB_LEASE_MS),
            };
            let events = match self.service.reserve(&backlog, request).await {
                Ok(events) => events,
                Err(error) => {
                    tracing::warn!(db, error = %error.message, "could not read waiting events; trying again in 1 s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            if events.is_empty() {
                // Nothing ready (others may be waiting out a retry): count again from the store.
                self.count_waiting(db).await;
                continue;
            }
            let now_ms = self.service.clock.now_ms();
            let (mut delivered, mut back) = (Vec::new(), Vec::new());
            for event in &events {
                let token = event
                    .lease
                    .as_ref()
                    .map(|l| l.token.clone())
                    .unwrap_or_default();
                let key: String = event
                    .payload
                    .as_deref()
                    .and_then(|p| serde_json::from_str(p).ok())
                    .unwrap_or_default();
                if now_ms.saturating_sub(event.created_at_ms) > self.options.retention_ms {
                    metrics::counter!(DROPPED, "db" => db.to_string(), "reason" => "retention")
                        .increment(1);
                    delivered.push((event.id.clone(), token));
                } else if self.publish(db, &key) {
                    delivered.push((event.id.clone(), token));
                } else {
                    back.push((event.id.clone(), token));
                }
            }
            self.waiting[db as usize].fetch_sub(delivered.len() as i64, Ordering::Relaxed);
            if let Err(error) = self
                .service
                .events_settled(&backlog, &delivered, &back, BACKLOG_RETRY_MS)
                .await
            {
                tracing::warn!(db, error = %error.message, "could not settle waiting events; they are handed out again");
            }
        }
    }
}

impl Delivery {
    /// Whether a connection with these subscriptions still holds the one this delivery is for.
    pub fn held_by(&self, channels: &[Vec<u8>], patterns: &[Vec<u8>]) -> bool {
        let subs = if self.group.pattern {
            patterns
        } else {
            channels
        };
        subs.contains(&self.group.subscription)
    }
}

fn holds(id: u64, member: &Member, group: &GroupKey) -> bool {
    if group.conn.is_some_and(|c| c != id) || member.user != group.user {
        return false;
    }
    let subs = if group.pattern {
        &member.patterns
    } else {
        &member.channels
    };
    subs.contains(&group.subscription)
}

#[cfg(test)]
mod tests {
    use super::Flags;

    #[test]
    fn notify_flags_normalise_as_redis_shows_them() {
        for (given, shown) in [
            ("Ex", "xE"),
            ("Kx", "xK"),
            ("KEx", "xKE"),
            ("KEA", "AKE"),
            ("Egx$", "g$xE"),
            ("", ""),
        ] {
            assert_eq!(
                Flags::parse(given.as_bytes()).unwrap().normalised(),
                shown,
                "{given}"
            );
        }
        assert!(Flags::parse(b"Ex!").is_none());
        assert!(Flags::parse(b"Kx").unwrap().keyspace_expired());
        assert!(!Flags::parse(b"Ex").unwrap().keyspace_expired());
        assert!(!Flags::parse(b"E").unwrap().keyevent_expired());
    }
}
