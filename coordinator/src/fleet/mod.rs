//! The fleet registry: every agent the coordinator is connected to (or was), with its outgoing
//! queue, and what acts on many of them at once — pushes, the offline sweep, operator commands,
//! revocation. One connection's protocol lives in [`crate::link`], which registers here.
//!
//! What happens to agents (a hello, a heartbeat, going offline and coming back) is sent as a
//! [`FleetEvent`] to whoever took the receiver from [`Fleet::new`] (the watcher), without waiting.
//! What of an agent's heartbeat counts, and its texts made safe to show, is [`judge`]'s.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelfleet_protocol::{CoordinatorMessage, Heartbeat, encode};

use crate::rate::Buckets;
use crate::store::{Revocation, Store, StoreError};

mod commands;
mod judge;
mod links;
use commands::Pending;
pub use commands::{COMMAND_TIMEOUT, CommandError};
pub use judge::{Given, MAX_TEXT, clean_text, given, judged};
pub use links::Links;
use links::Live;
use tunnelfleet_protocol::close;

/// What happened to an agent, for the watcher.
#[derive(Debug)]
pub enum FleetEvent {
    /// An agent connected.
    Hello {
        /// The agent that connected.
        agent: String,
        /// Its process start.
        started_unix_ms: u64,
    },
    /// The sweeper marked an agent offline.
    Offline {
        /// The silent agent.
        agent: String,
        /// Heartbeats missed.
        missed: u32,
    },
    /// An offline agent was heard again.
    Online {
        /// The agent heard again.
        agent: String,
    },
    /// An agent got its first SSH certificate: it is onboarding, and the OMAs learn its
    /// principal line at their next `oma sync`.
    FirstSshCert {
        /// The new agent.
        agent: String,
    },
}

/// Hellos one agent id may make in a burst ([`Fleet::hello_allowed`]).
pub const HELLO_BURST: f64 = 5.0;
/// Then one per this long.
pub const HELLO_EVERY: Duration = Duration::from_secs(2);
/// Agents whose hellos are tracked at most (past it, those with a full bucket make room).
pub const MAX_HELLO_AGENTS: usize = 65_536;

/// Why a connection was not registered.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The agent was revoked (while its hello was being handled).
    #[error("agent {:?} is revoked: {}", .0.agent, .0.reason)]
    Revoked(Revocation),
    /// The revocation could not be read.
    #[error("coordinator store: {0}")]
    Store(StoreError),
}

impl AttachError {
    /// The close code the connection is closed with (the agent tells a revoke by it).
    pub fn close_code(&self) -> u32 {
        match self {
            AttachError::Revoked(_) => close::REVOKED,
            AttachError::Store(_) => close::REFUSED,
        }
    }
}

/// What the coordinator knows about a connected agent, in memory.
#[derive(Debug, Clone)]
pub struct AgentLink {
    /// Verified agent id.
    pub agent_id: String,
    /// Remote address.
    pub remote: SocketAddr,
    /// Labels from the hello.
    pub labels: BTreeMap<String, String>,
    /// Latest heartbeat as the agent sent it (what `agents show` prints as the agent's words).
    pub last_heartbeat: Option<Arc<Heartbeat>>,
    /// What of it counts ([`judged`]): the rules, the gauges and the placement read this one.
    /// Shared, never copied under the lock.
    pub judged: Option<Arc<Heartbeat>>,
    /// The profiles last pushed to it, with the endpoints each was given.
    pub given: Arc<Given>,
    /// The version whose `Applied` was taken (one per push).
    pub acked: Option<u64>,
    /// `heartbeats` when the latest push was acknowledged: the heartbeats after it report
    /// the profiles as applied.
    pub acked_heartbeats: u64,
    /// The latest push was the profiles from before a rollout in progress (every step of a
    /// rollout is a new fleet version, so an acknowledgement names what it applied).
    pub pushed_held: bool,
    /// When the last push was queued for it.
    pub pushed_at: Option<Instant>,
    /// Heartbeats received on this connection.
    pub heartbeats: u64,
    /// Still connected.
    pub connected: bool,
    /// The fleet version last pushed to it.
    pub pushed: Option<u64>,
    /// When we last heard from it (hello or heartbeat).
    pub last_heard: Instant,
    /// False after [`MISSED_HEARTBEATS_OFFLINE`] intervals of silence, until it speaks again.
    pub online: bool,
    /// The agent process's start, from its hello.
    pub started_unix_ms: u64,
    /// When this connection was made (Unix ms).
    pub since_unix_ms: u64,
}

impl AgentLink {
    /// A link that just connected: heard from now, online, nothing pushed yet.
    pub fn connected(agent_id: &str, remote: SocketAddr, labels: BTreeMap<String, String>) -> Self {
        AgentLink {
            agent_id: agent_id.to_string(),
            remote,
            labels,
            last_heartbeat: None,
            judged: None,
            given: Arc::default(),
            acked: None,
            acked_heartbeats: 0,
            pushed_held: false,
            heartbeats: 0,
            connected: true,
            pushed: None,
            pushed_at: None,
            last_heard: Instant::now(),
            online: true,
            started_unix_ms: 0,
            since_unix_ms: tunnelfleet_runtime::clock::now_unix_ms(),
        }
    }
}

impl AgentLink {
    /// Records a push queued to it.
    fn pushed_to(&mut self, version: u64, held: bool, gave: Arc<Given>) {
        self.given = gave;
        self.pushed = Some(version);
        self.pushed_held = held;
        self.pushed_at = Some(Instant::now());
    }
}

/// Heartbeats an agent may miss before it is marked offline: one lost datagram is noise, three
/// in a row is an outage (the same rule as tunnel health checks).
pub const MISSED_HEARTBEATS_OFFLINE: u32 = 3;

/// Frames queued for one agent's writer task.
pub type FrameQueue = mpsc::Sender<Vec<u8>>;

/// The coordinator's shared state: connections in memory, fleet state on disk.
pub struct Fleet {
    /// Connected agents.
    pub links: Links,
    /// Persistent state.
    pub store: Store,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval: Duration,
    /// Where [`FleetEvent`]s go. Unbounded so that none is ever dropped: they are lifecycle
    /// events only (a hello per accepted connection, one connection per agent; offline and
    /// online per silence), while heartbeats, which an agent can send at any rate, wait in
    /// [`Fleet::take_heartbeats`]'s map, one per agent.
    events: mpsc::UnboundedSender<FleetEvent>,
    /// Heartbeats the watcher has not judged yet: the latest per agent (a newer one replaces
    /// an older, so a flood costs the watcher one heartbeat per agent per turn).
    fresh: Mutex<HashMap<String, Arc<Heartbeat>>>,
    /// Woken when `fresh` gets one.
    fresh_ready: tokio::sync::Notify,
    /// Hello allowance per agent id ([`Fleet::hello_allowed`]).
    hellos: Mutex<Buckets<String>>,
    /// Commands sent to agents, waiting for their results.
    commands: Mutex<Pending>,
    /// Who passes health checks through which endpoint, for agents whose checks fail there.
    pub evidence: crate::evidence::HealthEvidence,
    next_command: std::sync::atomic::AtomicU64,
}

impl Fleet {
    /// A fleet over `store`, and the receiver of its [`FleetEvent`]s (drop it when nothing
    /// watches: events are then discarded).
    pub fn new(
        store: Store,
        heartbeat_interval: Duration,
    ) -> (Arc<Fleet>, mpsc::UnboundedReceiver<FleetEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let fleet = Arc::new(Fleet {
            links: Links::default(),
            store,
            heartbeat_interval,
            events,
            fresh: Mutex::default(),
            fresh_ready: tokio::sync::Notify::new(),
            hellos: Mutex::new(Buckets::new(
                HELLO_BURST,
                1.0 / HELLO_EVERY.as_secs_f64(),
                MAX_HELLO_AGENTS,
            )),
            commands: Mutex::default(),
            evidence: Default::default(),
            next_command: std::sync::atomic::AtomicU64::new(1),
        });
        (fleet, rx)
    }

    /// Revokes an agent durably and closes its connection at once; it is refused from then on.
    pub async fn revoke(&self, agent_id: &str, reason: &str) -> Result<Revocation, StoreError> {
        let r = self.store.revoke(agent_id, reason).await?;
        // Detached here, not when its connection task notices the close: from the moment the
        // revoke is durable the agent counts as gone (no push, no command, not "connected").
        let live = self.links.lock().get_mut(agent_id).and_then(|(l, live)| {
            l.connected = false;
            live.take()
        });
        // Closed before its queue is dropped: a writer that saw its queue end first would
        // finish the stream, and the agent would read "stream closed", not why.
        if let Some(live) = live {
            live.conn.close(
                close::REVOKED.into(),
                format!("agent {agent_id:?} is revoked: {reason}").as_bytes(),
            );
            drop(live);
        }
        tracing::warn!(agent = %agent_id, "agent revoked: {reason}");
        Ok(r)
    }

    /// Asks a linked agent to link to another coordinator ([`crate::balance`]): its link is
    /// closed with [`close::REBALANCE`] and `reason`; its connection task detaches it as for
    /// any lost link. False when it is not linked here (any more).
    pub fn rebalance(&self, agent_id: &str, reason: &str) -> bool {
        let conn = self
            .links
            .lock()
            .get(agent_id)
            .and_then(|(_, live)| live.as_ref().map(|l| l.conn.clone()));
        let Some(conn) = conn else { return false };
        conn.close(close::REBALANCE.into(), reason.as_bytes());
        true
    }

    /// Pushes the current fleet version to every connected agent that has not been sent it;
    /// returns the agents pushed to. Every agent gets every version — an agent whose profiles
    /// did not change applies it as a no-op and acknowledges — so a rollout is complete when
    /// every agent reports the current version.
    pub fn push_changed(&self) -> Result<Vec<String>, StoreError> {
        let mut pushed = Vec::new();
        // Read the store once, and encode each distinct set once: thousands of agents
        // assigned by the same labels share one frame.
        let snapshot = self.store.snapshot()?;
        let version = snapshot.version;
        let mut frames: HashMap<crate::store::SetKey, (Vec<u8>, Arc<Given>)> = HashMap::new();
        let mut links = self.links.lock();
        for (link, live) in links.values_mut() {
            let Some(tx) = live.as_ref().filter(|_| link.connected).map(|l| &l.tx) else {
                continue;
            };
            if link.pushed == Some(version) {
                continue;
            }
            let names = snapshot.names_for(&link.agent_id, &link.labels);
            let held = names.held;
            let (frame, gave) = match frames.get(&names) {
                Some(f) => f.clone(),
                None => {
                    let set = snapshot.set_of(&names);
                    let Ok(f) = encode(&CoordinatorMessage::Push(set.clone())) else {
                        continue;
                    };
                    let entry = (f, given(&set));
                    frames.insert(names, entry.clone());
                    entry
                }
            };
            if tx.try_send(frame).is_ok() {
                link.pushed_to(version, held, gave);
                pushed.push(link.agent_id.clone());
            }
        }
        pushed.sort();
        Ok(pushed)
    }
}

impl Fleet {
    /// Pushes the current version to one agent (on connect), unless it has it already. Cheaper
    /// than [`Fleet::push_changed`] when thousands reconnect at once: no scan of every link.
    pub fn push_one(&self, id: &str) -> Result<bool, StoreError> {
        let snapshot = self.store.snapshot()?;
        let version = snapshot.version;
        let mut links = self.links.lock();
        let Some((link, Some(live))) = links.get_mut(id) else {
            return Ok(false);
        };
        if !link.connected || link.pushed == Some(version) {
            return Ok(false);
        }
        let key = snapshot.names_for(&link.agent_id, &link.labels);
        let set = snapshot.set_of(&key);
        let Ok(frame) = encode(&CoordinatorMessage::Push(set.clone())) else {
            return Ok(false);
        };
        if live.tx.try_send(frame).is_ok() {
            link.pushed_to(version, key.held, given(&set));
            return Ok(true);
        }
        Ok(false)
    }

    /// Marks agents silent for more than [`MISSED_HEARTBEATS_OFFLINE`] heartbeat intervals as
    /// offline; returns the ones that just went offline. No IO and no clock of its own, so the
    /// rule is tested with a virtual clock.
    pub fn sweep(&self, now: Instant) -> Vec<String> {
        let limit = self.heartbeat_interval * MISSED_HEARTBEATS_OFFLINE;
        let mut gone = Vec::new();
        for (l, _) in self.links.lock().values_mut() {
            if l.online && now.saturating_duration_since(l.last_heard) > limit {
                l.online = false;
                gone.push(l.agent_id.clone());
            }
        }
        gone.sort();
        gone
    }

    /// Runs [`Fleet::sweep`] every heartbeat interval until `shutdown`, logging each change.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for id in self.sweep(Instant::now()) {
                tracing::warn!(agent = %id, missed = MISSED_HEARTBEATS_OFFLINE, "agent offline: no heartbeat for {} intervals", MISSED_HEARTBEATS_OFFLINE);
                self.notify(FleetEvent::Offline {
                    agent: id,
                    missed: MISSED_HEARTBEATS_OFFLINE,
                });
            }
        }
    }

    /// Takes the agent's acknowledgement of `version`: the time since its push, once per push
    /// of that version, and None for any other (a version never pushed to it, or one already
    /// acknowledged), which must change nothing.
    pub fn acknowledged(&self, id: &str, version: u64) -> Option<Duration> {
        let mut links = self.links.lock();
        let (l, _) = links.get_mut(id)?;
        if l.pushed != Some(version) || l.acked == Some(version) {
            return None;
        }
        l.acked = Some(version);
        l.acked_heartbeats = l.heartbeats;
        Some(l.pushed_at.map(|at| at.elapsed()).unwrap_or_default())
    }

    /// Queues an event for the watcher without waiting (nothing watching: discarded).
    pub(crate) fn notify(&self, ev: FleetEvent) {
        let _ = self.events.send(ev);
    }

    /// Whether agent `id` may have another hello handled now: a burst of [`HELLO_BURST`], then
    /// one per [`HELLO_EVERY`]. An honest agent reconnects with backoff and never notices; a
    /// certificate copied to several machines (each connection replacing the other) or a
    /// reconnect loop costs the coordinator a durable write and a replacement a few times a
    /// minute, not hundreds a second.
    pub fn hello_allowed(&self, id: &str, now: Instant) -> bool {
        self.hellos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(id.to_string(), now)
    }

    /// The heartbeats that arrived since the last call, the latest per agent.
    pub fn take_heartbeats(&self) -> Vec<(String, Arc<Heartbeat>)> {
        let mut fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        fresh.drain().collect()
    }

    /// Resolves once a heartbeat is waiting in [`Fleet::take_heartbeats`].
    pub async fn heartbeats_ready(&self) {
        self.fresh_ready.notified().await;
    }

    /// Registers a new connection of `agent_id` with the queue its writer task drains, and
    /// tells the watcher. One connection per agent: an older one is closed (a certificate
    /// copied to a second machine cannot keep both). The revocation is read again once the
    /// connection is registered: a revoke that came after the hello's check either finds the
    /// connection here to close, or is found by this read ([`Fleet::revoke`] writes before it
    /// looks), so no revoked agent keeps a link.
    pub fn attach(
        &self,
        agent_id: &str,
        remote: SocketAddr,
        labels: BTreeMap<String, String>,
        tx: FrameQueue,
        conn: quinn::Connection,
        started_unix_ms: u64,
    ) -> Result<(), AttachError> {
        let mut link = AgentLink::connected(agent_id, remote, labels);
        link.started_unix_ms = started_unix_ms;
        let old = self.links.lock().insert(
            agent_id.to_string(),
            (
                link,
                Some(Live {
                    tx,
                    conn: conn.clone(),
                }),
            ),
        );
        if let Some((prev, Some(live))) = old
            && live.conn.stable_id() != conn.stable_id()
        {
            tracing::warn!(agent = %agent_id, old = %prev.remote, new = %remote, "a newer connection of this agent replaces the older one");
            live.conn.close(
                close::REPLACED.into(),
                format!(
                    "a newer connection of agent {agent_id:?} (from {remote}) replaced this one"
                )
                .as_bytes(),
            );
        }
        let revoked = match self.store.revocation(agent_id) {
            Ok(r) => r.map(AttachError::Revoked),
            Err(e) => Some(AttachError::Store(e)),
        };
        if let Some(e) = revoked {
            self.detach(agent_id, &conn);
            return Err(e);
        }
        self.notify(FleetEvent::Hello {
            agent: agent_id.to_string(),
            started_unix_ms,
        });
        Ok(())
    }

    /// Marks `agent_id` disconnected, unless a newer connection replaced `conn` already.
    pub fn detach(&self, agent_id: &str, conn: &quinn::Connection) {
        let mut links = self.links.lock();
        if let Some((l, live)) = links.get_mut(agent_id)
            && live
                .as_ref()
                .is_none_or(|l| l.conn.stable_id() == conn.stable_id())
        {
            l.connected = false;
            *live = None;
            drop(links);
            self.evidence.forget(agent_id);
        }
    }

    /// Records that `id` was heard from now; logs a return from offline. Returns what counts
    /// of the heartbeat ([`judged`]), if one came and the agent is linked.
    pub fn heard(&self, id: &str, hb: Option<Heartbeat>) -> Option<Arc<Heartbeat>> {
        let mut back = false;
        let mut fresh = None;
        // Judged outside the lock: the lock is only for swapping the results in.
        let given = self.links.lock().get(id).map(|(l, _)| l.given.clone());
        let hb = hb
            .zip(given)
            .map(|(hb, g)| (Arc::new(judged(&hb, &g)), Arc::new(hb)));
        if let Some((l, _)) = self.links.lock().get_mut(id) {
            l.last_heard = Instant::now();
            if !l.online {
                l.online = true;
                back = true;
                tracing::info!(agent = %id, "agent back online");
            }
            if let Some((judged, hb)) = hb {
                l.heartbeats += 1;
                l.last_heartbeat = Some(hb);
                l.judged = Some(judged.clone());
                fresh = Some(judged);
            }
        }
        if let Some(hb) = &fresh {
            self.evidence.observe(id, hb, Instant::now());
        }
        if let Some(hb) = fresh.clone().filter(|_| !self.events.is_closed()) {
            self.fresh
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_string(), hb);
            self.fresh_ready.notify_one();
        }
        if back {
            self.notify(FleetEvent::Online {
                agent: id.to_string(),
            });
        }
        fresh
    }
}

#[cfg(test)]
mod tests;
