//! OMA endpoint health: probe results and (for groups without probes) agents' reports count
//! as checks; `threshold` failures in a row make an endpoint down and raise one `oma_down`
//! incident naming the agents on it; failover and failback move groups between endpoints.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Action, Monitor, Refusal};
use crate::store::{AlertKind, alert_key};

/// Why a probe of an endpoint failed (its text is the endpoint's last detail in `oma list`).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connect failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// Reading failed.
    #[error("reading the banner: {0}")]
    Read(std::io::Error),
    /// The server closed first.
    #[error("connection closed before the SSH banner")]
    Closed,
    /// Something else answered.
    #[error("not an SSH server: {0:?}")]
    NotSsh(String),
    /// Nothing in time (a blackholed endpoint, or a stopped sshd).
    #[error("no SSH banner within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// How long an agent seen on an endpoint counts as "on it" for the incident's list.
const SEEN_WINDOW: Duration = Duration::from_secs(120);

/// One endpoint's health as the coordinator sees it.
#[derive(Debug, Default)]
pub(super) struct Endpoint {
    /// Failed checks in a row.
    pub(super) fails: super::streak::Streak,
    /// Down after `threshold` failures, until a pass.
    pub(super) down: bool,
    /// Passing every check since.
    healthy_since: Option<Instant>,
    last_ok: Option<bool>,
    last_detail: String,
    last_latency: Option<Duration>,
    /// Agents whose heartbeats showed them on it.
    pub(super) seen: HashMap<String, Instant>,
    /// Agents that reported failures against it.
    pub(super) failing: HashMap<String, Instant>,
    /// When agents' tunnels last made it impaired ([`super::tunnels`]).
    pub(super) impaired: Option<Instant>,
    /// What agents' tunnels say against it now, when any do ([`super::tunnels`]): fewer than
    /// the incident needs, or the incident's own words.
    pub(super) degraded: Option<String>,
}

impl Endpoint {
    pub(super) fn suspect(&self) -> bool {
        self.down || self.fails.count() > 0
    }
}

/// One endpoint in `tunnelfleet oma list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointView {
    /// The OMA group it belongs to.
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
    /// On the group's active endpoint: the agents' profiles that are up elsewhere in the group
    /// (`agent/profile on ENDPOINT: why`): diverged, on their own or because a move was refused.
    #[serde(default)]
    pub diverged: Vec<String>,
    /// The group's active endpoint answers its probes but agents' tunnels through it fail
    /// (checks failing, agents that left it on their own): what they say. An `oma_unhealthy`
    /// incident once they are the group's quorum and most agents there; the group moves then.
    #[serde(default)]
    pub degraded: Option<String>,
}

impl Monitor {
    fn threshold_for(&self, endpoint: &str) -> u32 {
        self.groups
            .values()
            .filter(|g| g.endpoints.iter().any(|e| e == endpoint))
            .map(|g| g.threshold)
            .min()
            .unwrap_or(self.rules.threshold)
    }
    pub(super) fn probed(&self, endpoint: &str) -> bool {
        self.groups
            .values()
            .any(|g| g.probe && g.endpoints.iter().any(|e| e == endpoint))
    }
    pub(super) fn is_down(&self, endpoint: &str) -> bool {
        self.endpoints.get(endpoint).is_some_and(|e| e.down)
    }
    /// A probe result (TCP connect plus SSH banner).
    pub fn probe(
        &mut self,
        endpoint: &str,
        result: Result<Duration, ProbeError>,
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
                Err(why) => e.last_detail = why.to_string(),
            }
        }
        self.endpoint_check(endpoint, ok, now)
    }
    /// One check of an endpoint, from a probe or (groups without probes) an agent's report.
    pub(super) fn endpoint_check(&mut self, endpoint: &str, ok: bool, now: Instant) -> Vec<Action> {
        let threshold = self.threshold_for(endpoint);
        let key = alert_key(AlertKind::OmaDown, endpoint);
        let mut actions = Vec::new();
        let e = self.endpoints.entry(endpoint.to_string()).or_default();
        e.last_ok = Some(ok);
        if ok {
            e.fails.record(0);
            e.down = false;
            e.healthy_since.get_or_insert(now);
            if self.firing.remove(&key) {
                actions.push(Action::Resolve {
                    kind: AlertKind::OmaDown,
                    subject: endpoint.to_string(),
                });
            }
        } else {
            e.fails.record(1);
            e.healthy_since = None;
            if e.fails.reached(threshold) && !e.down {
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
                        e.fails.count(),
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
            let up: Vec<&String> = g
                .endpoints
                .iter()
                .filter(|e| !g.drained.contains(*e) && !self.is_down(e))
                .collect();
            let usable: Vec<&String> = up
                .iter()
                .copied()
                .filter(|e| !self.impaired(e, now))
                .collect();
            let impaired = self.impaired(&active, now);
            let move_to = if impaired && !self.is_down(&active) && !g.drained.contains(&active) {
                // From one impaired endpoint only to one that is not: never between two.
                usable.first().map(|e| {
                    (
                        (*e).clone(),
                        format!("failover: {active} fails its agents' tunnels"),
                    )
                })
            } else if g.drained.contains(&active) || self.is_down(&active) {
                // A down or drained endpoint carries nothing: one whose sshd answers is better
                // even while its agents' failed checks keep it impaired (within
                // `failback_after`); the agents' own checks judge it again.
                let why = if g.drained.contains(&active) {
                    format!("{active} drained")
                } else {
                    format!("{active} down")
                };
                match usable.first() {
                    Some(e) => Some(((*e).clone(), format!("failover: {why}"))),
                    None => up.first().map(|e| {
                        (
                            (*e).clone(),
                            format!(
                                "failover: {why}; {e} is the only one up (its agents' checks \
                                 failed there lately)"
                            ),
                        )
                    }),
                }
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
                    consecutive_failures: e.map(|e| e.fails.count()).unwrap_or(0),
                    healthy_for_s: e
                        .and_then(|e| e.healthy_since)
                        .map(|s| now.saturating_duration_since(s).as_secs()),
                    last_detail: e.map(|e| e.last_detail.clone()).unwrap_or_default(),
                    last_latency_ms: e
                        .and_then(|e| e.last_latency)
                        .map(|l| l.as_secs_f64() * 1000.0),
                    agents,
                    diverged: if ep == active {
                        self.diverged_from(active, &g.endpoints, now)
                    } else {
                        Vec::new()
                    },
                    degraded: e.and_then(|e| e.degraded.clone()),
                });
            }
        }
        out
    }
}
