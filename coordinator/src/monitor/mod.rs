//! The rules: endpoint health from probes and agents' reports, alerts after consecutive failed
//! checks (with correlation), and failover/failback decisions between an OMA group's endpoints.
//!
//! # Layout
//! - this module: the rules' inputs and outputs ([`AlertRules`], [`Action`], [`Refusal`]) and
//!   the [`Monitor`] that holds their state.
//! - [`endpoints`]: OMA endpoint health from probes and reports, the `oma_down` incident,
//!   failover and failback, `oma list`.
//! - [`agents`]: hellos, restarts, offline agents, and what a heartbeat says.
//! - [`checks`]: the consecutive-failure rule of the agent-side checks.
//! - [`streak`]: failures in a row against a threshold, the one count every rule keeps.
//! - [`certs`]: agents' SSH certificates running out unrenewed: `ssh_cert_expiring`.
//! - [`tunnels`]: agents' tunnels as evidence against their group's active endpoint (health
//!   checks through it, agents that left it), with a quorum: `oma_unhealthy` and a failover.
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
//! - When the active endpoint's sshd answers but most agents' tunnels through it fail (health
//!   checks failing `threshold` times in a row, or agents gone elsewhere on their own for
//!   longer than a move takes), and they are at least the group's `quorum` (2 or more), that is
//!   one `oma_unhealthy` incident and a failover; the endpoint is out of automatic use for
//!   `failback_after`. One agent alone never moves a group.

mod agents;
mod certs;
mod checks;
mod endpoints;
mod streak;
mod tunnels;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use certs::{CertView, ONBOARDING_GRACE, cert_expiring};
pub use endpoints::{EndpointView, ProbeError};
pub use tunnels::{ProfilePlacement, placement};

use crate::store::OmaGroup;
use crate::store::{AlertKind, alert_key};
use agents::AgentState;
use endpoints::Endpoint;

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
        /// What kind of alert.
        kind: AlertKind,
        /// What it is about (endpoint, agent, agent/profile, …).
        subject: String,
        /// For people.
        summary: String,
        /// Agents affected.
        affected: Vec<String>,
    },
    /// Resolve the firing alert with this key.
    Resolve {
        /// What kind of alert.
        kind: AlertKind,
        /// What it was about.
        subject: String,
    },
    /// Move a group to another endpoint.
    SetActive {
        /// The OMA group to move.
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
    streaks: HashMap<String, streak::Streak>,
    /// Keys of firing alerts.
    firing: HashSet<String>,
    agents: HashMap<String, AgentState>,
    /// Agent -> (profile -> endpoint) from its last heartbeat.
    placement: HashMap<String, BTreeMap<String, String>>,
    /// Agent -> (profile -> what its tunnel showed), for [`tunnels`].
    tunnels: HashMap<String, BTreeMap<String, tunnels::TunnelView>>,
    /// Agents onboarding (their first SSH certificate), until when their refused logins and
    /// failing tunnels are not counted: [`certs::ONBOARDING_GRACE`].
    onboarding: HashMap<String, certs::Onboarding>,
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
    /// An alert the rules raised that was not recorded (its agent at its cap of alerts): the
    /// rules raise it again while it holds.
    pub fn not_fired(&mut self, kind: AlertKind, subject: &str) {
        self.firing.remove(&alert_key(kind, subject));
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
}

#[cfg(test)]
mod tests;
