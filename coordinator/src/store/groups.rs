//! OMA groups: the redundant endpoints of one OMA pair, which one is active, which are
//! drained. The operator defines them; failover, failback and drains move `active`.
use serde::{Deserialize, Serialize};

use super::change::GroupEdit;
use super::{Store, StoreError, decode, decode_all};

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

impl Store {
    /// Every OMA group, by name.
    pub fn groups(&self) -> Result<Vec<OmaGroup>, StoreError> {
        decode_all(&self.groups, "groups")
    }

    /// One OMA group.
    pub fn group(&self, name: &str) -> Result<Option<OmaGroup>, StoreError> {
        self.groups
            .get(name.as_bytes())?
            .map(|v| decode(&v, "groups", name))
            .transpose()
    }

    /// Creates or replaces a group's definition, keeping its active endpoint and drains when
    /// they still belong to it; returns the new fleet version once durable.
    pub async fn put_group(&self, def: &OmaGroup) -> Result<u64, StoreError> {
        let (version, ()) = self
            .change_groups(|base| {
                let mut g = def.clone();
                if let Some(old) = base.groups.get(&g.name) {
                    g.active = old.active.clone().filter(|a| g.endpoints.contains(a));
                    g.pinned = old.pinned && g.active.is_some();
                    g.drained = old
                        .drained
                        .iter()
                        .filter(|d| g.endpoints.contains(d))
                        .cloned()
                        .collect();
                } else {
                    g.active = None;
                    g.drained.clear();
                    g.pinned = false;
                }
                Ok(GroupEdit {
                    what: format!("OMA group {} applied", g.name),
                    writes: vec![(g.name.clone(), Some(g))],
                    value: (),
                })
            })
            .await?;
        Ok(version)
    }

    /// Deletes a group no profile names; returns the new fleet version once durable.
    pub async fn delete_group(&self, name: &str) -> Result<u64, StoreError> {
        let (version, ()) = self
            .change_groups(|base| {
                if !base.groups.contains_key(name) {
                    return Err(StoreError::NoGroup(name.to_string()));
                }
                let users: Vec<String> = base
                    .profiles
                    .values()
                    .filter(|p| p.group.as_deref() == Some(name))
                    .map(|p| p.name.clone())
                    .collect();
                if !users.is_empty() {
                    return Err(StoreError::GroupInUse {
                        group: name.to_string(),
                        profiles: users,
                    });
                }
                Ok(GroupEdit {
                    what: format!("OMA group {name} deleted"),
                    writes: vec![(name.to_string(), None)],
                    value: (),
                })
            })
            .await?;
        Ok(version)
    }

    /// Makes `endpoint` the active endpoint of `group` (the coordinator's failover and
    /// failback, and the operator's); returns the new fleet version once durable.
    pub async fn set_active(
        &self,
        group: &str,
        endpoint: &str,
        why: &str,
        pinned: bool,
    ) -> Result<u64, StoreError> {
        let (version, ()) = self
            .change_groups(|base| {
                let mut g = base
                    .groups
                    .get(group)
                    .cloned()
                    .ok_or_else(|| StoreError::NoGroup(group.to_string()))?;
                let from = g.active().unwrap_or_default().to_string();
                g.active = Some(endpoint.to_string());
                g.pinned = pinned;
                Ok(GroupEdit {
                    what: format!(
                        "OMA group {group}: active endpoint {from} -> {endpoint} ({why})"
                    ),
                    writes: vec![(group.to_string(), Some(g))],
                    value: (),
                })
            })
            .await?;
        Ok(version)
    }

    /// Marks `endpoint` drained (or not) in every group that has it; returns the new fleet
    /// version and the groups changed.
    pub async fn set_drained(
        &self,
        endpoint: &str,
        drained: bool,
    ) -> Result<(u64, Vec<String>), StoreError> {
        self.change_groups(|base| {
            let mut writes = Vec::new();
            for g in base.groups.values() {
                if !g.endpoints.iter().any(|e| e == endpoint) {
                    continue;
                }
                let mut g = g.clone();
                if drained {
                    g.drained.insert(endpoint.to_string());
                } else {
                    g.drained.remove(endpoint);
                }
                writes.push((g.name.clone(), Some(g)));
            }
            if writes.is_empty() {
                return Err(StoreError::NoEndpoint(endpoint.to_string()));
            }
            let verb = if drained { "drained" } else { "undrained" };
            Ok(GroupEdit {
                what: format!("OMA endpoint {endpoint} {verb}"),
                value: writes.iter().map(|(n, _)| n.clone()).collect(),
                writes,
            })
        })
        .await
    }
}
