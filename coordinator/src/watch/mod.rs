//! The watcher: one task that feeds [`Monitor`] (probes, heartbeats, hellos, offline agents,
//! operator commands) and carries out what it decides — alerts persisted with their outbox
//! entries, group moves stored and pushed, events logged.
//!
//! Being the only writer of a group's active endpoint, it serializes automatic failover,
//! failback and the operator's `oma drain | failover | failback`, so they never race.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tunnelfleet_protocol::Heartbeat;
use tunnelfleet_runtime::clock::now_unix_ms;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, FleetEvent};
use crate::hooks::Outbox;
use crate::metrics::Metrics;
use crate::monitor::{Action, AlertRules, EndpointView, Monitor, ProbeError, Refusal};
use crate::store::{Alert, alert_key, glob_match};
use crate::store::{Store, StoreError};

mod evidence;
mod exec;
mod per_agent;
mod probe;
use evidence::Remote;
use exec::describe;
pub use per_agent::MAX_ALERTS_PER_AGENT;
use per_agent::PerAgent;
pub use probe::{Prober, probe, probe_gap};

/// Inputs of the watcher.
#[derive(Debug)]
pub enum WatchEvent {
    /// Something happened to an agent (from the [`Fleet`]).
    Fleet(FleetEvent),
    /// A probe finished.
    Probe {
        /// The probed endpoint (`host:port`).
        endpoint: String,
        /// Latency or why it failed.
        result: Result<Duration, ProbeError>,
    },
    /// An operator command; the answer says what happened.
    Command(Command, oneshot::Sender<Result<String, OmaCommandError>>),
}

/// Why an operator's OMA command failed.
#[derive(Debug, thiserror::Error)]
pub enum OmaCommandError {
    /// The rules refused it (no such group, nowhere to move).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store failed, or has no such endpoint.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The watcher is gone.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// Another coordinator leads: it decides OMA moves.
    #[error("this coordinator does not lead the fleet now: send it to the leader")]
    NotLeader,
}

/// Operator commands.
#[derive(Debug, Clone)]
pub enum Command {
    /// Take an endpoint out of service (its groups move away, make-before-break).
    Drain(String),
    /// Put it back (it becomes eligible for failback).
    Undrain(String),
    /// Move a group to its next usable endpoint.
    Failover(String),
    /// Move a group back to its best usable endpoint now.
    Failback(String),
    /// Groups were created, changed or deleted.
    GroupsChanged,
}

/// How the rest of the coordinator talks to the watcher.
#[derive(Clone)]
pub struct WatchHandle {
    /// The running watcher's queue (None while this coordinator does not lead).
    tx: Arc<Mutex<Option<mpsc::Sender<WatchEvent>>>>,
    view: Arc<Mutex<Vec<EndpointView>>>,
    /// The alert outbox (hook stats).
    pub outbox: Arc<Outbox>,
    /// This coordinator's name (its own agents' evidence comes from its links, not the store).
    me: Arc<String>,
}

/// Depth of the watcher's own queue: probe results (one per endpoint per interval) and operator
/// commands. The fleet's lifecycle events come on the fleet's queue and its heartbeats through
/// [`Fleet::take_heartbeats`] (the latest per agent).
const QUEUE: usize = 1024;

/// How often old resolved alerts and ended silences are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How often the agents' SSH certificates are held against the expiry rule.
const CERTS_EVERY: Duration = Duration::from_secs(10);

impl WatchHandle {
    /// A handle with no watcher yet (commands are refused until [`start`] runs one).
    pub fn new(outbox: Arc<Outbox>, me: &str) -> WatchHandle {
        WatchHandle {
            tx: Arc::default(),
            view: Arc::default(),
            outbox,
            me: Arc::new(me.to_string()),
        }
    }

    /// Whether a watcher runs (this coordinator leads).
    pub fn running(&self) -> bool {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Runs an operator command.
    pub async fn command(&self, cmd: Command) -> Result<String, OmaCommandError> {
        let queue = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(queue) = queue else {
            return Err(OmaCommandError::NotLeader);
        };
        let (tx, rx) = oneshot::channel();
        queue
            .send(WatchEvent::Command(cmd, tx))
            .await
            .map_err(|_| OmaCommandError::ShuttingDown)?;
        rx.await.map_err(|_| OmaCommandError::ShuttingDown)?
    }

    /// Every group endpoint with its health and agents.
    pub fn view(&self) -> Vec<EndpointView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Starts the watcher over `fleet` and its events, and the alert outbox, behind `handle`;
/// both stop at `shutdown`, and the task gives the events' receiver back (for the next term
/// of leading). What they decide is written through `store` (the leader's, fenced on etcd).
/// Failovers and alerts are counted in `metrics`.
pub fn start(
    handle: &WatchHandle,
    fleet: Arc<Fleet>,
    store: Store,
    fleet_events: mpsc::UnboundedReceiver<FleetEvent>,
    rules: AlertRules,
    metrics: Option<Arc<Metrics>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<mpsc::UnboundedReceiver<FleetEvent>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    *handle.tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
    let outbox = handle.outbox.clone();
    let watcher = Watcher {
        monitor: Monitor::new(rules),
        fleet,
        store,
        queue: tx,
        metrics,
        handle: handle.clone(),
        alert_ids: HashMap::new(),
        per_agent: PerAgent::default(),
        silenced: HashMap::new(),
        probers: HashMap::new(),
        remote: HashMap::new(),
        live_revision: 0,
    };
    tokio::spawn(async move {
        let o = tokio::spawn(outbox.run(shutdown.clone()));
        let handle = watcher.handle.clone();
        let events = watcher.run(rx, fleet_events, shutdown).await;
        *handle.tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let _ = o.await;
        events
    })
}

struct Watcher {
    monitor: Monitor,
    fleet: Arc<Fleet>,
    /// Where its decisions are written (the leader's store).
    store: Store,
    /// Its own queue (probers send their results here).
    queue: mpsc::Sender<WatchEvent>,
    metrics: Option<Arc<Metrics>>,
    handle: WatchHandle,
    /// Firing alert key -> alert id.
    alert_ids: HashMap<String, u64>,
    /// Firing alerts per agent, for the cap.
    per_agent: PerAgent,
    /// Firing alerts that fired under a silence (key -> id): delivered once it ends.
    silenced: HashMap<String, u64>,
    /// Endpoint -> (interval, timeout, prober task).
    probers: HashMap<String, (Duration, Duration, tokio::task::JoinHandle<()>)>,
    /// Agents linked to other coordinators, as their evidence last showed them.
    remote: HashMap<String, Remote>,
    /// The store revision their evidence was read up to.
    live_revision: i64,
}

impl Watcher {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<WatchEvent>,
        mut fleet_events: mpsc::UnboundedReceiver<FleetEvent>,
        shutdown: CancellationToken,
    ) -> mpsc::UnboundedReceiver<FleetEvent> {
        match self.store.alerts(false) {
            Ok(firing) => {
                for a in firing.into_iter().filter(|a| a.kind.from_rules()) {
                    self.monitor.restore_firing(a.kind, &a.subject);
                    self.alert_ids.insert(a.key(), a.id);
                    self.per_agent.fired(&a.key(), a.kind, &a.affected_agents);
                    if a.silenced {
                        self.silenced.insert(a.key(), a.id);
                    }
                }
            }
            Err(e) => tracing::error!("reading firing alerts: {e}"),
        }
        self.refresh_groups();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut refreshed = Instant::now();
        // Old resolved alerts and ended silences are dropped at start and then hourly.
        let mut pruned: Option<Instant> = None;
        let mut certs_checked: Option<Instant> = None;
        let fleet = self.fleet.clone();
        loop {
            let (actions, reply) = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(ev) = rx.recv() => self.handle(ev).await,
                Some(ev) = fleet_events.recv() => self.handle(WatchEvent::Fleet(ev)).await,
                _ = fleet.heartbeats_ready() => {
                    let now = Instant::now();
                    let mut actions = Vec::new();
                    for (agent, hb) in fleet.take_heartbeats() {
                        actions.extend(self.heartbeat(&agent, &hb, now));
                    }
                    (actions, None)
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if now.duration_since(refreshed) >= Duration::from_secs(5) {
                        // Catch changes made behind our back.
                        self.refresh_groups();
                        refreshed = now;
                    }
                    if pruned.is_none_or(|p| now.duration_since(p) >= PRUNE_EVERY) {
                        pruned = Some(now);
                        match self.store.prune_alerts(tunnelfleet_runtime::clock::now_unix_ms()).await {
                            Ok((0, 0)) => {}
                            Ok((a, s)) => tracing::info!(alerts = a, silences = s, "dropped resolved alerts past their retention and ended silences"),
                            Err(e) => tracing::error!("pruning alerts: {e}"),
                        }
                    }
                    self.release_silenced().await;
                    let mut actions = self.remote_evidence(now);
                    actions.extend(self.monitor.tick(now));
                    if certs_checked.is_none_or(|c| now.duration_since(c) >= CERTS_EVERY) {
                        certs_checked = Some(now);
                        actions.extend(self.ssh_certs());
                    }
                    (actions, None)
                }
            };
            let done = self.exec(actions).await;
            if let Some((tx, answer)) = reply {
                let _ = tx.send(done.map_err(OmaCommandError::from).and(answer));
            }
        }
        for (_, (_, _, t)) in self.probers.drain() {
            t.abort();
        }
        fleet_events
    }

    /// `agent`'s heartbeat to the monitor; an onboarding agent reporting a profile assigned
    /// after its first certificate has its certificate profiles looked up again first.
    fn heartbeat(&mut self, agent: &str, hb: &Heartbeat, now: Instant) -> Vec<Action> {
        if self.monitor.onboarding_lookup(agent, hb, now) {
            let profiles = self.certificate_profiles(agent);
            self.monitor.onboarding_profiles(agent, profiles, hb);
        }
        self.monitor.heartbeat(agent, hb, now)
    }

    /// The profiles pushed to `agent` that log in with its certificate (no `identity_file`).
    fn certificate_profiles(&self, agent: &str) -> std::collections::BTreeSet<String> {
        let read = || -> Result<_, crate::store::StoreError> {
            let labels = self
                .store
                .agent(agent)?
                .map(|r| r.effective_labels())
                .unwrap_or_default();
            Ok(self.store.snapshot()?.set_for(agent, &labels))
        };
        match read() {
            Ok(set) => set
                .profiles
                .into_iter()
                .filter(|p| p.identity_file.is_none())
                .map(|p| p.name)
                .collect(),
            Err(e) => {
                tracing::warn!(%agent, "reading what was pushed to an onboarding agent: {e}");
                Default::default()
            }
        }
    }

    /// The agents' SSH certificates against the expiry rule.
    fn ssh_certs(&mut self) -> Vec<Action> {
        let read = || -> Result<Vec<crate::monitor::CertView>, crate::store::StoreError> {
            let revoked = self.store.revoked_agents()?;
            Ok(self
                .store
                .ssh_certs()?
                .into_iter()
                .map(|c| crate::monitor::CertView {
                    revoked: revoked.contains(&c.agent_id),
                    agent: c.agent_id,
                    serial: c.serial,
                    valid_after: c.valid_after,
                    valid_before: c.valid_before,
                })
                .collect())
        };
        match read() {
            Ok(certs) => self
                .monitor
                .ssh_certs(&certs, tunnelfleet_runtime::clock::now_unix_ms() / 1000),
            Err(e) => {
                tracing::warn!("reading the agents' SSH certificates: {e}");
                Vec::new()
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn handle(
        &mut self,
        ev: WatchEvent,
    ) -> (
        Vec<Action>,
        Option<(
            oneshot::Sender<Result<String, OmaCommandError>>,
            Result<String, OmaCommandError>,
        )>,
    ) {
        let now = Instant::now();
        let actions = match ev {
            WatchEvent::Fleet(FleetEvent::Hello {
                agent,
                started_unix_ms,
            }) => self.monitor.hello(&agent, started_unix_ms, now),
            WatchEvent::Fleet(FleetEvent::Offline { agent, missed }) => {
                if self.linked_elsewhere(&agent) {
                    // The link here is an old one: the agent moved to another coordinator
                    // (handed over, or this one was away) and is heard from there.
                    Vec::new()
                } else {
                    self.monitor.agent_offline(&agent, missed)
                }
            }
            WatchEvent::Fleet(FleetEvent::Online { agent }) => self.monitor.agent_online(&agent),
            WatchEvent::Fleet(FleetEvent::FirstSshCert { agent }) => {
                let profiles = self.certificate_profiles(&agent);
                self.monitor.onboarding(&agent, profiles, now);
                Vec::new()
            }
            WatchEvent::Probe { endpoint, result } => self.monitor.probe(&endpoint, result, now),
            WatchEvent::Command(cmd, reply) => {
                let (answer, actions) = self.command(cmd, now).await;
                return (actions, Some((reply, answer)));
            }
        };
        (actions, None)
    }

    async fn command(
        &mut self,
        cmd: Command,
        now: Instant,
    ) -> (Result<String, OmaCommandError>, Vec<Action>) {
        let store = &self.store;
        match cmd {
            Command::GroupsChanged => {
                self.refresh_groups();
                (Ok("groups reloaded".into()), self.monitor.decide(now))
            }
            Command::Failover(g) => match self.monitor.failover(&g) {
                Ok(a) => (Ok(describe(&a)), vec![a]),
                Err(e) => (Err(e.into()), Vec::new()),
            },
            Command::Failback(g) => match self.monitor.failback(&g) {
                Ok(a) => (Ok(describe(&a)), vec![a]),
                Err(e) => (Err(e.into()), Vec::new()),
            },
            Command::Drain(ep) => self.set_drained(store.clone(), ep, true, now).await,
            Command::Undrain(ep) => self.set_drained(store.clone(), ep, false, now).await,
        }
    }

    async fn set_drained(
        &mut self,
        store: crate::store::Store,
        ep: String,
        drained: bool,
        now: Instant,
    ) -> (Result<String, OmaCommandError>, Vec<Action>) {
        match store.set_drained(&ep, drained).await {
            Err(e) => (Err(e.into()), Vec::new()),
            Ok((_, groups)) => {
                self.refresh_groups();
                let actions = self.monitor.decide(now);
                let verb = if drained { "drained" } else { "undrained" };
                let moves: Vec<String> = actions.iter().map(describe).collect();
                let mut msg = format!("{ep} {verb} in {}", groups.join(", "));
                if !moves.is_empty() {
                    msg.push_str("; ");
                    msg.push_str(&moves.join("; "));
                }
                // A move pushes by itself; otherwise the new endpoint order still must go out.
                if actions.is_empty()
                    && let Err(e) = self.fleet.push_changed()
                {
                    return (Err(e.into()), actions);
                }
                (Ok(msg), actions)
            }
        }
    }

    /// Firing alerts whose silences ended are delivered now (a silence hides an incident for
    /// its time, not for good).
    async fn release_silenced(&mut self) {
        if self.silenced.is_empty() {
            return;
        }
        let active = match self.store.silences(now_unix_ms()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("reading silences: {e}");
                return;
            }
        };
        let hooks = self.handle.outbox.names();
        let mut released = Vec::new();
        for (key, id) in &self.silenced {
            if active.iter().any(|s| glob_match(&s.matcher, key)) {
                continue;
            }
            match self.store.release_silenced(*id, &hooks).await {
                Ok(a) => {
                    tracing::warn!(alert = a.id, kind = a.kind.as_str(), subject = %a.subject, "silence over, alert still firing: {}", a.summary);
                    released.push(key.clone());
                }
                Err(e) => tracing::error!(alert = id, "releasing a silenced alert: {e}"),
            }
        }
        if !released.is_empty() {
            for k in released {
                self.silenced.remove(&k);
            }
            self.handle.outbox.wake();
        }
    }

    /// Reloads groups from the store and starts or stops probers to match.
    fn refresh_groups(&mut self) {
        let groups = match self.store.groups() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("reading OMA groups: {e}");
                return;
            }
        };
        // One prober per endpoint, at the tightest setting of the groups that probe it.
        let mut want: HashMap<String, (Duration, Duration)> = HashMap::new();
        for g in groups.iter().filter(|g| g.probe) {
            for e in &g.endpoints {
                let w = want
                    .entry(e.clone())
                    .or_insert((g.probe_interval, g.probe_timeout));
                w.0 = w.0.min(g.probe_interval);
                w.1 = w.1.min(g.probe_timeout);
            }
        }
        self.probers.retain(|ep, (i, t, task)| {
            let keep = want.get(ep) == Some(&(*i, *t));
            if !keep {
                task.abort();
            }
            keep
        });
        for (ep, (interval, timeout)) in want {
            if self.probers.contains_key(&ep) {
                continue;
            }
            let tx = self.queue.clone();
            let endpoint = ep.clone();
            let task = tokio::spawn(async move {
                let mut prober = Prober::new(endpoint.clone(), interval, timeout);
                loop {
                    let result = prober.next().await;
                    let ev = WatchEvent::Probe {
                        endpoint: endpoint.clone(),
                        result,
                    };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            });
            self.probers.insert(ep, (interval, timeout, task));
        }
        self.monitor.set_groups(groups);
        *self.handle.view.lock().unwrap_or_else(|p| p.into_inner()) =
            self.monitor.view(Instant::now());
    }
}
