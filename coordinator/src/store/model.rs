//! The fleet's definition: its records (assignments and their selectors, OMA groups, the
//! revisions of the history) and what a change works on and makes of them: what the fleet
//! holds at one version ([`Base`]), its profiles and assignments after a change
//! ([`Contents`]), an OMA group change ([`GroupEdit`]), and the version step every versioned
//! change takes ([`bump_version`]). The files that change and keep them (`change`, `profiles`,
//! `groups`, `history`, `rollouts`) use this; it uses none of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::ProfileSpec;

use super::engine::{Abort, TxTree};
use super::{META_FLEET_VERSION, StoreError, u64_of};

/// The fleet's definition at one version: what a change is worked out on.
#[derive(Debug, Clone)]
pub(super) struct Base {
    /// The fleet version it was read at.
    pub(super) version: u64,
    /// Every profile, by name.
    pub(super) profiles: BTreeMap<String, ProfileSpec>,
    /// Every assignment.
    pub(super) assignments: Vec<Assignment>,
    /// Every OMA group, by name.
    pub(super) groups: BTreeMap<String, OmaGroup>,
}

impl Base {
    /// Refuses a profile naming a group the fleet does not have.
    pub(super) fn check_group(&self, spec: &ProfileSpec) -> Result<(), StoreError> {
        match &spec.group {
            Some(g) if !self.groups.contains_key(g) => Err(StoreError::UnknownGroup {
                profile: spec.name.clone(),
                group: g.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// What a change makes the profiles and assignments: all of them, as they will be.
#[derive(Debug, Clone)]
pub(super) struct Contents {
    /// Every profile, by name.
    pub(super) profiles: BTreeMap<String, ProfileSpec>,
    /// Every assignment (duplicates are one).
    pub(super) assignments: Vec<Assignment>,
}

impl Contents {
    /// What `base` holds.
    pub(super) fn of(base: &Base) -> Contents {
        Contents {
            profiles: base.profiles.clone(),
            assignments: base.assignments.clone(),
        }
    }

    /// Exactly these profiles and assignments (a rollback, an abort).
    pub(super) fn from_lists(profiles: &[ProfileSpec], assignments: &[Assignment]) -> Contents {
        Contents {
            profiles: profiles
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            assignments: assignments.to_vec(),
        }
    }
}

/// Inside a change's transaction: bumps the fleet version and logs the change's event with it,
/// so a version and the event that explains it are written together or not at all. Every
/// versioned change (profiles, assignments, groups, rollout steps) goes through here.
pub(super) fn bump_version(
    meta: &TxTree<'_>,
    events: &TxTree<'_>,
    (seq, event): &(u64, Vec<u8>),
) -> Result<u64, Abort> {
    let next = meta
        .get(META_FLEET_VERSION)?
        .map(|v| u64_of(&v))
        .unwrap_or(0)
        + 1;
    meta.insert(META_FLEET_VERSION, next.to_be_bytes())?;
    events.insert(seq.to_be_bytes(), event)?;
    Ok(next)
}

/// Which agents a profile goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// One agent by id.
    Agent(String),
    /// Every agent whose labels include all of these.
    Labels(BTreeMap<String, String>),
}

impl Selector {
    /// Whether an agent with `id` and `labels` is selected.
    pub fn matches(&self, id: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::Agent(a) => a == id,
            Selector::Labels(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }
}

/// A stored assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Profile name.
    pub profile: String,
    /// Who gets it.
    pub selector: Selector,
}

/// A group definition was refused: the key (relative to the group) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct GroupError {
    /// The offending key, e.g. `endpoints[1]`.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

/// A named set of redundant OMA endpoints in priority order, with how the coordinator probes
/// them and when it fails back. Created by the operator; `active` and `drained` are changed by
/// failover, failback and `tunnelfleet oma drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OmaGroup {
    /// Group name (profiles name it).
    pub name: String,
    /// `host:port`, priority order: primary first.
    pub endpoints: Vec<String>,
    /// Probe the endpoints (TCP connect plus SSH banner); off: agents' reports only.
    #[serde(default = "yes")]
    pub probe: bool,
    /// Between probes.
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub probe_interval: std::time::Duration,
    /// A probe slower than this failed.
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub probe_timeout: std::time::Duration,
    /// Failed checks in a row that mark an endpoint down.
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    /// How long a recovered higher-priority endpoint must stay healthy before failback.
    #[serde(default = "default_failback_after", with = "humantime_serde")]
    pub failback_after: std::time::Duration,
    /// The endpoint agents are sent to (the first endpoint until a failover).
    #[serde(default)]
    pub active: Option<String>,
    /// Endpoints taken out of service by the operator.
    #[serde(default)]
    pub drained: std::collections::BTreeSet<String>,
    /// An operator moved the group (`oma failover`): no automatic failback until
    /// `oma failback`. Failover away from a down endpoint still happens.
    #[serde(default)]
    pub pinned: bool,
    /// Agents whose tunnels must fail on the active endpoint (health checks failing through
    /// it, or gone elsewhere on their own) before that is evidence against it — and they must
    /// also be most of the agents there. At least 2: one agent alone never moves a group.
    #[serde(default = "default_quorum")]
    pub quorum: u32,
}

fn yes() -> bool {
    true
}
fn default_probe_interval() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}
fn default_probe_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(800)
}
fn default_threshold() -> u32 {
    3
}
fn default_quorum() -> u32 {
    2
}
fn default_failback_after() -> std::time::Duration {
    std::time::Duration::from_secs(300)
}

impl OmaGroup {
    /// A new probed group of `endpoints` (priority order): down after 3 failed probes, no
    /// endpoint active, drained or pinned yet.
    pub fn probed(
        name: &str,
        endpoints: Vec<String>,
        probe_interval: std::time::Duration,
        probe_timeout: std::time::Duration,
        failback_after: std::time::Duration,
    ) -> OmaGroup {
        OmaGroup {
            name: name.to_string(),
            endpoints,
            probe: true,
            probe_interval,
            probe_timeout,
            threshold: 3,
            failback_after,
            active: None,
            drained: Default::default(),
            pinned: false,
            quorum: default_quorum(),
        }
    }

    /// The active endpoint.
    pub fn active(&self) -> Option<&str> {
        self.active
            .as_deref()
            .or_else(|| self.endpoints.first().map(String::as_str))
    }

    /// The endpoints as pushed to agents: the active one first, then the others in priority
    /// order (the agent's own failover order), drained ones left out.
    pub fn ordered(&self) -> Vec<String> {
        let active = self
            .active()
            .filter(|a| !self.drained.contains(*a))
            .map(str::to_string);
        let mut v: Vec<String> = active.iter().cloned().collect();
        v.extend(
            self.endpoints
                .iter()
                .filter(|e| Some(*e) != active.as_ref() && !self.drained.contains(*e))
                .cloned(),
        );
        if v.is_empty() {
            // Everything drained: better the full list than no way to reach an OMA.
            v = self.endpoints.clone();
        }
        v
    }

    /// Checks a definition from the operator; the error names the key.
    pub fn validate(&self) -> Result<(), GroupError> {
        let err = |key: String, reason: String| Err(GroupError { key, reason });
        if !tunnelfleet_protocol::addr::valid_name(&self.name) {
            return err(
                "name".into(),
                format!("{:?} is not a valid group name", self.name),
            );
        }
        if self.endpoints.is_empty() {
            return err(
                "endpoints".into(),
                "at least one host:port is required".into(),
            );
        }
        let max = tunnelfleet_protocol::limits::MAX_ENDPOINTS;
        if self.endpoints.len() > max {
            return err(
                "endpoints".into(),
                format!("{} given; at most {max}", self.endpoints.len()),
            );
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Err(r) = tunnelfleet_protocol::addr::split_host_port(e, None) {
                return err(format!("endpoints[{i}]"), r.to_string());
            }
            if self.endpoints[..i].contains(e) {
                return err(format!("endpoints[{i}]"), format!("{e} is listed twice"));
            }
        }
        if self.threshold == 0 {
            return err("threshold".into(), "must be at least 1".into());
        }
        if self.quorum < 2 {
            return err(
                "quorum".into(),
                format!(
                    "{} is less than 2: one agent alone never moves a group",
                    self.quorum
                ),
            );
        }
        if self.probe_interval.is_zero() || self.probe_timeout.is_zero() {
            return err(
                "probe_interval".into(),
                "probe_interval and probe_timeout must be more than 0".into(),
            );
        }
        Ok(())
    }
}

/// The fleet's profiles and assignments as one change left them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    /// The fleet version it made.
    pub version: u64,
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// What changed.
    pub what: String,
    /// Every profile after the change.
    pub profiles: Vec<ProfileSpec>,
    /// Every assignment after the change.
    pub assignments: Vec<Assignment>,
}

/// An OMA group change worked out on a [`Base`]: its event text, the groups written (`None`
/// removes one), and what the caller gets back.
pub(super) struct GroupEdit<T> {
    /// The event text.
    pub(super) what: String,
    /// Group name -> its new definition, or `None` to remove it.
    pub(super) writes: Vec<(String, Option<OmaGroup>)>,
    /// Returned to the caller with the new version.
    pub(super) value: T,
}
