//! What agents' tunnels say about the endpoint their group is on, when its sshd answers the
//! probes: health checks failing through it, or agents that had to leave it on their own. With
//! a quorum (the group's `quorum` agents, and most of those there), that is evidence against
//! the endpoint: one `oma_unhealthy` incident naming what fails, and the group fails over
//! (agents follow make-before-break, so a standby that does no better is never moved to). One
//! agent alone never moves a group: its own alerts cover it.
//!
//! An impaired endpoint stays out of automatic use for its group's `failback_after`; then the
//! group may fail back onto it as a trial (the agents' make-before-break refuses a move whose
//! health check fails, so a trial costs no traffic), and the evidence decides again. The
//! incident resolves once most agents on the endpoint pass.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tunnelfleet_protocol::{ProfileReport, TunnelState};

use super::{Action, Monitor};
use crate::store::{AlertKind, OmaGroup, alert_key};

/// Where one profile of an agent runs, measured against its OMA group's choice: what
/// `agents show`, `tunnels status --agent`, `oma list` and the metrics say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfilePlacement {
    /// The profile.
    pub profile: String,
    /// The endpoint it is on (or trying).
    pub endpoint: String,
    /// The OMA group that endpoint belongs to, if any.
    pub group: Option<String>,
    /// That group's active endpoint.
    pub group_active: Option<String>,
    /// On the group's active endpoint (or in no group).
    pub follows: bool,
    /// Why it is elsewhere: its refused move, or its own latest move.
    pub reason: Option<String>,
}

/// Where `p` runs relative to its group, from the coordinator's own groups (the endpoint an
/// agent reports only picks which group it is measured against).
pub fn placement(groups: &[OmaGroup], p: &ProfileReport) -> ProfilePlacement {
    let group = groups
        .iter()
        .find(|g| g.endpoints.contains(&p.active_endpoint));
    let active = group.and_then(|g| g.active()).map(str::to_string);
    let follows = active.as_deref().is_none_or(|a| a == p.active_endpoint);
    let reason = (!follows)
        .then(|| {
            p.last_error
                .clone()
                .filter(|e| e.contains("staying on"))
                .or_else(|| p.failover_log.last().map(|f| f.reason.clone()))
        })
        .flatten();
    ProfilePlacement {
        profile: p.name.clone(),
        endpoint: p.active_endpoint.clone(),
        group: group.map(|g| g.name.clone()),
        group_active: active,
        follows,
        reason,
    }
}

/// How long an agent may be on another endpoint than its group's active one before that counts
/// against the active one: following a move takes a session setup, and a refused move is
/// retried.
pub(super) const FOLLOW_GRACE: Duration = Duration::from_secs(15);

/// How long a heartbeat's view of a tunnel counts.
pub(super) const FRESH: Duration = Duration::from_secs(120);

/// One profile of one agent, as its last heartbeat showed it.
#[derive(Debug, Clone)]
pub(super) struct TunnelView {
    endpoint: String,
    up: bool,
    /// The failing check's detail, when it failed `threshold` times in a row.
    health_failing: Option<String>,
    /// Why it is where it is, when it moved on its own (its latest move or refusal).
    reason: Option<String>,
    /// The active endpoint it was found away from, and since when.
    away: Option<(String, Instant)>,
    /// The endpoint its latest move left for its health check.
    left_for_health: Option<String>,
    /// The group's active endpoint it was last judged on.
    was_on: Option<String>,
    at: Instant,
}

/// One agent's tunnel on a group's endpoints, judged against the active one.
enum Verdict {
    Good,
    Health(String),
    Away(String),
}

impl Monitor {
    /// Records what a heartbeat's profiles show (called with every heartbeat; judged on the
    /// tick, [`Monitor::judge_tunnels`]).
    pub(super) fn observe_tunnels(
        &mut self,
        agent: &str,
        profiles: &[ProfileReport],
        now: Instant,
    ) {
        let threshold = self.rules.threshold;
        let previous = self.tunnels.remove(agent).unwrap_or_default();
        let mut views = BTreeMap::new();
        for p in profiles {
            let health_failing =
                super::streak::reached(p.consecutive_failures, threshold).then(|| {
                    p.health
                        .last()
                        .map(|h| h.detail.clone())
                        .or_else(|| p.last_error.clone())
                        .unwrap_or_else(|| "failing".into())
                });
            // A move it made for its health says why it left; else a refused move back, else
            // its latest move.
            let health_move = p.failover_log.last().filter(|f| f.for_health());
            let reason = health_move
                .map(|f| f.reason.clone())
                .or_else(|| p.last_error.clone().filter(|e| e.starts_with("staying on")))
                .or_else(|| p.failover_log.last().map(|f| f.reason.clone()));
            let before = previous.get(&p.name);
            let away = before.and_then(|v: &TunnelView| v.away.clone());
            let was_on = before.and_then(|v| v.was_on.clone());
            views.insert(
                p.name.clone(),
                TunnelView {
                    endpoint: p.active_endpoint.clone(),
                    up: p.state == TunnelState::Up,
                    health_failing,
                    reason,
                    away,
                    left_for_health: health_move.map(|f| f.from.clone()),
                    was_on,
                    at: now,
                },
            );
        }
        self.tunnels.insert(agent.to_string(), views);
    }

    /// Forgets an agent's tunnels (it went offline or was removed).
    pub(super) fn forget_tunnels(&mut self, agent: &str) {
        self.tunnels.remove(agent);
    }

    /// Judges every group's active endpoint by the agents' tunnels on its endpoints: one pass
    /// over the tunnels (it runs on the watcher's tick, over the whole fleet), each tunnel
    /// counted for the group its endpoint belongs to.
    pub(super) fn judge_tunnels(&mut self, now: Instant) -> Vec<Action> {
        struct Judged {
            group: String,
            active: String,
            quorum: u32,
            verdicts: Vec<(String, Verdict)>,
        }
        // What was said of an endpoint holds while it is judged (a group's active one) or kept
        // out of use by its incident; else it is old news.
        let stale: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.degraded.is_some())
            .map(|(ep, _)| ep.clone())
            .filter(|ep| !self.impaired(ep, now))
            .collect();
        for ep in stale {
            if let Some(e) = self.endpoints.get_mut(&ep) {
                e.degraded = None;
            }
        }
        let mut judged: Vec<Judged> = Vec::new();
        let mut group_of: HashMap<String, usize> = HashMap::new();
        for g in self.groups.values() {
            let Some(active) = g.active() else { continue };
            // Failing probes are the probe rule's: its incident covers the tunnels.
            if self.endpoints.get(active).is_some_and(|e| e.suspect()) {
                continue;
            }
            for e in &g.endpoints {
                group_of.entry(e.clone()).or_insert(judged.len());
            }
            judged.push(Judged {
                group: g.name.clone(),
                active: active.to_string(),
                quorum: g.quorum.max(2),
                verdicts: Vec::new(),
            });
        }
        for (agent, views) in self.tunnels.iter_mut() {
            for v in views.values_mut() {
                if !v.up || now.saturating_duration_since(v.at) > FRESH {
                    continue;
                }
                let Some(&i) = group_of.get(&v.endpoint) else {
                    continue;
                };
                let j = &mut judged[i];
                if v.endpoint == j.active {
                    v.away = None;
                    v.was_on = Some(j.active.clone());
                    let verdict = match &v.health_failing {
                        Some(d) => Verdict::Health(d.clone()),
                        None => Verdict::Good,
                    };
                    j.verdicts.push((agent.clone(), verdict));
                    continue;
                }
                // Away from the active one: since when, against this active endpoint.
                let since = match &v.away {
                    Some((from, t)) if *from == j.active => *t,
                    _ => {
                        v.away = Some((j.active.clone(), now));
                        now
                    }
                };
                // It was seen on the active endpoint and left it for its health: no move of
                // the group's to wait for, evidence at once. (Away since the group moved onto
                // that endpoint — a trial failback — it gets the grace to follow.)
                let left_it = v.left_for_health.as_deref() == Some(j.active.as_str())
                    && v.was_on.as_deref() == Some(j.active.as_str());
                if left_it || now.saturating_duration_since(since) >= FOLLOW_GRACE {
                    let why = v
                        .reason
                        .clone()
                        .unwrap_or_else(|| format!("on {}", v.endpoint));
                    j.verdicts.push((agent.clone(), Verdict::Away(why)));
                }
            }
        }
        let mut actions = Vec::new();
        for j in judged {
            actions.extend(self.judge_endpoint(&j.group, &j.active, &j.verdicts, j.quorum, now));
        }
        actions
    }

    fn judge_endpoint(
        &mut self,
        group: &str,
        endpoint: &str,
        verdicts: &[(String, Verdict)],
        quorum: u32,
        now: Instant,
    ) -> Vec<Action> {
        let total = verdicts.len();
        let health: Vec<&(String, Verdict)> = verdicts
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Health(_)))
            .collect();
        let away: Vec<&(String, Verdict)> = verdicts
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Away(_)))
            .collect();
        let bad = health.len() + away.len();
        let total = total.max(1);
        let mut parts = Vec::new();
        if let Some((_, Verdict::Health(d))) = health.first() {
            parts.push(format!(
                "health checks through the tunnel failing on {} of {total} agents ({d})",
                health.len()
            ));
        }
        if let Some((_, Verdict::Away(why))) = away.first() {
            parts.push(format!(
                "{} of {total} agents could not stay on it ({why})",
                away.len()
            ));
        }
        let key = alert_key(AlertKind::OmaUnhealthy, endpoint);
        let e = self.endpoints.entry(endpoint.to_string()).or_default();
        e.degraded = (bad > 0).then(|| parts.join("; "));
        if bad >= quorum as usize && bad * 2 > total {
            e.impaired = Some(now);
            let mut actions = Vec::new();
            if self.firing.insert(key) {
                let mut affected: Vec<String> = health
                    .iter()
                    .chain(away.iter())
                    .map(|(a, _)| a.clone())
                    .collect();
                affected.sort();
                affected.dedup();
                actions.push(Action::Fire {
                    kind: AlertKind::OmaUnhealthy,
                    subject: endpoint.to_string(),
                    summary: format!(
                        "OMA endpoint {endpoint} (group {group}) fails its agents while its sshd answers: {}",
                        parts.join("; ")
                    ),
                    affected,
                });
            }
            actions.extend(self.decide(now));
            return actions;
        }
        let passing = verdicts
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Good))
            .count();
        if passing > 0 && bad * 2 < total && self.firing.remove(&key) {
            if let Some(e) = self.endpoints.get_mut(endpoint) {
                e.impaired = None;
            }
            return vec![Action::Resolve {
                kind: AlertKind::OmaUnhealthy,
                subject: endpoint.to_string(),
            }];
        }
        Vec::new()
    }

    /// The agents' profiles on `endpoints` (a group's) that are up elsewhere than `active`:
    /// `agent/profile on ENDPOINT: why`, for `oma list`.
    pub(super) fn diverged_from(
        &self,
        active: &str,
        endpoints: &[String],
        now: Instant,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for (agent, views) in &self.tunnels {
            for (profile, v) in views {
                if v.up
                    && v.endpoint != active
                    && endpoints.contains(&v.endpoint)
                    && now.saturating_duration_since(v.at) <= FRESH
                {
                    let why = v
                        .reason
                        .clone()
                        .unwrap_or_else(|| "no reason reported".into());
                    out.push(format!("{agent}/{profile} on {}: {why}", v.endpoint));
                }
            }
        }
        out.sort();
        out
    }

    /// Whether agents' evidence keeps `endpoint` out of automatic use now.
    pub(super) fn impaired(&self, endpoint: &str, now: Instant) -> bool {
        let window = self
            .groups
            .values()
            .filter(|g| g.endpoints.iter().any(|e| e == endpoint))
            .map(|g| g.failback_after)
            .max()
            .unwrap_or_default();
        self.endpoints
            .get(endpoint)
            .and_then(|e| e.impaired)
            .is_some_and(|t| now.saturating_duration_since(t) < window)
    }
}
