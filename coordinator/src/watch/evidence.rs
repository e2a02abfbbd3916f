//! Agents linked to other coordinators: their records fed to the rules as this coordinator's
//! own links are.

use super::*;

/// An agent linked to another coordinator: which link, and what of it was fed to the rules.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Remote {
    coordinator: String,
    since_unix_ms: u64,
    online: bool,
    heartbeats: u64,
}

impl Watcher {
    /// Feeds the rules what other coordinators published of their agents (shared store):
    /// a new link as a hello, new heartbeats, going offline and coming back. An agent linked
    /// here is left to its link; of an agent's records the latest link counts.
    pub(super) fn remote_evidence(&mut self, now: Instant) -> Vec<Action> {
        if !self.store.shared() {
            return Vec::new();
        }
        let records = match self.store.live_since(self.live_revision) {
            Ok((records, reached)) => {
                self.live_revision = reached;
                records
            }
            Err(e) => {
                tracing::warn!("reading agents' evidence: {e}");
                return Vec::new();
            }
        };
        // Of one agent's records in this read, only its latest link (this coordinator's
        // own agents are fed from its links).
        let latest = crate::store::latest_per_agent(records, &self.handle.me);
        let mut actions = Vec::new();
        for r in latest.into_values() {
            if self.fleet.links.get(&r.agent).is_some_and(|l| l.connected) {
                continue;
            }
            let known = self.remote.get(&r.agent).cloned();
            if known.as_ref().is_some_and(|k| {
                k.coordinator != r.coordinator && k.since_unix_ms > r.since_unix_ms
            }) {
                // An older link's news: the agent has moved on.
                continue;
            }
            let same_link = known.as_ref().is_some_and(|k| {
                k.coordinator == r.coordinator && k.since_unix_ms == r.since_unix_ms
            });
            if !same_link && r.connected {
                actions.extend(self.monitor.hello(&r.agent, r.started_unix_ms, now));
            }
            let was_online = known.as_ref().is_none_or(|k| k.online) || !same_link;
            if was_online && !r.online {
                actions.extend(
                    self.monitor
                        .agent_offline(&r.agent, crate::fleet::MISSED_HEARTBEATS_OFFLINE),
                );
            } else if r.connected && r.online {
                // Heard from where it is now: whatever said it was offline (its old link
                // here going silent after it moved, read in either order) is over.
                actions.extend(self.monitor.agent_online(&r.agent));
            }
            let fresh = known
                .as_ref()
                .is_none_or(|k| !same_link || r.heartbeats > k.heartbeats);
            if fresh
                && r.online
                && let Some(hb) = &r.heartbeat
            {
                actions.extend(self.heartbeat(&r.agent, hb, now));
            }
            self.remote.insert(
                r.agent.clone(),
                Remote {
                    coordinator: r.coordinator,
                    since_unix_ms: r.since_unix_ms,
                    online: r.online,
                    heartbeats: r.heartbeats,
                },
            );
        }
        actions
    }

    /// Whether `agent`'s latest link is on another coordinator, newer than its link here and
    /// online there.
    pub(super) fn linked_elsewhere(&self, agent: &str) -> bool {
        let here = self.fleet.links.get(agent).map_or(0, |l| l.since_unix_ms);
        self.remote
            .get(agent)
            .is_some_and(|r| r.online && r.since_unix_ms > here)
    }
}
