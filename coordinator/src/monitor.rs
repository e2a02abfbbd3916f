//! The rules: endpoint health from probes and agents' reports, alerts after consecutive failed
//! checks (with correlation), and failover/failback decisions between an OMA group's endpoints.
//!
//! [`Monitor`] holds no IO and no clock: every input carries `now`, every output is an
//! [`Action`] for [`crate::watch`] to carry out (persist, deliver, push). That keeps the
//! counting, correlation and hysteresis testable under tokio's paused clock.
//!
//! The rules, in one place:
//! - A check fails or passes; `threshold` failures in a row raise the alert, any pass resets the
//!   count and resolves it.
//! - An endpoint is down after its group's `threshold` failed probes (or, for groups without
//!   probes, failed reports from agents); that is one `oma_down` incident naming every agent
//!   seen on it. While an endpoint is suspect (its last check failed) agents' tunnel-health
//!   alerts against it are held: the incident covers them. One agent failing against a healthy
//!   endpoint gets its own alert.
//! - When a group's active endpoint is down or drained, the group moves to the first usable
//!   endpoint in priority order. A higher-priority endpoint takes over again only after it has
//!   passed every check for `failback_after`; a single failure restarts that clock, so a
//!   bouncing primary never gets the fleet back until it is stable.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tunnelfleet_protocol::{ErrorKind, ForwardState, Heartbeat, TunnelState};

use crate::store::OmaGroup;
use crate::store::{AlertKind, alert_key};

/// How long an agent seen on an endpoint counts as "on it" for the incident's list.
const SEEN_WINDOW: Duration = Duration::from_secs(120);

/// Thresholds for the agent-side checks.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRules {
    /// Failed checks in a row before an alert (tunnel health, SSH auth, port conflict).
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    /// Restarts within `restart_window` that raise `agent_restarting`.
    #[serde(default = "default_restarts")]
    pub restarts: u32,
    /// The window for `restarts`; the alert resolves after a window without one.
    #[serde(default = "default_restart_window", with = "humantime_serde")]
    pub restart_window: Duration,
}

fn default_threshold() -> u32 {
    3
}
fn default_restarts() -> u32 {
    3
}
fn default_restart_window() -> Duration {
    Duration::from_secs(600)
}

impl Default for AlertRules {
    fn default() -> Self {
        AlertRules {
            threshold: default_threshold(),
            restarts: default_restarts(),
            restart_window: default_restart_window(),
        }
    }
}

/// What the rules decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Raise an alert (the key is not firing yet).
    Fire {
        /// Kind.
        kind: AlertKind,
        /// Subject.
        subject: String,
        /// For people.
        summary: String,
        /// Agents affected.
        affected: Vec<String>,
    },
    /// Resolve the firing alert with this key.
    Resolve {
        /// Kind.
        kind: AlertKind,
        /// Subject.
        subject: String,
    },
    /// Move a group to another endpoint.
    SetActive {
        /// Group.
        group: String,
        /// The new active endpoint.
        endpoint: String,
        /// Why, for the event log.
        reason: String,
        /// Whether automatic failback is suspended afterwards (an operator's failover).
        pinned: bool,
    },
    /// Something for the event log.
    Event(String),
}

/// One endpoint's health as the coordinator sees it.
#[derive(Debug, Default)]
struct Endpoint {
    /// Failed checks in a row.
    fails: u32,
    /// Down after `threshold` failures, until a pass.
    down: bool,
    /// Passing every check since.
    healthy_since: Option<Instant>,
    last_ok: Option<bool>,
    last_detail: String,
    last_latency: Option<Duration>,
    /// Agents whose heartbeats showed them on it.
    seen: HashMap<String, Instant>,
    /// Agents that reported failures against it.
    failing: HashMap<String, Instant>,
}

impl Endpoint {
    fn suspect(&self) -> bool {
        self.down || self.fails > 0
    }
}

#[derive(Debug, Default)]
struct AgentState {
    started_unix_ms: Option<u64>,
    restarts: VecDeque<Instant>,
    /// Error counters from the previous heartbeat: (profile, endpoint, kind) -> count.
    errors: HashMap<(String, String, ErrorKind), u64>,
    /// Newest failover record already logged, per profile.
    failover_seen: HashMap<String, u64>,
    /// Whether `errors` holds a baseline yet.
    baseline: bool,
}

/// One endpoint in `tunnelfleet oma list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointView {
    /// Group.
    pub group: String,
    /// `host:port`.
    pub endpoint: String,
    /// 0 = primary.
    pub priority: usize,
    /// The group's active endpoint.
    pub active: bool,
    /// Drained by the operator.
    pub drained: bool,
    /// `up`, `down` or `unknown` (no check yet).
    pub state: String,
    /// Failed checks in a row.
    pub consecutive_failures: u32,
    /// Seconds passing every check.
    pub healthy_for_s: Option<u64>,
    /// The last check's result.
    pub last_detail: String,
    /// The last probe's latency.
    pub last_latency_ms: Option<f64>,
    /// Agents on it now.
    pub agents: Vec<String>,
}

/// Why an operator's failover or failback was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such group.
    #[error("no OMA group {0:?}")]
    NoGroup(String),
    /// Every other endpoint is drained or down.
    #[error("group {group}: no other usable endpoint than {active}")]
    NoOtherEndpoint {
        /// The group.
        group: String,
        /// Its active endpoint.
        active: String,
    },
    /// Every endpoint is drained or down.
    #[error("group {0}: no usable endpoint")]
    NoUsableEndpoint(String),
    /// Failback to where it already is.
    #[error("group {group} is already on {active}, its best usable endpoint")]
    AlreadyBest {
        /// The group.
        group: String,
        /// Its active endpoint.
        active: String,
    },
}

/// The rules' state. See the module doc.
#[derive(Debug, Default)]
pub struct Monitor {
    rules: AlertRules,
    groups: BTreeMap<String, OmaGroup>,
    endpoints: HashMap<String, Endpoint>,
    /// Failed checks in a row per alert key (agent-side checks).
    streaks: HashMap<String, u32>,
    /// Keys of firing alerts.
    firing: HashSet<String>,
    agents: HashMap<String, AgentState>,
    /// Agent -> (profile -> endpoint) from its last heartbeat.
    placement: HashMap<String, BTreeMap<String, String>>,
}

impl Monitor {
    /// Rules with `rules`.
    pub fn new(rules: AlertRules) -> Self {
        Monitor {
            rules,
            ..Default::default()
        }
    }

    /// Alerts that were firing when the coordinator stopped: they resolve by the same rules.
    pub fn restore_firing(&mut self, kind: AlertKind, subject: &str) {
        self.firing.insert(alert_key(kind, subject));
        if kind == AlertKind::OmaDown {
            // Down until a check passes: no failback onto it meanwhile.
            self.endpoints.entry(subject.to_string()).or_default().down = true;
        }
    }

    /// Whether an alert with this key is firing.
    pub fn is_firing(&self, kind: AlertKind, subject: &str) -> bool {
        self.firing.contains(&alert_key(kind, subject))
    }

    /// The groups as stored (after any change by the operator or by an [`Action::SetActive`]).
    pub fn set_groups(&mut self, groups: Vec<OmaGroup>) {
        self.groups = groups.into_iter().map(|g| (g.name.clone(), g)).collect();
    }

    /// The groups as the rules see them.
    pub fn groups(&self) -> impl Iterator<Item = &OmaGroup> {
        self.groups.values()
    }

    fn threshold_for(&self, endpoint: &str) -> u32 {
        self.groups
            .values()
            .filter(|g| g.endpoints.iter().any(|e| e == endpoint))
            .map(|g| g.threshold)
            .min()
            .unwrap_or(self.rules.threshold)
    }

    fn probed(&self, endpoint: &str) -> bool {
        self.groups
            .values()
            .any(|g| g.probe && g.endpoints.iter().any(|e| e == endpoint))
    }

    fn is_down(&self, endpoint: &str) -> bool {
        self.endpoints.get(endpoint).is_some_and(|e| e.down)
    }

    /// A probe result (TCP connect plus SSH banner).
    pub fn probe(
        &mut self,
        endpoint: &str,
        result: Result<Duration, String>,
        now: Instant,
    ) -> Vec<Action> {
        let ok = result.is_ok();
        {
            let e = self.endpoints.entry(endpoint.to_string()).or_default();
            match &result {
                Ok(latency) => {
                    e.last_latency = Some(*latency);
                    e.last_detail = "SSH banner received".into();
                }
                Err(why) => e.last_detail = why.clone(),
            }
        }
        self.endpoint_check(endpoint, ok, now)
    }

    /// One check of an endpoint, from a probe or (groups without probes) an agent's report.
    fn endpoint_check(&mut self, endpoint: &str, ok: bool, now: Instant) -> Vec<Action> {
        let threshold = self.threshold_for(endpoint);
        let key = alert_key(AlertKind::OmaDown, endpoint);
        let mut actions = Vec::new();
        let e = self.endpoints.entry(endpoint.to_string()).or_default();
        e.last_ok = Some(ok);
        if ok {
            e.fails = 0;
            e.down = false;
            e.healthy_since.get_or_insert(now);
            if self.firing.remove(&key) {
                actions.push(Action::Resolve {
                    kind: AlertKind::OmaDown,
                    subject: endpoint.to_string(),
                });
            }
        } else {
            e.fails = e.fails.saturating_add(1);
            e.healthy_since = None;
            if e.fails >= threshold && !e.down {
                e.down = true;
            }
            if e.down && !self.firing.contains(&key) {
                let affected = self.agents_on(endpoint, now);
                let e = &self.endpoints[endpoint];
                actions.push(Action::Fire {
                    kind: AlertKind::OmaDown,
                    subject: endpoint.to_string(),
                    summary: format!(
                        "OMA endpoint {endpoint} down: {} failed checks in a row ({}); {} agent(s) on it",
                        e.fails,
                        e.last_detail,
                        affected.len()
                    ),
                    affected,
                });
                self.firing.insert(key);
            }
        }
        actions.extend(self.decide(now));
        actions
    }

    /// Agents seen on, or failing against, `endpoint` recently.
    fn agents_on(&self, endpoint: &str, now: Instant) -> Vec<String> {
        let Some(e) = self.endpoints.get(endpoint) else {
            return Vec::new();
        };
        let recent = |t: &Instant| now.saturating_duration_since(*t) <= SEEN_WINDOW;
        let mut v: Vec<String> = e
            .seen
            .iter()
            .chain(e.failing.iter())
            .filter(|(_, t)| recent(t))
            .map(|(a, _)| a.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Failover and failback for every group.
    pub fn decide(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let g = &self.groups[&name];
            let Some(active) = g.active().map(str::to_string) else {
                continue;
            };
            let usable: Vec<&String> = g
                .endpoints
                .iter()
                .filter(|e| !g.drained.contains(*e) && !self.is_down(e))
                .collect();
            let move_to = if g.drained.contains(&active) || self.is_down(&active) {
                usable.first().map(|e| {
                    let why = if g.drained.contains(&active) {
                        format!("{active} drained")
                    } else {
                        format!("{active} down")
                    };
                    ((*e).clone(), format!("failover: {why}"))
                })
            } else if g.pinned {
                // An operator moved it: it stays until `oma failback`.
                None
            } else {
                let prio = |e: &str| g.endpoints.iter().position(|x| x == e);
                usable
                    .first()
                    .filter(|e| prio(e) < prio(&active))
                    .and_then(|e| {
                        let since = self.endpoints.get(*e)?.healthy_since?;
                        (now.saturating_duration_since(since) >= g.failback_after).then(|| {
                            (
                                (*e).clone(),
                                format!(
                                    "failback: {e} healthy for {}",
                                    humantime::format_duration(g.failback_after)
                                ),
                            )
                        })
                    })
            };
            let pinned = g.pinned;
            if let Some((endpoint, reason)) = move_to
                && endpoint != active
            {
                if let Some(g) = self.groups.get_mut(&name) {
                    g.active = Some(endpoint.clone());
                }
                actions.push(Action::SetActive {
                    group: name,
                    endpoint,
                    reason,
                    pinned,
                });
            }
        }
        actions
    }

    /// `tunnelfleet oma failover GROUP`: the next usable endpoint after the active one.
    pub fn failover(&mut self, group: &str) -> Result<Action, Refusal> {
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| Refusal::NoGroup(group.to_string()))?;
        let active = g.active().unwrap_or_default().to_string();
        let at = g.endpoints.iter().position(|e| *e == active).unwrap_or(0);
        let n = g.endpoints.len();
        let target = (1..n)
            .map(|i| &g.endpoints[(at + i) % n])
            .find(|e| !g.drained.contains(*e) && !self.is_down(e))
            .cloned()
            .ok_or_else(|| Refusal::NoOtherEndpoint {
                group: group.to_string(),
                active: active.clone(),
            })?;
        self.move_group(
            group,
            target,
            format!("operator failover from {active}"),
            true,
        )
    }

    /// `tunnelfleet oma failback GROUP`: the highest-priority usable endpoint, now.
    pub fn failback(&mut self, group: &str) -> Result<Action, Refusal> {
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| Refusal::NoGroup(group.to_string()))?;
        let active = g.active().unwrap_or_default().to_string();
        let target = g
            .endpoints
            .iter()
            .find(|e| !g.drained.contains(*e) && !self.is_down(e))
            .cloned()
            .ok_or_else(|| Refusal::NoUsableEndpoint(group.to_string()))?;
        if target == active && !g.pinned {
            return Err(Refusal::AlreadyBest {
                group: group.to_string(),
                active,
            });
        }
        self.move_group(group, target, "operator failback".into(), false)
    }

    fn move_group(
        &mut self,
        group: &str,
        endpoint: String,
        reason: String,
        pinned: bool,
    ) -> Result<Action, Refusal> {
        if let Some(g) = self.groups.get_mut(group) {
            g.active = Some(endpoint.clone());
            g.pinned = pinned;
        }
        Ok(Action::SetActive {
            group: group.to_string(),
            endpoint,
            reason,
            pinned,
        })
    }

    /// An agent said hello (connected): it is online, and a new start time is a restart.
    pub fn hello(&mut self, agent: &str, started_unix_ms: u64, now: Instant) -> Vec<Action> {
        let mut actions = self.agent_online(agent);
        let window = self.rules.restart_window;
        let limit = self.rules.restarts;
        let st = self.agents.entry(agent.to_string()).or_default();
        if st.started_unix_ms.is_some_and(|s| s != started_unix_ms) {
            st.restarts.push_back(now);
        }
        st.started_unix_ms = Some(started_unix_ms);
        // A new process has new counters: take a fresh baseline.
        st.baseline = false;
        while st
            .restarts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            st.restarts.pop_front();
        }
        let n = st.restarts.len();
        let key = alert_key(AlertKind::AgentRestarting, agent);
        if n == 0 && self.firing.remove(&key) {
            // A reconnect without a restart after a quiet window ([`Monitor::tick`] skips
            // agents without recent restarts).
            actions.push(Action::Resolve {
                kind: AlertKind::AgentRestarting,
                subject: agent.to_string(),
            });
        } else if n as u32 >= limit && limit > 0 && self.firing.insert(key) {
            actions.push(Action::Fire {
                kind: AlertKind::AgentRestarting,
                subject: agent.to_string(),
                summary: format!(
                    "agent {agent} restarted {n} times within {}",
                    humantime::format_duration(window)
                ),
                affected: vec![agent.to_string()],
            });
        }
        actions
    }

    /// The heartbeat sweeper found `agent` silent for three intervals.
    pub fn agent_offline(&mut self, agent: &str, missed: u32) -> Vec<Action> {
        let key = alert_key(AlertKind::AgentOffline, agent);
        if !self.firing.insert(key) {
            return Vec::new();
        }
        vec![Action::Fire {
            kind: AlertKind::AgentOffline,
            subject: agent.to_string(),
            summary: format!("agent {agent} offline: {missed} heartbeats missed in a row"),
            affected: vec![agent.to_string()],
        }]
    }

    /// `agent` is heard from again.
    pub fn agent_online(&mut self, agent: &str) -> Vec<Action> {
        if self
            .firing
            .remove(&alert_key(AlertKind::AgentOffline, agent))
        {
            vec![Action::Resolve {
                kind: AlertKind::AgentOffline,
                subject: agent.to_string(),
            }]
        } else {
            Vec::new()
        }
    }

    /// Periodic: failback clocks and restart windows.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = self.decide(now);
        let window = self.rules.restart_window;
        // Runs four times a second over every agent: only agents with recent restarts cost
        // anything.
        for (agent, st) in &mut self.agents {
            if st.restarts.is_empty() {
                continue;
            }
            while st
                .restarts
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > window)
            {
                st.restarts.pop_front();
            }
            if st.restarts.is_empty()
                && self
                    .firing
                    .remove(&alert_key(AlertKind::AgentRestarting, agent))
            {
                actions.push(Action::Resolve {
                    kind: AlertKind::AgentRestarting,
                    subject: agent.clone(),
                });
            }
        }
        actions
    }

    /// Counts one check of an agent-side key; returns Fire/Resolve as the count crosses.
    fn agent_check(
        &mut self,
        kind: AlertKind,
        subject: String,
        failed: u32,
        hold: bool,
        summary: impl FnOnce(u32) -> String,
        agent: &str,
    ) -> Option<Action> {
        let key = alert_key(kind, &subject);
        if failed == 0 {
            self.streaks.remove(&key);
            return self
                .firing
                .remove(&key)
                .then_some(Action::Resolve { kind, subject });
        }
        let n = self.streaks.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(failed);
        let n = *n;
        if n >= self.rules.threshold && !hold && !self.firing.contains(&key) {
            self.firing.insert(key);
            return Some(Action::Fire {
                kind,
                subject,
                summary: summary(n),
                affected: vec![agent.to_string()],
            });
        }
        None
    }

    /// A heartbeat: placement, endpoint evidence, and the agent's own checks.
    pub fn heartbeat(&mut self, agent: &str, hb: &Heartbeat, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut placement = BTreeMap::new();
        let st = self.agents.entry(agent.to_string()).or_default();
        let had_baseline = st.baseline;
        st.baseline = true;
        let mut evidence: Vec<(String, bool)> = Vec::new();
        let mut auth_failures: HashMap<String, u32> = HashMap::new();
        let mut events = Vec::new();
        for p in &hb.profiles {
            placement.insert(p.name.clone(), p.active_endpoint.clone());
            if p.state == TunnelState::Up {
                evidence.push((p.active_endpoint.clone(), true));
            }
            for e in &p.errors {
                let k = (p.name.clone(), e.endpoint.clone(), e.kind);
                let prev = st.errors.insert(k, e.count);
                let delta = match prev {
                    Some(prev) if e.count >= prev => e.count - prev,
                    _ if had_baseline => e.count,
                    _ => 0,
                };
                if delta == 0 {
                    continue;
                }
                if e.kind.implicates_endpoint() {
                    evidence.push((e.endpoint.clone(), false));
                }
                if e.kind == ErrorKind::Auth {
                    *auth_failures.entry(p.name.clone()).or_default() += delta as u32;
                }
            }
            let seen = st.failover_seen.entry(p.name.clone()).or_insert(0);
            for r in p.failover_log.iter().filter(|r| r.at_unix_ms > *seen) {
                events.push(format!(
                    "agent {agent} profile {} moved on its own from {} to {}: {}",
                    p.name, r.from, r.to, r.reason
                ));
            }
            if let Some(last) = p.failover_log.last() {
                *seen = (*seen).max(last.at_unix_ms);
            }
        }
        actions.extend(events.into_iter().map(Action::Event));
        for (endpoint, ok) in evidence {
            let e = self.endpoints.entry(endpoint.clone()).or_default();
            if ok {
                e.seen.insert(agent.to_string(), now);
            } else {
                e.failing.insert(agent.to_string(), now);
            }
            // Groups without probes judge their endpoints by the agents' reports.
            if !self.probed(&endpoint)
                && self
                    .groups
                    .values()
                    .any(|g| g.endpoints.contains(&endpoint))
            {
                actions.extend(self.endpoint_check(&endpoint, ok, now));
            }
        }
        for p in &hb.profiles {
            let subject = format!("{agent}/{}", p.name);
            // SSH authentication: every refused key is a failed check; an established
            // session passes.
            let refused = auth_failures.get(&p.name).copied().unwrap_or(0);
            if refused > 0 || p.state == TunnelState::Up {
                let endpoint = p.active_endpoint.clone();
                actions.extend(self.agent_check(
                    AlertKind::SshAuth,
                    subject.clone(),
                    refused,
                    false,
                    |n| format!("agent {agent} profile {}: {endpoint} refused its key {n} times in a row", p.name),
                    agent,
                ));
            }
            // Tunnel health: the agent counts its own consecutive failures; held while the
            // endpoint itself is suspect (the OMA incident covers it).
            let hold = self
                .endpoints
                .get(&p.active_endpoint)
                .is_some_and(Endpoint::suspect);
            // A tunnel that is not up counts as failing too (no health check can run): one
            // failed check per heartbeat.
            let down_key = format!("down:{subject}");
            let down_for =
                if !matches!(p.state, TunnelState::Connecting | TunnelState::Backoff) || hold {
                    self.streaks.remove(&down_key);
                    0
                } else {
                    let n = self.streaks.entry(down_key).or_insert(0);
                    *n = n.saturating_add(1);
                    *n
                };
            let failing = p.consecutive_failures.max(down_for);
            let key = alert_key(AlertKind::TunnelHealth, &subject);
            if failing >= self.rules.threshold && !hold && !self.firing.contains(&key) {
                self.firing.insert(key);
                let detail = match p.health.last() {
                    Some(h) => h.detail.clone(),
                    None => p
                        .last_error
                        .clone()
                        .unwrap_or_else(|| format!("{:?}", p.state)),
                };
                actions.push(Action::Fire {
                    kind: AlertKind::TunnelHealth,
                    subject: subject.clone(),
                    summary: format!(
                        "agent {agent} profile {}: tunnel through {} failing for {failing} checks in a row ({detail})",
                        p.name, p.active_endpoint
                    ),
                    affected: vec![agent.to_string()],
                });
            } else if failing == 0 && self.firing.remove(&key) {
                actions.push(Action::Resolve {
                    kind: AlertKind::TunnelHealth,
                    subject: subject.clone(),
                });
            }
            // Forwards that cannot bind (or that the server refuses): one check per heartbeat.
            for f in &p.forwards {
                let subject = format!("{agent}/{}/{}", p.name, f.spec);
                let failed = u32::from(f.state == ForwardState::Retrying);
                if failed == 0 && !matches!(f.state, ForwardState::Active | ForwardState::Listening)
                {
                    continue;
                }
                let detail = f.detail.clone().unwrap_or_default();
                actions.extend(self.agent_check(
                    AlertKind::PortConflict,
                    subject,
                    failed,
                    false,
                    |n| format!("agent {agent} profile {}: forward {} failing for {n} heartbeats: {detail}", p.name, f.spec),
                    agent,
                ));
            }
        }
        self.placement.insert(agent.to_string(), placement);
        actions
    }

    /// Every group endpoint, for `tunnelfleet oma list`.
    pub fn view(&self, now: Instant) -> Vec<EndpointView> {
        let mut out = Vec::new();
        for g in self.groups.values() {
            let active = g.active().unwrap_or_default();
            for (priority, ep) in g.endpoints.iter().enumerate() {
                let e = self.endpoints.get(ep);
                let state = match e {
                    Some(e) if e.down => "down",
                    Some(e) if e.last_ok.is_some() => "up",
                    _ => "unknown",
                };
                let mut agents: Vec<String> = self
                    .placement
                    .iter()
                    .filter(|(_, p)| p.values().any(|x| x == ep))
                    .map(|(a, _)| a.clone())
                    .collect();
                agents.sort();
                out.push(EndpointView {
                    group: g.name.clone(),
                    endpoint: ep.clone(),
                    priority,
                    active: ep == active,
                    drained: g.drained.contains(ep),
                    state: state.into(),
                    consecutive_failures: e.map(|e| e.fails).unwrap_or(0),
                    healthy_for_s: e
                        .and_then(|e| e.healthy_since)
                        .map(|s| now.saturating_duration_since(s).as_secs()),
                    last_detail: e.map(|e| e.last_detail.clone()).unwrap_or_default(),
                    last_latency_ms: e
                        .and_then(|e| e.last_latency)
                        .map(|l| l.as_secs_f64() * 1000.0),
                    agents,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnelfleet_protocol::{ErrorCount, ProfileReport};

    const A: &str = "10.0.0.1:22";
    const B: &str = "10.0.0.2:22";

    fn group(failback: Duration) -> OmaGroup {
        OmaGroup {
            name: "oma".into(),
            endpoints: vec![A.into(), B.into()],
            probe: true,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(800),
            threshold: 3,
            failback_after: failback,
            active: None,
            drained: Default::default(),
            pinned: false,
        }
    }

    fn monitor() -> Monitor {
        let mut m = Monitor::new(AlertRules::default());
        m.set_groups(vec![group(Duration::from_secs(300))]);
        m
    }

    fn report(endpoint: &str, state: TunnelState, health_failures: u32) -> ProfileReport {
        ProfileReport {
            name: "p".into(),
            state,
            active_endpoint: endpoint.into(),
            up_since_unix_ms: None,
            reconnects: 0,
            failovers: 0,
            last_error: None,
            consecutive_failures: health_failures,
            health: vec![],
            forwards: vec![],
            errors: vec![],
            failover_log: vec![],
        }
    }

    fn hb(profiles: Vec<ProfileReport>) -> Heartbeat {
        Heartbeat {
            seq: 0,
            sent_unix_ms: 0,
            profiles,
        }
    }

    fn fail() -> Result<Duration, String> {
        Err("no SSH banner within 800ms".into())
    }

    fn pass() -> Result<Duration, String> {
        Ok(Duration::from_millis(1))
    }

    fn fired(actions: &[Action], kind: AlertKind) -> Vec<&Action> {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Fire { kind: k, .. } if *k == kind))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn three_failed_probes_raise_one_incident_naming_the_agents_and_a_pass_resolves_it() {
        let mut m = monitor();
        let now = Instant::now();
        for agent in ["vma-1", "vma-2"] {
            m.heartbeat(agent, &hb(vec![report(A, TunnelState::Up, 0)]), now);
        }
        // Two failures and a pass: the count starts again.
        assert!(m.probe(A, fail(), now).is_empty());
        assert!(m.probe(A, fail(), now).is_empty());
        assert!(m.probe(A, pass(), now).is_empty());
        assert!(m.probe(A, fail(), now).is_empty());
        assert!(m.probe(A, fail(), now).is_empty());
        // Meanwhile the agents' health checks fail too: held, the incident covers them.
        for agent in ["vma-1", "vma-2"] {
            let a = m.heartbeat(agent, &hb(vec![report(A, TunnelState::Up, 5)]), now);
            assert!(a.is_empty(), "{a:?}");
        }
        let actions = m.probe(A, fail(), now);
        let incidents = fired(&actions, AlertKind::OmaDown);
        assert_eq!(incidents.len(), 1, "{actions:?}");
        let Action::Fire { affected, .. } = incidents[0] else {
            unreachable!()
        };
        assert_eq!(affected, &["vma-1", "vma-2"]);
        // And the group fails over to the standby in the same step.
        assert!(actions.contains(&Action::SetActive {
            group: "oma".into(),
            endpoint: B.into(),
            reason: format!("failover: {A} down"),
            pinned: false,
        }));
        // More failures: no second incident, no second move.
        assert!(m.probe(A, fail(), now).is_empty());
        let resolved = m.probe(A, pass(), now);
        assert_eq!(
            resolved,
            vec![Action::Resolve {
                kind: AlertKind::OmaDown,
                subject: A.into()
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failback_waits_for_a_stable_period_and_a_bounce_restarts_the_clock() {
        let mut m = Monitor::new(AlertRules::default());
        m.set_groups(vec![group(Duration::from_secs(60))]);
        for _ in 0..3 {
            m.probe(A, fail(), Instant::now());
        }
        assert_eq!(m.groups().next().unwrap().active(), Some(B));
        m.probe(A, pass(), Instant::now());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(
            m.tick(Instant::now()).is_empty(),
            "failback before the period"
        );
        // The primary bounces: one failed probe (not enough to be down) restarts the clock.
        assert!(m.probe(A, fail(), Instant::now()).is_empty());
        m.probe(A, pass(), Instant::now());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(
            m.tick(Instant::now()).is_empty(),
            "flapped back after a bounce"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            m.tick(Instant::now()),
            vec![Action::SetActive {
                group: "oma".into(),
                endpoint: A.into(),
                reason: format!("failback: {A} healthy for 1m"),
                pinned: false,
            }]
        );
        assert!(m.tick(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn one_agent_failing_against_a_healthy_oma_gets_its_own_alert() {
        let mut m = monitor();
        let now = Instant::now();
        m.probe(A, pass(), now);
        let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 2)]), now);
        assert!(a.is_empty());
        let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 3)]), now);
        assert_eq!(fired(&a, AlertKind::TunnelHealth).len(), 1, "{a:?}");
        let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 4)]), now);
        assert!(a.is_empty(), "fired twice: {a:?}");
        let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 0)]), now);
        assert_eq!(
            a,
            vec![Action::Resolve {
                kind: AlertKind::TunnelHealth,
                subject: "vma-1/p".into()
            }]
        );
        // A tunnel that cannot come up counts as failing, one check per heartbeat.
        for i in 0..3 {
            let a = m.heartbeat("vma-2", &hb(vec![report(A, TunnelState::Backoff, 0)]), now);
            assert_eq!(
                fired(&a, AlertKind::TunnelHealth).len(),
                usize::from(i == 2)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refused_keys_raise_ssh_auth_and_a_session_resolves_it() {
        let mut m = monitor();
        let now = Instant::now();
        let with_auth = |count: u64, state| {
            let mut r = report(A, state, 0);
            r.errors = vec![ErrorCount {
                endpoint: A.into(),
                kind: ErrorKind::Auth,
                count,
                last_detail: "refused".into(),
                last_unix_ms: 0,
            }];
            hb(vec![r])
        };
        // The first heartbeat is a baseline: old failures are not new checks.
        assert!(
            m.heartbeat("vma-1", &with_auth(7, TunnelState::Backoff), now)
                .is_empty()
        );
        let a = m.heartbeat("vma-1", &with_auth(9, TunnelState::Backoff), now);
        assert!(fired(&a, AlertKind::SshAuth).is_empty());
        let a = m.heartbeat("vma-1", &with_auth(10, TunnelState::Backoff), now);
        assert_eq!(fired(&a, AlertKind::SshAuth).len(), 1, "{a:?}");
        let a = m.heartbeat("vma-1", &with_auth(10, TunnelState::Up), now);
        assert!(a.contains(&Action::Resolve {
            kind: AlertKind::SshAuth,
            subject: "vma-1/p".into()
        }));
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_within_the_window_raise_an_alert_that_resolves_after_a_quiet_window() {
        let mut m = monitor();
        assert!(m.hello("vma-1", 1, Instant::now()).is_empty());
        for started in 2..4 {
            tokio::time::advance(Duration::from_secs(30)).await;
            assert!(m.hello("vma-1", started, Instant::now()).is_empty());
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        let a = m.hello("vma-1", 4, Instant::now());
        assert_eq!(fired(&a, AlertKind::AgentRestarting).len(), 1);
        // A reconnect of the same process is not a restart.
        assert!(m.hello("vma-1", 4, Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(601)).await;
        assert_eq!(
            m.tick(Instant::now()),
            vec![Action::Resolve {
                kind: AlertKind::AgentRestarting,
                subject: "vma-1".into()
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn offline_fires_once_and_a_hello_resolves_it() {
        let mut m = monitor();
        assert_eq!(
            fired(&m.agent_offline("vma-1", 3), AlertKind::AgentOffline).len(),
            1
        );
        assert!(m.agent_offline("vma-1", 3).is_empty());
        assert!(
            m.hello("vma-1", 1, Instant::now())
                .contains(&Action::Resolve {
                    kind: AlertKind::AgentOffline,
                    subject: "vma-1".into()
                })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_failover_is_not_undone_by_automatic_failback() {
        let mut m = Monitor::new(AlertRules::default());
        m.set_groups(vec![group(Duration::from_secs(60))]);
        m.probe(A, pass(), Instant::now());
        assert!(matches!(
            m.failover("oma"),
            Ok(Action::SetActive { pinned: true, .. })
        ));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(
            m.tick(Instant::now()).is_empty(),
            "failed back over an operator's move"
        );
        // A down standby still fails over, pinned or not.
        for _ in 0..3 {
            m.probe(B, fail(), Instant::now());
        }
        assert_eq!(m.groups().next().unwrap().active(), Some(A));
    }

    #[tokio::test(start_paused = true)]
    async fn operator_moves_skip_drained_and_down_endpoints() {
        let mut m = monitor();
        assert!(
            matches!(m.failover("oma"), Ok(Action::SetActive { endpoint, .. }) if endpoint == B)
        );
        assert!(
            matches!(m.failback("oma"), Ok(Action::SetActive { endpoint, .. }) if endpoint == A)
        );
        assert!(m.failback("oma").is_err(), "already on the best endpoint");
        for _ in 0..3 {
            m.probe(B, fail(), Instant::now());
        }
        assert!(
            m.failover("oma").is_err(),
            "the only other endpoint is down"
        );
        assert!(m.failover("nope").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_incident_restored_after_a_restart_resolves_on_the_first_pass() {
        let mut m = monitor();
        m.restore_firing(AlertKind::OmaDown, A);
        assert_eq!(
            m.probe(A, pass(), Instant::now()),
            vec![Action::Resolve {
                kind: AlertKind::OmaDown,
                subject: A.into()
            }]
        );
    }
}
