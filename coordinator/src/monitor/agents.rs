//! What the rules learn from agents: hellos (a new start time is a restart), the offline
//! sweep, and heartbeats — where each profile runs, evidence about its endpoint from the
//! session error counters, its own health checks, its forwards.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tokio::time::Instant;
use tunnelfleet_protocol::{ErrorKind, ForwardState, Heartbeat, ProfileReport, TunnelState};

use super::endpoints::Endpoint;
use super::{Action, Monitor};
use crate::store::{AlertKind, alert_key};

/// How long an agent's report about an endpoint counts toward a quorum (groups without probes).
const EVIDENCE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// What is remembered per agent between heartbeats.
#[derive(Debug, Default)]
pub(super) struct AgentState {
    started_unix_ms: Option<u64>,
    restarts: VecDeque<Instant>,
    /// Error counters from the previous heartbeat: (profile, endpoint, kind) -> count.
    errors: HashMap<(String, String, ErrorKind), u64>,
    /// Newest failover record already logged, per profile.
    failover_seen: HashMap<String, u64>,
    /// Whether `errors` holds a baseline yet.
    baseline: bool,
}

/// What one heartbeat's counters say, before any rule runs.
#[derive(Default)]
struct Reading {
    /// Where each profile runs.
    placement: BTreeMap<String, String>,
    /// (endpoint, the check passed) per piece of evidence.
    evidence: Vec<(String, bool)>,
    /// Refused keys per profile since the previous heartbeat.
    auth_failures: HashMap<String, u32>,
    /// Failovers the agent made on its own, for the event log.
    events: Vec<String>,
}

impl AgentState {
    /// Reads a heartbeat against the previous one: session error counters are monotonic, so
    /// the difference is what happened since (nothing is counted twice, and a lost heartbeat
    /// loses nothing).
    fn read(&mut self, agent: &str, hb: &Heartbeat) -> Reading {
        let had_baseline = self.baseline;
        self.baseline = true;
        let mut r = Reading::default();
        for p in &hb.profiles {
            r.placement
                .insert(p.name.clone(), p.active_endpoint.clone());
            if p.state == TunnelState::Up {
                r.evidence.push((p.active_endpoint.clone(), true));
            }
            for e in &p.errors {
                let k = (p.name.clone(), e.endpoint.clone(), e.kind);
                let prev = self.errors.insert(k, e.count);
                let delta = match prev {
                    Some(prev) if e.count >= prev => e.count - prev,
                    _ if had_baseline => e.count,
                    _ => 0,
                };
                if delta == 0 {
                    continue;
                }
                if e.kind.implicates_endpoint() {
                    r.evidence.push((e.endpoint.clone(), false));
                }
                if e.kind == ErrorKind::Auth {
                    *r.auth_failures.entry(p.name.clone()).or_default() += delta as u32;
                }
            }
            let seen = self.failover_seen.entry(p.name.clone()).or_insert(0);
            for f in p.failover_log.iter().filter(|f| f.at_unix_ms > *seen) {
                r.events.push(format!(
                    "agent {agent} profile {} moved on its own from {} to {}: {}",
                    p.name, f.from, f.to, f.reason
                ));
            }
            if let Some(last) = p.failover_log.last() {
                *seen = (*seen).max(last.at_unix_ms);
            }
        }
        // Only what this heartbeat still reports is remembered: profiles and endpoints that
        // went (a retargeted group, a removed profile) take their counters with them.
        self.errors.retain(|(name, endpoint, kind), _| {
            hb.profiles.iter().any(|p| {
                &p.name == name
                    && p.errors
                        .iter()
                        .any(|e| &e.endpoint == endpoint && e.kind == *kind)
            })
        });
        self.failover_seen
            .retain(|name, _| hb.profiles.iter().any(|p| &p.name == name));
        r
    }

    /// Counters and marks remembered (tests: the state stays as small as the last report).
    #[cfg(test)]
    pub(super) fn remembered(&self) -> usize {
        self.errors.len() + self.failover_seen.len()
    }
}

impl Monitor {
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
        // What its tunnels showed is no evidence of anything any more.
        self.forget_tunnels(agent);
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
    /// Periodic: agents' tunnels as evidence against their endpoints, failback clocks and
    /// restart windows.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = self.judge_tunnels(now);
        actions.extend(self.decide(now));
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

    /// A heartbeat: placement, endpoint evidence, and the agent's own checks.
    pub fn heartbeat(&mut self, agent: &str, hb: &Heartbeat, now: Instant) -> Vec<Action> {
        let reading = self
            .agents
            .entry(agent.to_string())
            .or_default()
            .read(agent, hb);
        let mut actions: Vec<Action> = reading.events.into_iter().map(Action::Event).collect();
        for (endpoint, ok) in reading.evidence {
            actions.extend(self.endpoint_evidence(agent, &endpoint, ok, now));
        }
        for p in &hb.profiles {
            // A new agent's certificate logins are refused until the OMAs list it.
            if !self.is_onboarding(agent, &p.name, now) {
                let refused = reading.auth_failures.get(&p.name).copied().unwrap_or(0);
                actions.extend(self.ssh_auth_check(agent, p, refused));
                actions.extend(self.tunnel_health_check(agent, p));
            }
            actions.extend(self.forward_checks(agent, p));
        }
        self.placement.insert(agent.to_string(), reading.placement);
        self.observe_tunnels(agent, &hb.profiles, now);
        actions
    }

    /// An agent's evidence about an endpoint: it is on it (`ok`) or failing against it.
    /// Groups without probes judge their endpoints by these reports, and only with a quorum:
    /// a check fails when the group's `quorum` agents failed against the endpoint recently
    /// (each more recently than it was seen on it), and passes when that many are on it. One
    /// agent — cut off on its own, or stolen and lying — moves nothing and resolves nothing.
    fn endpoint_evidence(
        &mut self,
        agent: &str,
        endpoint: &str,
        ok: bool,
        now: Instant,
    ) -> Vec<Action> {
        {
            let e = self.endpoints.entry(endpoint.to_string()).or_default();
            if ok {
                e.seen.insert(agent.to_string(), now);
            } else {
                e.failing.insert(agent.to_string(), now);
            }
        }
        if self.probed(endpoint) {
            return Vec::new();
        }
        let Some(quorum) = self
            .groups
            .values()
            .filter(|g| g.endpoints.iter().any(|x| x == endpoint))
            .map(|g| g.quorum.max(2))
            .max()
        else {
            return Vec::new();
        };
        let recent = |at: &Instant| now.saturating_duration_since(*at) <= EVIDENCE_WINDOW;
        let Some(e) = self.endpoints.get(endpoint) else {
            return Vec::new();
        };
        let (seen, failing) = (&e.seen, &e.failing);
        let agreeing = if ok {
            seen.iter()
                .filter(|(a, at)| recent(at) && failing.get(*a).is_none_or(|f| f <= *at))
                .count()
        } else {
            failing
                .iter()
                .filter(|(a, at)| recent(at) && seen.get(*a).is_none_or(|s| s < *at))
                .count()
        };
        if (agreeing as u32) < quorum {
            return Vec::new();
        }
        self.endpoint_check(endpoint, ok, now)
    }

    /// SSH authentication: every refused key is a failed check; an established session passes.
    fn ssh_auth_check(&mut self, agent: &str, p: &ProfileReport, refused: u32) -> Option<Action> {
        if refused == 0 && p.state != TunnelState::Up {
            return None;
        }
        let endpoint = p.active_endpoint.clone();
        self.agent_check(
            AlertKind::SshAuth,
            format!("{agent}/{}", p.name),
            refused,
            false,
            |n| {
                format!(
                    "agent {agent} profile {}: {endpoint} refused its key {n} times in a row",
                    p.name
                )
            },
            agent,
        )
    }

    /// Tunnel health: the agent counts its own consecutive failures; a tunnel that is not up
    /// counts as failing too (no health check can run), one failed check per heartbeat. Held
    /// while the endpoint itself is suspect: the OMA incident covers it.
    fn tunnel_health_check(&mut self, agent: &str, p: &ProfileReport) -> Option<Action> {
        let subject = format!("{agent}/{}", p.name);
        let hold = self
            .endpoints
            .get(&p.active_endpoint)
            .is_some_and(Endpoint::suspect);
        let down_key = format!("down:{subject}");
        let down_for = if !matches!(p.state, TunnelState::Connecting | TunnelState::Backoff) || hold
        {
            self.streaks.remove(&down_key);
            0
        } else {
            self.streaks.entry(down_key).or_default().record(1)
        };
        // Left its group's active endpoint for its health (its latest move, made because its
        // check failed there): failing until it is back on the group's choice, however well
        // the check passes where it went — its appliance is off the OMA the fleet is on.
        let left_for_health = p.failover_log.last().filter(|m| {
            m.for_health()
                && self.groups.values().any(|g| {
                    g.endpoints.contains(&p.active_endpoint)
                        && g.active() == Some(m.from.as_str())
                        && m.from != p.active_endpoint
                })
        });
        let away = if left_for_health.is_some() {
            self.rules.threshold
        } else {
            0
        };
        let failing = p.consecutive_failures.max(down_for).max(away);
        let key = alert_key(AlertKind::TunnelHealth, &subject);
        if super::streak::reached(failing, self.rules.threshold)
            && !hold
            && !self.firing.contains(&key)
        {
            self.firing.insert(key);
            let detail = match p.health.last() {
                Some(h) if !h.ok => h.detail.clone(),
                _ => p
                    .last_error
                    .clone()
                    .unwrap_or_else(|| format!("{:?}", p.state)),
            };
            let summary = match left_for_health {
                Some(m) => format!(
                    "agent {agent} profile {}: tunnel through {}, its group's active endpoint, failed its check ({}); on {} until the check passes there again",
                    p.name, m.from, m.reason, p.active_endpoint
                ),
                None => format!(
                    "agent {agent} profile {}: tunnel through {} failing for {failing} checks in a row ({detail})",
                    p.name, p.active_endpoint
                ),
            };
            return Some(Action::Fire {
                kind: AlertKind::TunnelHealth,
                summary,
                subject,
                affected: vec![agent.to_string()],
            });
        }
        if failing == 0 && self.firing.remove(&key) {
            return Some(Action::Resolve {
                kind: AlertKind::TunnelHealth,
                subject,
            });
        }
        None
    }

    /// Forwards that cannot bind (or that the server refuses): one check per heartbeat.
    fn forward_checks(&mut self, agent: &str, p: &ProfileReport) -> Vec<Action> {
        let mut actions = Vec::new();
        for f in &p.forwards {
            let subject = format!("{agent}/{}/{}", p.name, f.spec);
            let failed = u32::from(f.state == ForwardState::Retrying);
            if failed == 0 && !matches!(f.state, ForwardState::Active | ForwardState::Listening) {
                continue;
            }
            let detail = f.detail.clone().unwrap_or_default();
            let (cause, fix) = port_conflict_advice(&f.spec, &p.active_endpoint);
            actions.extend(self.agent_check(
                AlertKind::PortConflict,
                subject,
                failed,
                false,
                |n| {
                    format!(
                        "agent {agent} profile {}: forward {} failing for {n} heartbeats: {detail}. Likely cause: {cause}. Fix: {fix}",
                        p.name, f.spec
                    )
                },
                agent,
            ));
        }
        actions
    }
}

/// The likely cause of a forward that cannot bind, and what fixes it, for the alert.
fn port_conflict_advice(spec: &str, endpoint: &str) -> (String, String) {
    let port = tunnelfleet_protocol::forward::ForwardSpec::parse(spec)
        .ok()
        .and_then(|f| match f {
            tunnelfleet_protocol::forward::ForwardSpec::Remote { port, .. } => Some((true, port)),
            other => other.local_listen().map(|(_, p)| (false, p)),
        });
    match port {
        Some((true, port)) => (
            format!(
                "the OMA's sshd at {endpoint} still holds port {port} for a stale session of the tunnel account (one whose client is gone: sshd's defaults never probe it)"
            ),
            format!(
                "install ops/deploy/oma/tunnelfleet.conf on the OMA (sshd then drops dead sessions within 15 s), or set reclaim_remote_ports = true in the profile; to free it now, on the OMA: ss -ltnp 'sport = :{port}' and kill that sshd process"
            ),
        ),
        Some((false, port)) => (
            format!("another process on the appliance listens on port {port}"),
            format!(
                "on the appliance: ss -ltnp 'sport = :{port}' names it; stop it or give the forward another port"
            ),
        ),
        None => (
            "the forward does not parse".to_string(),
            "correct the profile".to_string(),
        ),
    }
}
