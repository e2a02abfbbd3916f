//! Health evidence for agents: which agents pass their health checks through which endpoint,
//! so an agent whose check fails there learns whether the fault is the OMA's (nobody passes:
//! it moves) or its own (others pass: it stays, and its `tunnel_health` alert says so). The
//! agent's health rule is `tunnelfleet_agent::placement::health_step`.
//!
//! Fed with what counts of each heartbeat ([`crate::fleet::judged`]: only endpoints pushed to
//! that agent), so an agent can vouch only for endpoints it was given, and only for itself. The
//! agent stays only when the others passing are more than the others failing, so one agent
//! (a stolen one claiming to pass) can hold on an endpoint at most an appliance that fails
//! there alone, never the fleet. Each coordinator keeps the evidence of the agents linked to
//! it. No IO.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tunnelfleet_protocol::{EndpointEvidence, Heartbeat, TunnelState};

/// How long a passed check counts (with no failure reported since).
pub const PASS_FRESH: Duration = Duration::from_secs(60);

/// How often the same word on an endpoint is repeated to an agent whose check keeps failing
/// there (a changed count goes at once). Below the agent's `EVIDENCE_FRESH` (30 s).
pub const REPEAT_EVERY: Duration = Duration::from_secs(10);

/// Who passes where.
#[derive(Debug, Default)]
pub struct HealthEvidence {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Endpoint -> agent -> whether its check passes there (true: it passed, with no failure
    /// since) and when that was last heard.
    passing: HashMap<String, HashMap<String, (bool, Instant)>>,
    /// Agent -> the endpoints it is counted on.
    by_agent: HashMap<String, BTreeSet<String>>,
}

/// What one agent was last told per endpoint, so words are repeated only when they change or
/// every [`REPEAT_EVERY`] (one per link: bounded by the endpoints pushed to that agent).
#[derive(Debug, Default)]
pub struct Told(HashMap<String, ((u32, u32), Instant)>);

impl HealthEvidence {
    /// Takes what `hb` (judged) says of `agent` at `now`: where it passes, where it fails, and
    /// that it is nowhere else.
    pub fn observe(&self, agent: &str, hb: &Heartbeat, now: Instant) {
        // Per endpoint of this heartbeat: Some(true) a profile passed a check there in this
        // heartbeat with no failure, Some(false) a profile fails or is down there, None
        // passing without a new result (the last pass keeps counting until it is stale).
        let mut seen: HashMap<&str, Option<bool>> = HashMap::new();
        for p in &hb.profiles {
            let failing = p.consecutive_failures > 0 || p.state != TunnelState::Up;
            let passed = !failing && p.health.iter().any(|h| h.ok);
            let verdict = if failing {
                Some(false)
            } else if passed {
                Some(true)
            } else {
                None
            };
            let e = seen.entry(p.active_endpoint.as_str()).or_insert(verdict);
            // A failing profile on an endpoint outweighs a passing one of the same agent.
            *e = match (*e, verdict) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), _) | (_, Some(true)) => Some(true),
                _ => None,
            };
        }
        let mut inner = self.lock();
        let Inner { passing, by_agent } = &mut *inner;
        let mine = by_agent.entry(agent.to_string()).or_default();
        // Gone from endpoints it no longer reports.
        let left: Vec<String> = mine
            .iter()
            .filter(|e| !seen.contains_key(e.as_str()))
            .cloned()
            .collect();
        for e in left {
            mine.remove(&e);
            remove(passing, &e, agent);
        }
        for (endpoint, verdict) in seen {
            if let Some(passes) = verdict {
                passing
                    .entry(endpoint.to_string())
                    .or_default()
                    .insert(agent.to_string(), (passes, now));
                mine.insert(endpoint.to_string());
            }
        }
        if mine.is_empty() {
            by_agent.remove(agent);
        }
    }

    /// Forgets `agent` (its link went away: another coordinator may hear it now).
    pub fn forget(&self, agent: &str) {
        let mut inner = self.lock();
        let Inner { passing, by_agent } = &mut *inner;
        for e in by_agent.remove(agent).unwrap_or_default() {
            remove(passing, &e, agent);
        }
    }

    /// Agents other than `agent` whose check passes through `endpoint` and whose check fails
    /// there, as heard within [`PASS_FRESH`].
    pub fn others(&self, endpoint: &str, agent: &str, now: Instant) -> (u32, u32) {
        let inner = self.lock();
        let Some(agents) = inner.passing.get(endpoint) else {
            return (0, 0);
        };
        let (mut pass, mut fail) = (0u32, 0u32);
        for (a, (passes, at)) in agents {
            if a == agent || now.saturating_duration_since(*at) >= PASS_FRESH {
                continue;
            }
            if *passes {
                pass = pass.saturating_add(1);
            } else {
                fail = fail.saturating_add(1);
            }
        }
        (pass, fail)
    }

    /// What to tell `agent` after its heartbeat `hb` (judged): for each endpoint where one of
    /// its profiles fails its check, how many others pass there — when that changed since
    /// `told` or was last said [`REPEAT_EVERY`] ago.
    pub fn replies(
        &self,
        agent: &str,
        hb: &Heartbeat,
        told: &mut Told,
        now: Instant,
    ) -> Vec<EndpointEvidence> {
        let failing: BTreeSet<&str> = hb
            .profiles
            .iter()
            .filter(|p| p.consecutive_failures > 0)
            .map(|p| p.active_endpoint.as_str())
            .collect();
        // What it is no longer failing on is not repeated; the map stays within its endpoints.
        told.0.retain(|e, _| failing.contains(e.as_str()));
        let mut out = Vec::new();
        for endpoint in failing {
            let n = self.others(endpoint, agent, now);
            let due = match told.0.get(endpoint) {
                Some((said, at)) => {
                    *said != n || now.saturating_duration_since(*at) >= REPEAT_EVERY
                }
                None => true,
            };
            if due {
                told.0.insert(endpoint.to_string(), (n, now));
                out.push(EndpointEvidence {
                    endpoint: endpoint.to_string(),
                    others_passing: n.0,
                    others_failing: n.1,
                });
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn remove(
    passing: &mut HashMap<String, HashMap<String, (bool, Instant)>>,
    endpoint: &str,
    agent: &str,
) {
    if let Some(agents) = passing.get_mut(endpoint) {
        agents.remove(agent);
        if agents.is_empty() {
            passing.remove(endpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;
    use tunnelfleet_protocol::{HealthSample, ProfileReport};

    fn report(endpoint: &str, failures: u32, checked: bool) -> ProfileReport {
        let mut p = ProfileReport::new("oma", TunnelState::Up, endpoint);
        p.consecutive_failures = failures;
        if checked {
            p.health.push(HealthSample {
                at_unix_ms: 0,
                ok: failures == 0,
                latency_us: 1,
                detail: "HTTP 200".into(),
            });
        }
        p
    }

    fn hb(profiles: Vec<ProfileReport>) -> Heartbeat {
        Heartbeat {
            seq: 1,
            sent_unix_ms: 0,
            profiles,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn passing_agents_count_for_others_until_they_fail_leave_or_go_stale() {
        let ev = HealthEvidence::default();
        let now = Instant::now();
        ev.observe("a", &hb(vec![report("oma-1:22", 0, true)]), now);
        ev.observe("b", &hb(vec![report("oma-1:22", 0, true)]), now);
        // An agent with no check result yet, or never a check: no evidence either way.
        ev.observe("c", &hb(vec![report("oma-1:22", 0, false)]), now);
        assert_eq!(ev.others("oma-1:22", "x", now), (2, 0));
        assert_eq!(ev.others("oma-1:22", "a", now), (1, 0));
        assert_eq!(ev.others("oma-2:22", "x", now), (0, 0));
        // A heartbeat without a new result keeps the last pass.
        ev.observe("a", &hb(vec![report("oma-1:22", 0, false)]), now);
        assert_eq!(ev.others("oma-1:22", "x", now), (2, 0));
        // Failing there: counted as failing.
        ev.observe("b", &hb(vec![report("oma-1:22", 1, true)]), now);
        assert_eq!(ev.others("oma-1:22", "x", now), (1, 1));
        assert_eq!(ev.others("oma-1:22", "b", now), (1, 0));
        // Moved elsewhere: counted there only.
        ev.observe("a", &hb(vec![report("oma-2:22", 0, true)]), now);
        assert_eq!(ev.others("oma-1:22", "x", now), (0, 1));
        assert_eq!(ev.others("oma-2:22", "x", now), (1, 0));
        // Stale.
        tokio::time::advance(PASS_FRESH).await;
        assert_eq!(ev.others("oma-2:22", "x", Instant::now()), (0, 0));
        // Forgotten with its link.
        ev.observe("d", &hb(vec![report("oma-2:22", 0, true)]), Instant::now());
        ev.forget("d");
        assert_eq!(ev.others("oma-2:22", "x", Instant::now()), (0, 0));
        assert!(ev.lock().by_agent.keys().all(|a| a == "a" || a == "b"));
    }

    #[test]
    fn a_failing_profile_outweighs_a_passing_one_on_the_same_endpoint() {
        let ev = HealthEvidence::default();
        let now = Instant::now();
        let mut second = report("oma-1:22", 0, true);
        second.name = "other".into();
        ev.observe("a", &hb(vec![report("oma-1:22", 2, true), second]), now);
        assert_eq!(ev.others("oma-1:22", "x", now), (0, 1));
        // A session not up is not a pass.
        let mut down = report("oma-1:22", 0, true);
        down.state = TunnelState::Backoff;
        ev.observe("b", &hb(vec![down]), now);
        assert_eq!(ev.others("oma-1:22", "x", now), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_agent_is_told_on_change_and_every_repeat_interval() {
        let ev = HealthEvidence::default();
        let mut told = Told::default();
        let now = Instant::now();
        let failing = hb(vec![report("oma-1:22", 1, true)]);
        let first = ev.replies("a", &failing, &mut told, now);
        assert_eq!(
            first,
            vec![EndpointEvidence {
                endpoint: "oma-1:22".into(),
                others_passing: 0,
                others_failing: 0,
            }]
        );
        assert!(ev.replies("a", &failing, &mut told, now).is_empty());
        ev.observe("b", &hb(vec![report("oma-1:22", 0, true)]), now);
        let changed = ev.replies("a", &failing, &mut told, now);
        assert_eq!(changed[0].others_passing, 1);
        tokio::time::advance(REPEAT_EVERY).await;
        assert_eq!(
            ev.replies("a", &failing, &mut told, Instant::now()).len(),
            1
        );
        // Passing again: nothing said, nothing kept.
        let passing = hb(vec![report("oma-1:22", 0, true)]);
        assert!(
            ev.replies("a", &passing, &mut told, Instant::now())
                .is_empty()
        );
        assert!(told.0.is_empty());
    }
}
