//! Alerts about one agent, counted: an appliance cannot flood the store and the hooks.

use std::collections::HashMap;

use crate::store::AlertKind;

/// The most alerts about one agent that fire at once (`AlertKind::about_one_agent`): an
/// appliance, stolen or broken, cannot flood the store and the hooks; what it would raise
/// beyond is counted in `tunnelfleet_alerts_held` and logged once until some resolve.
pub const MAX_ALERTS_PER_AGENT: usize = 32;

/// Firing alerts per agent.
#[derive(Debug, Default)]
pub(super) struct PerAgent {
    /// Agent -> firing alerts about it.
    firing: HashMap<String, usize>,
    /// Alert key -> the agent it counts against.
    agent_of: HashMap<String, String>,
    /// Agents at the cap that were told about (logged once).
    held: std::collections::HashSet<String>,
}

impl PerAgent {
    pub(super) fn agent(kind: AlertKind, affected: &[String]) -> Option<&str> {
        kind.about_one_agent()
            .then(|| affected.first().map(String::as_str))
            .flatten()
    }

    /// The agent, when an alert of `kind` about `affected` would exceed its cap.
    pub(super) fn full<'a>(&self, kind: AlertKind, affected: &'a [String]) -> Option<&'a str> {
        let agent = Self::agent(kind, affected)?;
        (self.firing.get(agent).copied().unwrap_or(0) >= MAX_ALERTS_PER_AGENT).then_some(agent)
    }

    pub(super) fn fired(&mut self, key: &str, kind: AlertKind, affected: &[String]) {
        if let Some(agent) = Self::agent(kind, affected) {
            *self.firing.entry(agent.to_string()).or_default() += 1;
            self.agent_of.insert(key.to_string(), agent.to_string());
        }
    }

    /// Records that `agent` is at its cap; true the first time since it last was under.
    pub(super) fn hold(&mut self, agent: &str) -> bool {
        self.held.insert(agent.to_string())
    }

    pub(super) fn resolved(&mut self, key: &str) {
        let Some(agent) = self.agent_of.remove(key) else {
            return;
        };
        if let Some(n) = self.firing.get_mut(&agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.firing.remove(&agent);
            }
        }
        self.held.remove(&agent);
    }
}
