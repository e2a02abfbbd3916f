//! The coordinator's end of the control link: accept QUIC connections, check the hello
//! against the certificate, push each agent its profiles, take heartbeats and acknowledgements.
//!
//! One bidirectional stream per connection carries the frames: this task reads, a writer task
//! per connection sends (so a push never waits behind a slow read). Every refusal is logged with
//! the agent and the reason, and sent to the agent as `Refused` when the connection can still
//! carry it; a malformed frame closes that one connection and nothing else.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tunnelfleet_runtime::clock::now_unix_ms;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelfleet_protocol::{
    AgentMessage, Command, CommandAction, CommandResult, CoordinatorMessage, FrameDecoder,
    Heartbeat, PROTOCOL_VERSION, Welcome, check_version, encode,
};

/// Commands waiting for results: id -> (agent asked, where the answer goes).
type Pending = HashMap<u64, (String, tokio::sync::oneshot::Sender<CommandResult>)>;

use crate::store::{Revocation, Store, StoreError};
use crate::tls;
use crate::watch::WatchEvent;

/// How long a new connection may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close codes.
pub mod close {
    /// Refused at hello (version, identity).
    pub const REFUSED: u32 = 1;
    /// The peer sent bytes that are not a valid frame.
    pub const MALFORMED: u32 = 2;
    /// The coordinator is shutting down.
    pub const SHUTDOWN: u32 = 3;
    /// The agent was revoked.
    pub const REVOKED: u32 = 4;
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
    /// Latest heartbeat.
    pub last_heartbeat: Option<Heartbeat>,
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
}

/// Heartbeats an agent may miss before it is marked offline: one lost datagram is noise, three
/// in a row is an outage (the same rule as tunnel health checks).
pub const MISSED_HEARTBEATS_OFFLINE: u32 = 3;

/// Frames queued for one agent's writer task.
type Outbox = mpsc::Sender<Vec<u8>>;

/// A connected agent's outbox and connection.
struct Live {
    tx: Outbox,
    conn: quinn::Connection,
}

/// One agent: what we know, and its outbox while connected.
type Slot = (AgentLink, Option<Live>);

/// Connected agents and their outgoing queues. A `std` mutex: held only to copy or replace an
/// entry, never across an await.
#[derive(Default)]
pub struct Links {
    inner: Mutex<HashMap<String, Slot>>,
}

impl Links {
    /// A snapshot of one agent.
    pub fn get(&self, id: &str) -> Option<AgentLink> {
        self.lock().get(id).map(|(l, _)| l.clone())
    }

    /// Ids of connected agents.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .values()
            .filter(|(l, _)| l.connected)
            .map(|(l, _)| l.agent_id.clone())
            .collect();
        v.sort();
        v
    }

    /// Time since each connected agent was last heard from.
    pub fn heartbeat_ages(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|(l, _)| l.connected)
            .map(|(l, _)| {
                (
                    l.agent_id.clone(),
                    now.saturating_duration_since(l.last_heard),
                )
            })
            .collect()
    }

    /// The last heartbeat of every connected agent.
    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        self.lock()
            .values()
            .filter(|(l, _)| l.connected)
            .filter_map(|(l, _)| l.last_heartbeat.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The coordinator's shared state: connections in memory, fleet state on disk.
pub struct Fleet {
    /// Connected agents.
    pub links: Links,
    /// Persistent state.
    pub store: Store,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval: Duration,
    /// The watcher (alerts, OMA health, failover), once started.
    pub watch: std::sync::OnceLock<crate::watch::WatchHandle>,
    /// The CA's signing key, when this coordinator enrolls agents.
    pub signer: std::sync::OnceLock<Arc<crate::pki::Signer>>,
    /// Prometheus metrics (absent only if the exporter could not be built).
    pub metrics: Option<crate::metrics::Metrics>,
    /// Commands sent to agents, waiting for their results.
    commands: Mutex<Pending>,
    next_command: std::sync::atomic::AtomicU64,
}

/// How long an operator's command may take on the agent (a health check is bounded by its
/// own timeout, well below this).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

impl Fleet {
    /// A fleet over `store`.
    pub fn new(store: Store, heartbeat_interval: Duration) -> Arc<Fleet> {
        let metrics = match crate::metrics::Metrics::new() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!("{e}; /metrics disabled");
                None
            }
        };
        let fleet = Arc::new(Fleet {
            links: Links::default(),
            store,
            heartbeat_interval,
            watch: std::sync::OnceLock::new(),
            signer: std::sync::OnceLock::new(),
            metrics,
            commands: Mutex::default(),
            next_command: std::sync::atomic::AtomicU64::new(1),
        });
        if let Some(m) = &fleet.metrics {
            m.observe(Arc::downgrade(&fleet));
        }
        fleet
    }

    /// Revokes an agent durably and closes its connection at once; it is refused from then on.
    pub async fn revoke(&self, agent_id: &str, reason: &str) -> Result<Revocation, StoreError> {
        let r = self.store.revoke(agent_id, reason).await?;
        let conn = self
            .links
            .lock()
            .get(agent_id)
            .and_then(|(_, live)| live.as_ref().map(|l| l.conn.clone()));
        if let Some(conn) = conn {
            conn.close(
                close::REVOKED.into(),
                format!("agent {agent_id:?} is revoked: {reason}").as_bytes(),
            );
        }
        tracing::warn!(agent = %agent_id, "agent revoked: {reason}");
        Ok(r)
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
        let mut frames: HashMap<std::collections::BTreeSet<String>, Vec<u8>> = HashMap::new();
        let mut links = self.links.lock();
        for (link, live) in links.values_mut() {
            let Some(tx) = live.as_ref().filter(|_| link.connected).map(|l| &l.tx) else {
                continue;
            };
            if link.pushed == Some(version) {
                continue;
            }
            let names = snapshot.names_for(&link.agent_id, &link.labels);
            let frame = match frames.get(&names) {
                Some(f) => f.clone(),
                None => {
                    let Ok(f) = encode(&CoordinatorMessage::Push(snapshot.set_of(&names))) else {
                        continue;
                    };
                    frames.insert(names, f.clone());
                    f
                }
            };
            if tx.try_send(frame).is_ok() {
                link.pushed = Some(version);
                link.pushed_at = Some(Instant::now());
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
        let Ok(frame) = encode(&CoordinatorMessage::Push(
            snapshot.set_for(&link.agent_id, &link.labels),
        )) else {
            return Ok(false);
        };
        if live.tx.try_send(frame).is_ok() {
            link.pushed = Some(version);
            link.pushed_at = Some(Instant::now());
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
                self.notify(WatchEvent::Offline {
                    agent: id,
                    missed: MISSED_HEARTBEATS_OFFLINE,
                });
            }
        }
    }

    /// Runs an operator's command on a connected agent and waits for its result.
    pub async fn command(
        &self,
        agent: &str,
        action: CommandAction,
        profile: &str,
    ) -> Result<CommandResult, String> {
        let id = self
            .next_command
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tx = self
            .links
            .lock()
            .get(agent)
            .filter(|(l, _)| l.connected)
            .and_then(|(_, live)| live.as_ref().map(|l| l.tx.clone()))
            .ok_or_else(|| format!("agent {agent:?} is not connected"))?;
        let frame = encode(&CoordinatorMessage::Command(Command {
            id,
            action,
            profile: profile.to_string(),
        }))
        .map_err(|e| e.to_string())?;
        let (done, answer) = tokio::sync::oneshot::channel();
        self.pending().insert(id, (agent.to_string(), done));
        if tx.send(frame).await.is_err() {
            self.pending().remove(&id);
            return Err(format!("agent {agent:?} disconnected"));
        }
        let r = tokio::time::timeout(COMMAND_TIMEOUT, answer).await;
        self.pending().remove(&id);
        match r {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(format!("agent {agent:?} disconnected before answering")),
            Err(_) => Err(format!(
                "agent {agent:?} did not answer within {COMMAND_TIMEOUT:?}"
            )),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.commands.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the push-to-acknowledgement time of the version an agent just applied.
    fn acknowledged(&self, id: &str, version: u64) {
        let Some(m) = &self.metrics else { return };
        let at = self
            .links
            .lock()
            .get(id)
            .filter(|(l, _)| l.pushed == Some(version))
            .and_then(|(l, _)| l.pushed_at);
        if let Some(at) = at {
            m.push_latency.record(at.elapsed().as_secs_f64(), &[]);
        }
    }

    /// Tells the watcher, when one runs.
    pub fn notify(&self, ev: WatchEvent) {
        if let Some(w) = self.watch.get() {
            w.notify(ev);
        }
    }

    /// Records that `id` was heard from now; logs a return from offline.
    fn heard(&self, id: &str, hb: Option<Heartbeat>) {
        let mut back = false;
        if let Some((l, _)) = self.links.lock().get_mut(id) {
            l.last_heard = Instant::now();
            if !l.online {
                l.online = true;
                back = true;
                tracing::info!(agent = %id, "agent back online");
            }
            if let Some(hb) = hb {
                l.heartbeats += 1;
                if let Some(m) = &self.metrics {
                    m.heartbeats.add(1, &[]);
                }
                if self.watch.get().is_some() {
                    self.notify(WatchEvent::Heartbeat {
                        agent: id.to_string(),
                        hb: Box::new(hb.clone()),
                    });
                }
                l.last_heartbeat = Some(hb);
            }
        }
        if back {
            self.notify(WatchEvent::Online {
                agent: id.to_string(),
            });
        }
    }
}

/// How long a stopping coordinator waits for its closed connections to drain.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// Serves the control link on `endpoint` until `shutdown`.
pub async fn serve(endpoint: quinn::Endpoint, fleet: Arc<Fleet>, shutdown: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            use tracing::Instrument;
            match incoming.await {
                Ok(conn) if alpn(&conn).as_deref() == Some(tunnelfleet_protocol::ENROLL_ALPN) => {
                    let signer = fleet.signer.get().cloned();
                    crate::enroll::serve(conn, fleet, signer)
                        .instrument(tracing::info_span!("enrollment", %remote))
                        .await
                }
                Ok(conn) => {
                    handle(conn, fleet)
                        .instrument(tracing::info_span!(
                            "control_link",
                            %remote,
                            agent = tracing::field::Empty
                        ))
                        .await
                }
                // A client certificate from another CA, or an expired one, ends here.
                Err(e) => tracing::warn!(%remote, "control link refused during handshake: {e}"),
            }
        });
    }
    endpoint.close(close::SHUTDOWN.into(), b"coordinator shutting down");
    // Let the close reach the agents (so they reconnect at once instead of timing out) and
    // release the UDP port before returning; a peer that never answers cannot hold us up.
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, endpoint.wait_idle()).await;
}

/// The ALPN protocol a connection negotiated.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

async fn handle(conn: quinn::Connection, fleet: Arc<Fleet>) {
    let remote = conn.remote_address();
    let cert_id = match tls::connection_agent_id(&conn) {
        Ok(id) => {
            tracing::Span::current().record("agent", id.as_str());
            id
        }
        Err(e) => {
            tracing::warn!(%remote, "control link refused: {e}");
            conn.close(close::REFUSED.into(), e.as_bytes());
            return;
        }
    };
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(agent = %cert_id, "connection ended before a stream: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(agent = %cert_id, %remote, "no hello within {HELLO_TIMEOUT:?}; closing");
            conn.close(close::REFUSED.into(), b"no hello");
            return;
        }
    };
    let mut reader = Reader {
        dec: FrameDecoder::new(),
        buf: vec![0u8; 64 * 1024],
    };

    // The hello, with a deadline.
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next(&mut recv)).await {
        Ok(Ok(Some(AgentMessage::Hello(h)))) => h,
        Ok(Ok(Some(_))) => {
            refuse(&conn, &mut send, "the first message must be a hello".into()).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(agent = %cert_id, %remote, "closing control link: {e}");
            conn.close(close::MALFORMED.into(), e.as_bytes());
            return;
        }
        Err(_) => {
            tracing::warn!(agent = %cert_id, %remote, "no hello within {HELLO_TIMEOUT:?}; closing");
            conn.close(close::REFUSED.into(), b"no hello");
            return;
        }
    };
    let refusal = match check_version(hello.protocol) {
        Err(e) => Some(e.to_string()),
        Ok(()) if hello.agent_id != cert_id => Some(format!(
            "hello says agent {:?} but the certificate is for {cert_id:?}",
            hello.agent_id
        )),
        Ok(()) => match fleet.store.revocation(&cert_id) {
            Ok(Some(r)) => Some(format!("agent {cert_id:?} is revoked: {}", r.reason)),
            Ok(None) => None,
            Err(e) => Some(format!("coordinator store: {e}")),
        },
    };
    if let Some(reason) = refusal {
        tracing::warn!(agent = %cert_id, %remote, "control link refused: {reason}");
        refuse(&conn, &mut send, reason).await;
        return;
    }
    let welcome = CoordinatorMessage::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        heartbeat_interval_ms: fleet.heartbeat_interval.as_millis() as u32,
        coordinator_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    let Ok(frame) = encode(&welcome) else { return };
    if send.write_all(&frame).await.is_err() {
        return;
    }
    let mut record = fleet
        .store
        .agent(&cert_id)
        .ok()
        .flatten()
        .unwrap_or_default();
    record.id = cert_id.clone();
    record.labels = hello.labels.clone();
    // What its join token gave it wins over what it declares.
    let mut labels = hello.labels;
    labels.extend(record.enrolled_labels.clone());
    record.last_seen_unix_ms = now_unix_ms();
    if let Err(e) = fleet.store.record_agent(&record).await {
        tracing::error!(agent = %cert_id, "{e}");
    }

    // From here a writer task owns the send side; pushes and replies go through its queue.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if send.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    fleet.links.lock().insert(
        cert_id.clone(),
        (
            AgentLink {
                agent_id: cert_id.clone(),
                remote,
                labels,
                last_heartbeat: None,
                heartbeats: 0,
                connected: true,
                pushed: None,
                pushed_at: None,
                last_heard: Instant::now(),
                online: true,
            },
            Some(Live {
                tx,
                conn: conn.clone(),
            }),
        ),
    );
    tracing::info!(agent = %cert_id, %remote, version = %hello.agent_version, "agent connected");
    fleet.notify(WatchEvent::Hello {
        agent: cert_id.clone(),
        started_unix_ms: hello.started_unix_ms,
    });
    // An agent that was away gets the current profiles at once.
    if let Err(e) = fleet.push_one(&cert_id) {
        tracing::error!(agent = %cert_id, "computing profiles: {e}");
    }

    loop {
        match reader.next(&mut recv).await {
            Ok(Some(AgentMessage::Heartbeat(hb))) => fleet.heard(&cert_id, Some(hb)),
            Ok(Some(AgentMessage::Applied(a))) => {
                fleet.heard(&cert_id, None);
                fleet.acknowledged(&cert_id, a.version);
                tracing::info!(agent = %cert_id, version = a.version, ok = a.ok, "agent applied profiles");
                let mut rec = fleet
                    .store
                    .agent(&cert_id)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                rec.id = cert_id.clone();
                rec.last_seen_unix_ms = now_unix_ms();
                rec.applied_version = Some(a.version);
                rec.applied_ok = a.ok;
                rec.apply_errors = a
                    .results
                    .iter()
                    .filter(|r| !r.ok)
                    .map(|r| format!("{} {}: {}", r.profile, r.forward, r.detail))
                    .collect();
                if let Err(e) = fleet.store.record_agent(&rec).await {
                    tracing::error!(agent = %cert_id, "{e}");
                }
            }
            Ok(Some(AgentMessage::CommandResult(r))) => {
                // Only answers to commands sent to this agent are taken.
                let waiting = {
                    let mut p = fleet.pending();
                    match p.get(&r.id) {
                        Some((asked, _)) if *asked == cert_id => p.remove(&r.id),
                        _ => None,
                    }
                };
                match waiting {
                    Some((_, done)) => {
                        tracing::info!(agent = %cert_id, id = r.id, ok = r.ok, "command result: {}", r.message);
                        let _ = done.send(r);
                    }
                    None => {
                        tracing::debug!(agent = %cert_id, id = r.id, "result of a command nobody waits for")
                    }
                }
            }
            Ok(Some(AgentMessage::Hello(_))) => {
                tracing::warn!(agent = %cert_id, "second hello on one connection; closing");
                conn.close(close::MALFORMED.into(), b"second hello");
                break;
            }
            Ok(None) => {
                tracing::info!(agent = %cert_id, "control link closed");
                break;
            }
            Err(e) => {
                tracing::warn!(agent = %cert_id, %remote, "closing control link: {e}");
                conn.close(close::MALFORMED.into(), e.as_bytes());
                break;
            }
        }
    }
    {
        let mut links = fleet.links.lock();
        // A newer connection of the same agent may have replaced this one already.
        if let Some((l, live)) = links.get_mut(&cert_id)
            && live
                .as_ref()
                .is_none_or(|l| l.conn.stable_id() == conn.stable_id())
        {
            l.connected = false;
            *live = None;
        }
    }
    writer.abort();
}

/// Frames in from one stream.
struct Reader {
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl Reader {
    /// The next message; `Ok(None)` when the stream or connection ended; `Err` on bad bytes.
    async fn next(&mut self, recv: &mut quinn::RecvStream) -> Result<Option<AgentMessage>, String> {
        loop {
            match self.dec.next_message::<AgentMessage>() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match recv.read(&mut self.buf).await {
                Ok(Some(n)) => self.dec.push(&self.buf[..n]),
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }
}

async fn refuse(conn: &quinn::Connection, send: &mut quinn::SendStream, reason: String) {
    if let Ok(frame) = encode(&CoordinatorMessage::Refused {
        reason: reason.clone(),
    }) {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        // Give the frame a moment to leave before the close overtakes it.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
    conn.close(close::REFUSED.into(), reason.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn offline_after_three_missed_heartbeats_and_back_on_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = Fleet::new(Store::open(dir.path()).unwrap(), Duration::from_secs(5));
        fleet.links.lock().insert(
            "vma-1".into(),
            (
                AgentLink {
                    agent_id: "vma-1".into(),
                    remote: SocketAddr::from(([127, 0, 0, 1], 1)),
                    labels: BTreeMap::new(),
                    last_heartbeat: None,
                    heartbeats: 0,
                    connected: true,
                    pushed: None,
                    pushed_at: None,
                    last_heard: Instant::now(),
                    online: true,
                },
                None,
            ),
        );
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(
            fleet.sweep(Instant::now()).is_empty(),
            "three intervals exactly is not yet three missed"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(fleet.sweep(Instant::now()), vec!["vma-1"]);
        assert!(fleet.sweep(Instant::now()).is_empty(), "reported once");
        fleet.heard(
            "vma-1",
            Some(Heartbeat {
                seq: 1,
                sent_unix_ms: 0,
                profiles: vec![],
            }),
        );
        let l = fleet.links.get("vma-1").unwrap();
        assert!(l.online && l.heartbeats == 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(fleet.sweep(Instant::now()).is_empty());
    }
}
