//! Keyspace events: a fired key is published as Redis publishes an expired key, but on time, kept
//! while nobody listens, and given to one subscriber of each group.
//!
//! For each database a *hub* long-polls the database's queue (`db<N>`): the timer fires a key, the
//! same commit leases it to the hub, and the hub hands the event to one member of every group whose
//! subscription matches, through that member's outbound queue. Then one commit acks the fired keys
//! and keeps a ready task for every group that wanted the event but had no member to take it, in
//! that group's backlog (`db.group.<id>`). A *group drainer* hands a backlog out while the group
//! has a member on this node.
//!
//! A group is, by default, one distinct subscription (an exact channel, or a pattern) together with
//! the connection's AUTH user, and its members are the connections holding it. Groups are
//! remembered: the first subscription of a group writes it to the *registry* (the queue
//! `db.groups`, one live key per group), which every node reads, so each application gets every
//! event once even while all of its subscribers are away, and across restarts. A group no member
//! has held for longer than the retention is forgotten, with its backlog (or at once, with
//! `PUNCTUAL.FORGET`).
//!
//! An event that fires while no known group matches it waits in the database's shared backlog
//! (`db<N>.expired`), and goes to the groups there are when a subscriber comes.
//!
//! In broadcast mode every connection is a group of its own, as in Redis; nothing is registered,
//! and events nobody is connected for wait in the shared backlog.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use punctual_core::TaskState;
use punctual_store::PutWhen;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};

use super::glob;
use crate::error::ApiError;
use crate::service::{KeyOp, ReserveRequest, Service, key_value};

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
    /// Queue name of database `N` is `<prefix><N>`; its shared backlog `<prefix><N>.expired`;
    /// the group registry `<prefix>.groups` and a group's backlog `<prefix>.group.<id>`.
    pub queue_prefix: String,
    /// Every subscriber gets every event (Redis's behaviour) instead of one per group.
    pub broadcast: bool,
    /// Most events kept waiting in one backlog (a group's, or a database's shared one); past it
    /// new ones are dropped (and counted).
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
    /// The groups the registry knows (none in broadcast mode).
    known: HashMap<GroupKey, Known>,
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

/// A group the registry knows: its id (which names its backlog) and when a member was last seen
/// connected, as written to the store.
#[derive(Debug, Clone)]
struct Known {
    id: String,
    last_seen_ms: u64,
    /// A drainer of the group's backlog runs on this node.
    draining: bool,
}

/// A group as the registry keeps it in the store (the value of key `<id>` of `<prefix>.groups`).
#[derive(Debug, Serialize, Deserialize)]
struct GroupRecord {
    user: Option<String>,
    pattern: bool,
    /// The channel or pattern, in hex: a subscription may be any bytes.
    subscription_hex: String,
    last_seen_ms: u64,
}

/// Where an expiry event went.
#[derive(Debug, Default)]
struct Route {
    /// A connected member of some group took it.
    delivered: bool,
    /// Backlogs of known groups that had no member able to take it: keep it there.
    kept: Vec<String>,
}

impl Route {
    /// No group took it or will: it waits in the database's shared backlog for the first.
    fn unclaimed(&self) -> bool {
        !self.delivered && self.kept.is_empty()
    }
}

/// A group's backlog holds `[db, key]`; the shared backlog of a database holds the key alone.
fn group_event(db: u32, key: &str) -> String {
    serde_json::to_string(&(db, key)).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl GroupKey {
    /// The group's stable id: the first 16 hex digits of a SHA-256 of its user and subscription.
    fn id(&self) -> String {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        match &self.user {
            Some(user) => {
                hash.update([1u8]);
                hash.update((user.len() as u64).to_le_bytes());
                hash.update(user.as_bytes());
            }
            None => hash.update([0u8]),
        }
        hash.update([u8::from(self.pattern)]);
        hash.update(&self.subscription);
        hex(&hash.finalize()[..8])
    }

    /// Whether the group can ever receive an expiry event: every pattern may; an exact channel
    /// only if it is a keyevent or keyspace channel of one of the databases.
    fn relevant(&self, databases: u32) -> bool {
        self.pattern
            || (0..databases).any(|db| {
                self.subscription == format!("__keyevent@{db}__:expired").as_bytes()
                    || self
                        .subscription
                        .starts_with(format!("__keyspace@{db}__:").as_bytes())
            })
    }
}

/// One group as `PUNCTUAL.GROUPS` shows it.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub id: String,
    pub user: Option<String>,
    pub pattern: bool,
    pub subscription: Vec<u8>,
    /// Connections of this node holding it.
    pub members_here: usize,
    /// Events waiting in its backlog, as this node counts them.
    pub waiting: i64,
    pub last_seen_ms: u64,
}

/// The events of every database: subscribers, groups, hubs and backlogs.
pub struct Events {
    service: Arc<Service>,
    pub options: EventOptions,
    inner: Mutex<Inner>,
    flags: Mutex<Flags>,
    /// Woken when a subscription is added, so drainers look at their backlog at once.
    subscribed: Notify,
    /// Events waiting in each backlog queue, as this node counts them.
    waiting: Mutex<HashMap<String, i64>>,
    /// Held while the registry is read; true once it has been read.
    registry_read: tokio::sync::Mutex<bool>,
}

/// The metric of events dropped, by backlog queue and reason (`full`, `retention`).
pub const DROPPED: &str = "punctual_resp_events_dropped_total";
/// The metric of events handed to subscribers, by database.
pub const PUBLISHED: &str = "punctual_resp_events_published_total";
/// How often each node reads the group registry again (other nodes may have added groups) and
/// looks for groups to forget.
const REGISTRY_POLL_MS: u64 = 2_000;
/// Most often a group with members here has its `last_seen_ms` written again.
const LAST_SEEN_REFRESH_MS: u64 = 10 * 60 * 1000;

impl Events {
    pub fn new(service: Arc<Service>, options: EventOptions) -> Arc<Events> {
        let flags = Flags::parse(options.notify.as_bytes()).unwrap_or(Flags(EXPIRED | KEYEVENT));
        Arc::new(Events {
            service,
            options,
            inner: Mutex::new(Inner::default()),
            flags: Mutex::new(flags),
            subscribed: Notify::new(),
            waiting: Mutex::new(HashMap::new()),
            registry_read: tokio::sync::Mutex::new(false),
        })
    }

    pub fn queue(&self, db: u32) -> String {
        format!("{}{db}", self.options.queue_prefix)
    }

    /// The shared backlog of `db`: events that fired while no group was known to want them.
    pub fn backlog(&self, db: u32) -> String {
        format!("{}{db}.expired", self.options.queue_prefix)
    }

    /// The group registry: one live key per known group, whose value is its [`GroupRecord`].
    pub fn registry(&self) -> String {
        format!("{}.groups", self.options.queue_prefix)
    }

    /// The backlog of the group `id`: events of any database that fired while it had no member
    /// that could take them.
    pub fn group_backlog(&self, id: &str) -> String {
        format!("{}.group.{id}", self.options.queue_prefix)
    }

    /// Whether groups are remembered (not in broadcast mode, where each connection is a group).
    fn registered(&self) -> bool {
        !self.options.broadcast
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

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Sets the connection's subscriptions (after each (P)(UN)SUBSCRIBE). A group seen for the
    /// first time is registered, durably, so its events are kept for it from now on, also while
    /// none of its members is connected and across restarts.
    pub fn subscriptions(self: &Arc<Self>, conn: u64, channels: &[Vec<u8>], patterns: &[Vec<u8>]) {
        let now_ms = self.service.clock.now_ms();
        let (added, new, drain) = {
            let mut inner = self.inner();
            let Some(member) = inner.members.get_mut(&conn) else {
                return;
            };
            let added =
                channels.len() + patterns.len() > member.channels.len() + member.patterns.len();
            member.channels = channels.to_vec();
            member.patterns = patterns.to_vec();
            let user = member.user.clone();
            let (mut new, mut drain) = (Vec::new(), Vec::new());
            if self.registered() {
                let held = channels
                    .iter()
                    .map(|c| (false, c))
                    .chain(patterns.iter().map(|p| (true, p)));
                for (pattern, sub) in held {
                    let group = GroupKey {
                        user: user.clone(),
                        pattern,
                        subscription: sub.clone(),
                        conn: None,
                    };
                    if !group.relevant(self.options.databases) {
                        continue;
                    }
                    let known = inner.known.entry(group.clone()).or_insert_with(|| {
                        new.push(group.clone());
                        Known {
                            id: group.id(),
                            last_seen_ms: now_ms,
                            draining: false,
                        }
                    });
                    if !known.draining {
                        known.draining = true;
                        drain.push((group, known.id.clone()));
                    }
                }
            }
            (added, new, drain)
        };
        for group in new {
            let events = self.clone();
            tokio::spawn(async move { events.write_group(&group, now_ms).await });
        }
        for (group, id) in drain {
            tokio::spawn(self.clone().group_drainer(group, id));
        }
        if added {
            self.subscribed.notify_waiters();
        }
    }

    /// Writes a group's registry entry.
    async fn write_group(&self, group: &GroupKey, last_seen_ms: u64) {
        let record = GroupRecord {
            user: group.user.clone(),
            pattern: group.pattern,
            subscription_hex: hex(&group.subscription),
            last_seen_ms,
        };
        let result = async {
            let payload = self.service.key_payload(
                serde_json::to_string(&record)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
            let op = KeyOp::Put {
                key: group.id(),
                payload,
                run_at_ms: punctual_core::NEVER_MS,
                when: PutWhen::Always,
                keep_due: false,
            };
            self.service.keys(&self.registry(), &[op]).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(error = %error.message, "could not register a subscriber group; it is tried again at its next subscription");
            self.inner().known.remove(group);
        }
    }

    /// Reads the registry: groups other nodes registered become known here, and `last_seen_ms`
    /// moves to the latest any node wrote.
    ///
    /// On a store of this node alone nobody else writes the registry, so it is read once, at
    /// start: listing a queue's live keys on the embedded store reads its whole cold tier.
    async fn read_registry(&self) -> Result<(), ApiError> {
        let mut read = self.registry_read.lock().await;
        if *read && !self.service.store.shared() {
            return Ok(());
        }
        self.read_registry_pages().await?;
        *read = true;
        Ok(())
    }

    async fn read_registry_pages(&self) -> Result<(), ApiError> {
        let registry = self.registry();
        let mut cursor = None;
        loop {
            let page = self
                .service
                .list(&registry, Some(TaskState::Scheduled), cursor, Some(1000))
                .await?;
            let mut inner = self.inner();
            for task in &page.tasks {
                let Ok(record) = serde_json::from_slice::<GroupRecord>(&key_value(task)) else {
                    tracing::warn!(id = %task.id, "a group registry entry does not parse; ignored");
                    continue;
                };
                let Some(subscription) = unhex(&record.subscription_hex) else {
                    continue;
                };
                let group = GroupKey {
                    user: record.user,
                    pattern: record.pattern,
                    subscription,
                    conn: None,
                };
                let known = inner.known.entry(group).or_insert_with(|| Known {
                    id: task.id.clone(),
                    last_seen_ms: record.last_seen_ms,
                    draining: false,
                });
                known.last_seen_ms = known.last_seen_ms.max(record.last_seen_ms);
            }
            drop(inner);
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// Keeps the registry current: reads it again, writes `last_seen_ms` of groups with members
    /// here, and forgets groups nobody has held for longer than the retention.
    async fn registry_keeper(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        while !*shutdown.borrow() {
            if let Err(error) = self.read_registry().await {
                tracing::warn!(error = %error.message, "could not read the subscriber group registry");
            }
            let now_ms = self.service.clock.now_ms();
            let refresh_ms = LAST_SEEN_REFRESH_MS
                .min(self.options.retention_ms / 4)
                .max(1);
            let (mut refresh, mut forget) = (Vec::new(), Vec::new());
            {
                let mut inner = self.inner();
                let held: Vec<GroupKey> = inner
                    .known
                    .keys()
                    .filter(|g| inner.members.iter().any(|(id, m)| holds(*id, m, g)))
                    .cloned()
                    .collect();
                for (group, known) in inner.known.iter_mut() {
                    if held.contains(group) {
                        if now_ms.saturating_sub(known.last_seen_ms) >= refresh_ms {
                            known.last_seen_ms = now_ms;
                            refresh.push(group.clone());
                        }
                    } else if now_ms.saturating_sub(known.last_seen_ms)
                        > self.options.retention_ms + refresh_ms
                    {
                        forget.push(known.id.clone());
                    }
                }
            }
            for group in refresh {
                self.write_group(&group, now_ms).await;
            }
            for id in forget {
                tracing::info!(group = %id, "forgetting a subscriber group no member has held for longer than the retention");
                if let Err(error) = self.forget(&id).await {
                    tracing::warn!(group = %id, error = %error.message, "could not forget a subscriber group");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(REGISTRY_POLL_MS)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// The known groups, for `PUNCTUAL.GROUPS`.
    pub async fn groups(&self) -> Result<Vec<GroupInfo>, ApiError> {
        self.read_registry().await?;
        let ids: Vec<String> = self.inner().known.values().map(|k| k.id.clone()).collect();
        for id in ids {
            self.count_waiting(&self.group_backlog(&id)).await;
        }
        let inner = self.inner();
        let waiting = self.waiting();
        let mut groups: Vec<GroupInfo> = inner
            .known
            .iter()
            .map(|(group, known)| GroupInfo {
                id: known.id.clone(),
                user: group.user.clone(),
                pattern: group.pattern,
                subscription: group.subscription.clone(),
                members_here: inner
                    .members
                    .iter()
                    .filter(|(id, m)| holds(**id, m, group))
                    .count(),
                waiting: waiting
                    .get(&self.group_backlog(&known.id))
                    .copied()
                    .unwrap_or(0),
                last_seen_ms: known.last_seen_ms,
            })
            .collect();
        groups.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(groups)
    }

    /// Forgets group `id`: its registry entry and the events waiting for it. `false` when no such
    /// group is known. A member that subscribes again registers it anew.
    pub async fn forget(&self, id: &str) -> Result<bool, ApiError> {
        self.read_registry().await?;
        let found = {
            let mut inner = self.inner();
            let before = inner.known.len();
            inner.known.retain(|_, known| known.id != id);
            before != inner.known.len()
        };
        if !found {
            return Ok(false);
        }
        self.service
            .keys(&self.registry(), &[KeyOp::Delete { key: id.to_owned() }])
            .await?;
        let backlog = self.group_backlog(id);
        loop {
            let page = self.service.list(&backlog, None, None, Some(1000)).await?;
            let ids: Vec<String> = page
                .tasks
                .into_iter()
                .filter(|t| t.state != TaskState::Leased)
                .map(|t| t.id)
                .collect();
            if ids.is_empty() {
                break;
            }
            if self.service.cancel_many(&backlog, ids).await? == 0 {
                break;
            }
        }
        self.waiting().remove(&backlog);
        Ok(true)
    }

    /// Removes a closed connection; what was queued for it and not written goes to other members
    /// of its groups, or back to a backlog.
    pub fn leave(self: &Arc<Self>, conn: u64, unsent: Vec<Delivery>) {
        self.inner().members.remove(&conn);
        self.give_back(unsent);
    }

    /// Deliveries a connection will not write (it closed, or no longer holds their subscription):
    /// to other members of their groups, else to the group's backlog (or, for a group the
    /// registry does not keep, the database's shared backlog).
    pub fn give_back(self: &Arc<Self>, unsent: Vec<Delivery>) {
        let mut back: Vec<(String, String)> = Vec::new();
        for delivery in unsent {
            if self.offer(&delivery.group, std::slice::from_ref(&delivery)) {
                continue;
            }
            let known = self
                .inner()
                .known
                .get(&delivery.group)
                .map(|k| k.id.clone());
            let kept = match known {
                Some(id) => (
                    self.group_backlog(&id),
                    group_event(delivery.db, &delivery.key),
                ),
                None => (
                    self.backlog(delivery.db),
                    serde_json::to_string(&delivery.key).unwrap_or_default(),
                ),
            };
            // A key's two frames (keyspace and keyevent) are one event.
            if !back.contains(&kept) {
                back.push(kept);
            }
        }
        back.retain(|(backlog, _)| self.room(backlog));
        if back.is_empty() {
            return;
        }
        let events = self.clone();
        tokio::spawn(async move {
            if let Err(error) = events.service.keys_fired("", &[], &back).await {
                tracing::warn!(error = %error.message, "could not keep events a closed subscriber did not get");
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

    /// The frames of `key`'s expiry in `db` under the current flags: `(channel, message)`.
    fn messages(&self, db: u32, key: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let flags = self.flags();
        let mut messages = Vec::with_capacity(2);
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
        messages
    }

    /// What `group` receives of an event whose frames are `messages`.
    fn deliveries(
        group: &GroupKey,
        db: u32,
        key: &str,
        messages: &[(Vec<u8>, Vec<u8>)],
    ) -> Vec<Delivery> {
        messages
            .iter()
            .filter(|(channel, _)| {
                if group.pattern {
                    glob::matches(&group.subscription, channel)
                } else {
                    group.subscription == *channel
                }
            })
            .map(|(channel, message)| Delivery {
                group: group.clone(),
                db,
                key: key.to_owned(),
                channel: channel.clone(),
                pattern: group.pattern.then(|| group.subscription.clone()),
                message: message.clone(),
            })
            .collect()
    }

    /// Publishes the expiry of `key` in `db`: to one connected member of every group that matches,
    /// and into the backlog of every known group that matches but has no member able to take it.
    fn route(&self, db: u32, key: &str) -> Route {
        let messages = self.messages(db, key);
        if messages.is_empty() {
            // Nothing is to be published (the flags are off): the event is settled.
            return Route {
                delivered: true,
                kept: Vec::new(),
            };
        }
        let mut groups: Vec<(GroupKey, Vec<Delivery>)> = Vec::new();
        let mut absent: Vec<String> = Vec::new();
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
                    let deliveries = Self::deliveries(&group, db, key, &messages);
                    if !deliveries.is_empty() {
                        groups.push((group, deliveries));
                    }
                }
            }
            for (group, known) in &inner.known {
                if !groups.iter().any(|(g, _)| g == group)
                    && !Self::deliveries(group, db, key, &messages).is_empty()
                {
                    absent.push(self.group_backlog(&known.id));
                }
            }
        }
        let mut route = Route {
            delivered: false,
            kept: absent,
        };
        for (group, deliveries) in &groups {
            if self.offer(group, deliveries) {
                route.delivered = true;
            } else if let Some(known) = self.inner().known.get(group) {
                route.kept.push(self.group_backlog(&known.id));
            }
        }
        if route.delivered {
            metrics::counter!(PUBLISHED, "db" => db.to_string()).increment(1);
        }
        route
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

    /// Whether `backlog` has room for one more event; counts a drop when not.
    fn room(&self, backlog: &str) -> bool {
        let mut waiting = self.waiting();
        let n = waiting.entry(backlog.to_owned()).or_insert(0);
        if *n >= self.options.max_waiting as i64 {
            metrics::counter!(DROPPED, "backlog" => backlog.to_owned(), "reason" => "full")
                .increment(1);
            return false;
        }
        *n += 1;
        true
    }

    /// `n` events left `backlog`.
    fn taken(&self, backlog: &str, n: usize) {
        if let Some(waiting) = self.waiting().get_mut(backlog) {
            *waiting = (*waiting - n as i64).max(0);
        }
    }

    /// Starts a hub and a drainer of the shared backlog for every database, and the registry's
    /// keeper.
    pub fn start(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for db in 0..self.options.databases {
            tasks.push(tokio::spawn(self.clone().hub(db, shutdown.clone())));
            tasks.push(tokio::spawn(self.clone().drainer(db, shutdown.clone())));
        }
        if self.registered() {
            tasks.push(tokio::spawn(self.clone().registry_keeper(shutdown)));
        }
        tasks
    }

    /// Sets the count of a backlog's waiting events from the store (other nodes may have added
    /// some).
    async fn count_waiting(&self, backlog: &str) {
        if let Ok(counts) = self.service.queue(backlog.to_owned()).await {
            let n = counts.get(TaskState::Ready) + counts.get(TaskState::Scheduled);
            self.waiting().insert(backlog.to_owned(), n as i64);
        }
    }

    async fn hub(self: Arc<Self>, db: u32, shutdown: watch::Receiver<bool>) {
        let (queue, backlog) = (self.queue(db), self.backlog(db));
        self.count_waiting(&backlog).await;
        if self.registered() {
            // Before the first event: know the groups that were registered before a restart.
            if let Err(error) = self.read_registry().await {
                tracing::warn!(db, error = %error.message, "could not read the subscriber group registry");
            }
        }
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
            let mut kept = Vec::new();
            for task in &fired {
                let token = task
                    .lease
                    .as_ref()
                    .map(|l| l.token.clone())
                    .unwrap_or_default();
                leases.push((task.id.clone(), token));
                let route = self.route(db, &task.id);
                if route.unclaimed() {
                    if self.room(&backlog) {
                        kept.push((
                            backlog.clone(),
                            serde_json::to_string(&task.id).unwrap_or_default(),
                        ));
                    }
                } else {
                    for group_backlog in route.kept {
                        if self.room(&group_backlog) {
                            kept.push((group_backlog, group_event(db, &task.id)));
                        }
                    }
                }
            }
            if let Err(error) = self.service.keys_fired(&queue, &leases, &kept).await {
                tracing::warn!(db, error = %error.message, "could not record fired keys; they fire again when their leases end");
            }
        }
    }

    /// Drains the shared backlog of `db` (events that fired while no group was known to want
    /// them) to the groups there are when it is drained.
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
            let Some(events) = self.take_waiting(&backlog).await else {
                continue;
            };
            let now_ms = self.service.clock.now_ms();
            let mut settle = Settle::default();
            for (id, token, payload, created_at_ms) in events {
                let key: String = serde_json::from_str(&payload).unwrap_or_default();
                if self.expired(&backlog, now_ms, created_at_ms) {
                    settle.delivered.push((id, token));
                    continue;
                }
                let route = self.route(db, &key);
                if route.unclaimed() {
                    settle.back.push((id, token));
                    continue;
                }
                settle.delivered.push((id, token));
                for group_backlog in route.kept {
                    if self.room(&group_backlog) {
                        settle.kept.push((group_backlog, group_event(db, &key)));
                    }
                }
            }
            self.settle(&backlog, settle).await;
        }
    }

    /// Drains group `group`'s backlog to its members while it has one on this node.
    async fn group_drainer(self: Arc<Self>, group: GroupKey, id: String) {
        let backlog = self.group_backlog(&id);
        self.count_waiting(&backlog).await;
        loop {
            {
                let mut inner = self.inner();
                let held = inner
                    .members
                    .iter()
                    .any(|(m, member)| holds(*m, member, &group));
                if !held || *self.service.shutdown.borrow() {
                    if let Some(known) = inner.known.get_mut(&group) {
                        known.draining = false;
                    }
                    return;
                }
            }
            let Some(events) = self.take_waiting(&backlog).await else {
                continue;
            };
            let now_ms = self.service.clock.now_ms();
            let mut settle = Settle::default();
            for (event_id, token, payload, created_at_ms) in events {
                let Ok((db, key)) = serde_json::from_str::<(u32, String)>(&payload) else {
                    settle.delivered.push((event_id, token));
                    continue;
                };
                if self.expired(&backlog, now_ms, created_at_ms) {
                    settle.delivered.push((event_id, token));
                    continue;
                }
                let deliveries = Self::deliveries(&group, db, &key, &self.messages(db, &key));
                // Nothing to deliver under today's flags, or handed to a member: settled.
                if deliveries.is_empty() || self.offer(&group, &deliveries) {
                    if !deliveries.is_empty() {
                        metrics::counter!(PUBLISHED, "db" => db.to_string()).increment(1);
                    }
                    settle.delivered.push((event_id, token));
                } else {
                    settle.back.push((event_id, token));
                }
            }
            self.settle(&backlog, settle).await;
        }
    }

    /// Leases a page of a backlog's waiting events, long-polling for a second: `(id, token,
    /// payload, created_at_ms)` each; `None` when there were none (or on an error, after a pause).
    async fn take_waiting(&self, backlog: &str) -> Option<Vec<(String, String, String, u64)>> {
        let request = ReserveRequest {
            max: Some(HUB_BATCH),
            wait_ms: Some(1_000),
            lease_ms: Some(HUB_LEASE_MS),
        };
        match self.service.reserve(backlog, request).await {
            Ok(events) if events.is_empty() => {
                // Nothing ready (others may be waiting out a retry): count again from the store.
                self.count_waiting(backlog).await;
                None
            }
            Ok(events) => Some(
                events
                    .into_iter()
                    .map(|e| {
                        let token = e.lease.map(|l| l.token).unwrap_or_default();
                        (e.id, token, e.payload.unwrap_or_default(), e.created_at_ms)
                    })
                    .collect(),
            ),
            Err(error) => {
                tracing::warn!(backlog, error = %error.message, "could not read waiting events; trying again in 1 s");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                None
            }
        }
    }

    /// Whether a waiting event is past the retention; counts the drop.
    fn expired(&self, backlog: &str, now_ms: u64, created_at_ms: u64) -> bool {
        let expired = now_ms.saturating_sub(created_at_ms) > self.options.retention_ms;
        if expired {
            metrics::counter!(DROPPED, "backlog" => backlog.to_owned(), "reason" => "retention")
                .increment(1);
        }
        expired
    }

    async fn settle(&self, backlog: &str, settle: Settle) {
        self.taken(backlog, settle.delivered.len());
        if let Err(error) = self
            .service
            .events_settled(
                backlog,
                &settle.delivered,
                &settle.back,
                BACKLOG_RETRY_MS,
                &settle.kept,
            )
            .await
        {
            tracing::warn!(backlog, error = %error.message, "could not settle waiting events; they are handed out again");
        }
    }
}

/// What a drainer does with the events it leased, in one commit.
#[derive(Default)]
struct Settle {
    /// Handed out (or dropped): acked.
    delivered: Vec<(String, String)>,
    /// Nobody could take them: back, due again after [`BACKLOG_RETRY_MS`].
    back: Vec<(String, String)>,
    /// Copies for the backlogs of groups that were away: `(backlog, payload)`.
    kept: Vec<(String, String)>,
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
