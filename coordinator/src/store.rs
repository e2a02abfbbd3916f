//! Fleet state on disk: profiles, assignments, agents and an event log, in sled.
//!
//! Everything the coordinator acknowledges to anyone is flushed first: every write method is
//! `async` and returns only after `flush_async`, so an acknowledged change survives kill -9.
//! Multi-tree changes (a profile and the fleet version that numbers it) go in one sled
//! transaction. Records are JSON so a schema change is visible and migratable; the schema
//! version is checked at open and a store written by a newer coordinator is refused. All of
//! sled stays inside this module, so another store can replace it.

use std::collections::BTreeMap;
use std::path::Path;
use tunnelfleet_runtime::clock::now_unix_ms;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use tunnelfleet_protocol::{ProfileSet, ProfileSpec};

pub use crate::alerts::{Alert, AlertKind, AlertStatus, Delivery, Silence};
pub use crate::enroll::{JoinToken, Revocation};

/// The schema this build writes and reads.
/// 2: profiles in the one profile model (durations as `"15s"`, `autostart`), protocol 4.
pub const SCHEMA_VERSION: u64 = 2;

const META_SCHEMA: &[u8] = b"schema_version";
const META_FLEET_VERSION: &[u8] = b"fleet_version";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (IO, corruption).
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("state store: record {key:?} in {tree}: {reason}")]
    Corrupt {
        /// Tree name.
        tree: &'static str,
        /// Key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The store was written by a newer schema.
    #[error(
        "state store at {path}: schema version {found} is newer than this coordinator's {SCHEMA_VERSION}; upgrade the coordinator"
    )]
    NewerSchema {
        /// The store directory.
        path: String,
        /// What it holds.
        found: u64,
    },
    /// No such profile.
    #[error("no profile named {0:?}")]
    NoProfile(String),
    /// No such OMA group.
    #[error("no OMA group named {0:?}")]
    NoGroup(String),
    /// A profile names a group that does not exist.
    #[error(
        "profile {profile:?} names OMA group {group:?}, which does not exist (create it with `tunnelfleet oma apply`)"
    )]
    UnknownGroup {
        /// The profile.
        profile: String,
        /// The group it names.
        group: String,
    },
    /// A group still used by profiles.
    #[error("OMA group {group:?} is used by profiles {profiles:?}")]
    GroupInUse {
        /// The group.
        group: String,
        /// Profiles naming it.
        profiles: Vec<String>,
    },
    /// No endpoint of that name in any group.
    #[error("no OMA group has endpoint {0:?}")]
    NoEndpoint(String),
    /// No such alert.
    #[error("no alert {0}")]
    NoAlert(u64),
    /// No revision of that version in the history.
    #[error("no revision {0} in the history (see `tunnelfleet profiles history`)")]
    NoRevision(u64),
    /// No join token with that id.
    #[error("no join token {0:?}")]
    NoToken(String),
    /// A join token that cannot be used, and why.
    #[error("{0}")]
    TokenRefused(String),
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

/// What the coordinator remembers about an agent between connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Agent id.
    pub id: String,
    /// Labels from its last hello.
    pub labels: BTreeMap<String, String>,
    /// Last contact (Unix ms).
    pub last_seen_unix_ms: u64,
    /// The fleet version it last acknowledged.
    pub applied_version: Option<u64>,
    /// Whether that apply succeeded on every forward.
    pub applied_ok: bool,
    /// Per-forward failures of that apply.
    pub apply_errors: Vec<String>,
    /// Labels its join token gave it; they override what its hello declares.
    #[serde(default)]
    pub enrolled_labels: BTreeMap<String, String>,
}

/// Revisions kept for `profiles history` and rollback; older ones are pruned.
pub const HISTORY_KEPT: usize = 1000;

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

/// A revision without its contents, for listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionSummary {
    /// The fleet version.
    pub version: u64,
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// What changed.
    pub what: String,
    /// Profiles after it.
    pub profiles: usize,
    /// Assignments after it.
    pub assignments: usize,
}

/// The fleet's profiles and assignments at one version (see [`Store::snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The fleet version.
    pub version: u64,
    assignments: Vec<Assignment>,
    profiles: BTreeMap<String, ProfileSpec>,
}

impl Snapshot {
    /// Names of the profiles assigned to an agent.
    pub fn names_for(
        &self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> std::collections::BTreeSet<String> {
        self.assignments
            .iter()
            .filter(|a| a.selector.matches(id, labels))
            .filter(|a| self.profiles.contains_key(&a.profile))
            .map(|a| a.profile.clone())
            .collect()
    }

    /// The set of `names` at this version.
    pub fn set_of(&self, names: &std::collections::BTreeSet<String>) -> ProfileSet {
        ProfileSet {
            version: self.version,
            profiles: names
                .iter()
                .filter_map(|n| self.profiles.get(n).cloned())
                .collect(),
        }
    }

    /// The profile set an agent must run at this version.
    pub fn set_for(&self, id: &str, labels: &BTreeMap<String, String>) -> ProfileSet {
        self.set_of(&self.names_for(id, labels))
    }
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
    pub fn validate(&self) -> Result<(), String> {
        if !tunnelfleet_protocol::addr::valid_name(&self.name) {
            return Err(format!("name: {:?} is not a valid group name", self.name));
        }
        if self.endpoints.is_empty() {
            return Err("endpoints: at least one host:port is required".into());
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            tunnelfleet_protocol::addr::split_host_port(e, None)
                .map_err(|r| format!("endpoints[{i}]: {r}"))?;
            if self.endpoints[..i].contains(e) {
                return Err(format!("endpoints[{i}]: {e} is listed twice"));
            }
        }
        if self.threshold == 0 {
            return Err("threshold: must be at least 1".into());
        }
        if self.probe_interval.is_zero() || self.probe_timeout.is_zero() {
            return Err("probe_interval and probe_timeout must be more than 0".into());
        }
        Ok(())
    }
}

/// One event-log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number.
    pub seq: u64,
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// What happened.
    pub text: String,
}

/// Group-commit counters of [`Store::durable`].
#[derive(Debug, Default)]
struct GroupCommit {
    /// Tickets handed out (one per durable write, after the write).
    taken: std::sync::atomic::AtomicU64,
    /// The highest ticket covered by a finished flush.
    flushed: std::sync::atomic::AtomicU64,
    /// Flushes run.
    flushes: std::sync::atomic::AtomicU64,
}

/// The coordinator's persistent state.
#[derive(Clone)]
pub struct Store {
    /// One flush at a time. sled 0.34 runs every `flush_async` on its small IO thread pool,
    /// and the log writes a flush waits for need a thread from that same pool: hundreds of
    /// agents connecting at once (one durable record each) blocked every pool thread in a
    /// flush and the store deadlocked (found by bench-fleet).
    flush_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Group commit: tickets taken by writers after their write, and the highest ticket a
    /// finished flush covered. A writer queued behind a flush that started after its write
    /// returns without flushing again, so 10,000 agents acknowledging a push cost a handful of
    /// flushes instead of 10,000 in a row.
    tickets: std::sync::Arc<GroupCommit>,
    db: sled::Db,
    meta: sled::Tree,
    profiles: sled::Tree,
    assignments: sled::Tree,
    agents: sled::Tree,
    events: sled::Tree,
    groups: sled::Tree,
    alerts: sled::Tree,
    outbox: sled::Tree,
    silences: sled::Tree,
    tokens: sled::Tree,
    revoked: sled::Tree,
    history: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store in `dir`, checking the schema version.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::open(dir)?;
        let s = Store {
            flush_lock: std::sync::Arc::new(tokio::sync::Mutex::new(())),
            tickets: std::sync::Arc::default(),
            meta: db.open_tree("meta")?,
            profiles: db.open_tree("profiles")?,
            assignments: db.open_tree("assignments")?,
            agents: db.open_tree("agents")?,
            events: db.open_tree("events")?,
            groups: db.open_tree("groups")?,
            alerts: db.open_tree("alerts")?,
            outbox: db.open_tree("outbox")?,
            silences: db.open_tree("silences")?,
            tokens: db.open_tree("tokens")?,
            revoked: db.open_tree("revoked")?,
            history: db.open_tree("history")?,
            db,
        };
        match s.meta.get(META_SCHEMA)? {
            Some(v) => {
                let found = u64_of(&v);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: dir.display().to_string(),
                        found,
                    });
                }
                if found < SCHEMA_VERSION {
                    s.migrate_profiles_to_v2()?;
                }
            }
            None => {
                s.meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                s.db.flush()?;
            }
        }
        Ok(s)
    }

    /// Schema 1 to 2: rewrites every stored profile (and every profile in the history) from
    /// protocol 3's `*_ms` form. Each record converts the same way twice, and the schema mark
    /// is written only after the records are flushed, so a crash midway repeats it harmlessly.
    fn migrate_profiles_to_v2(&self) -> Result<(), StoreError> {
        let bad = |tree: &'static str, key: String, e: serde_json::Error| StoreError::Corrupt {
            tree,
            key,
            reason: e.to_string(),
        };
        for r in self.profiles.iter() {
            let (k, v) = r?;
            let p = tunnelfleet_protocol::legacy::profile_from_json(&v)
                .map_err(|e| bad("profiles", String::from_utf8_lossy(&k).into(), e))?;
            self.profiles.insert(k, json(&p))?;
        }
        for r in self.history.iter() {
            let (k, v) = r?;
            let key = || u64_of(&k).to_string();
            let mut rev: serde_json::Value =
                serde_json::from_slice(&v).map_err(|e| bad("history", key(), e))?;
            if let Some(list) = rev.get_mut("profiles").and_then(|p| p.as_array_mut()) {
                for p in list.iter_mut() {
                    let bytes = serde_json::to_vec(p).map_err(|e| bad("history", key(), e))?;
                    let spec = tunnelfleet_protocol::legacy::profile_from_json(&bytes)
                        .map_err(|e| bad("history", key(), e))?;
                    *p = serde_json::to_value(&spec).map_err(|e| bad("history", key(), e))?;
                }
            }
            self.history.insert(k, json(&rev))?;
        }
        self.db.flush()?;
        self.meta
            .insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
        self.db.flush()?;
        tracing::info!("state store migrated to schema {SCHEMA_VERSION}");
        Ok(())
    }

    /// The current fleet version (bumped by every profile or assignment change).
    pub fn fleet_version(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta
            .get(META_FLEET_VERSION)?
            .map(|v| u64_of(&v))
            .unwrap_or(0))
    }

    /// Creates or replaces a profile; returns the new fleet version once it is durable.
    pub async fn put_profile(&self, spec: &ProfileSpec) -> Result<u64, StoreError> {
        if let Some(g) = &spec.group
            && self.groups.get(g.as_bytes())?.is_none()
        {
            return Err(StoreError::UnknownGroup {
                profile: spec.name.clone(),
                group: g.clone(),
            });
        }
        let value = json(spec);
        let name = spec.name.clone();
        self.change(&format!("profile {name} applied"), |profiles, _| {
            profiles.insert(name.as_bytes(), value.clone())?;
            Ok(())
        })
        .await
    }

    /// Deletes a profile and its assignments; returns the new fleet version once durable.
    pub async fn delete_profile(&self, name: &str) -> Result<u64, StoreError> {
        if self.profiles.get(name.as_bytes())?.is_none() {
            return Err(StoreError::NoProfile(name.to_string()));
        }
        let doomed: Vec<sled::IVec> = self
            .assignments
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| {
                serde_json::from_slice::<Assignment>(v).is_ok_and(|a| a.profile == name)
            })
            .map(|(k, _)| k)
            .collect();
        self.change(
            &format!("profile {name} deleted"),
            |profiles, assignments| {
                profiles.remove(name.as_bytes())?;
                for k in &doomed {
                    assignments.remove(k)?;
                }
                Ok(())
            },
        )
        .await
    }

    /// Adds an assignment; returns the new fleet version once durable.
    pub async fn assign(&self, a: &Assignment) -> Result<u64, StoreError> {
        if self.profiles.get(a.profile.as_bytes())?.is_none() {
            return Err(StoreError::NoProfile(a.profile.clone()));
        }
        let key = json(a);
        self.change(
            &format!("assigned {} to {:?}", a.profile, a.selector),
            |_, assignments| {
                assignments.insert(key.clone(), key.clone())?;
                Ok(())
            },
        )
        .await
    }

    /// Every profile, by name.
    pub fn profiles(&self) -> Result<Vec<ProfileSpec>, StoreError> {
        decode_all(&self.profiles, "profiles")
    }

    /// Every assignment.
    pub fn assignments(&self) -> Result<Vec<Assignment>, StoreError> {
        decode_all(&self.assignments, "assignments")
    }

    /// The profile set an agent must run now.
    pub fn profiles_for(
        &self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<ProfileSet, StoreError> {
        Ok(self.snapshot()?.set_for(id, labels))
    }

    /// Everything a push needs, read once: the version, the assignments, and every profile
    /// with its OMA group resolved into endpoints (active endpoint first).
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let groups: BTreeMap<String, OmaGroup> = self
            .groups()?
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        let profiles = self
            .profiles()?
            .into_iter()
            .map(|p| {
                let p = match p.group.as_ref().and_then(|g| groups.get(g)) {
                    Some(g) => p.resolved(&g.ordered()),
                    None => p,
                };
                (p.name.clone(), p)
            })
            .collect();
        Ok(Snapshot {
            version: self.fleet_version()?,
            assignments: self.assignments()?,
            profiles,
        })
    }

    /// Records an agent's contact (durable before return).
    pub async fn record_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.agents.insert(rec.id.as_bytes(), json(rec))?;
        self.durable().await
    }

    /// One agent's record.
    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.agents
            .get(id.as_bytes())?
            .map(|v| decode(&v, "agents", id))
            .transpose()
    }

    /// Every agent ever seen.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        decode_all(&self.agents, "agents")
    }

    /// The last `n` events, oldest first.
    pub fn events(&self, n: usize) -> Result<Vec<Event>, StoreError> {
        let mut v: Vec<Event> = self
            .events
            .iter()
            .rev()
            .take(n)
            .map(|r| {
                let (k, v) = r?;
                decode(&v, "events", &u64_of(&k).to_string())
            })
            .collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

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
        let mut g = def.clone();
        if let Some(old) = self.group(&g.name)? {
            g.active = old.active.filter(|a| g.endpoints.contains(a));
            g.pinned = old.pinned && g.active.is_some();
            g.drained = old
                .drained
                .into_iter()
                .filter(|d| g.endpoints.contains(d))
                .collect();
        } else {
            g.active = None;
            g.drained.clear();
            g.pinned = false;
        }
        let value = json(&g);
        let name = g.name.clone();
        self.change_groups(&format!("OMA group {name} applied"), |groups| {
            groups.insert(name.as_bytes(), value.clone())?;
            Ok(())
        })
        .await
    }

    /// Deletes a group no profile names; returns the new fleet version once durable.
    pub async fn delete_group(&self, name: &str) -> Result<u64, StoreError> {
        if self.group(name)?.is_none() {
            return Err(StoreError::NoGroup(name.to_string()));
        }
        let users: Vec<String> = self
            .profiles()?
            .into_iter()
            .filter(|p| p.group.as_deref() == Some(name))
            .map(|p| p.name)
            .collect();
        if !users.is_empty() {
            return Err(StoreError::GroupInUse {
                group: name.to_string(),
                profiles: users,
            });
        }
        self.change_groups(&format!("OMA group {name} deleted"), |groups| {
            groups.remove(name.as_bytes())?;
            Ok(())
        })
        .await
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
        let mut g = self
            .group(group)?
            .ok_or_else(|| StoreError::NoGroup(group.to_string()))?;
        let from = g.active().unwrap_or_default().to_string();
        g.active = Some(endpoint.to_string());
        g.pinned = pinned;
        let value = json(&g);
        self.change_groups(
            &format!("OMA group {group}: active endpoint {from} -> {endpoint} ({why})"),
            |groups| {
                groups.insert(group.as_bytes(), value.clone())?;
                Ok(())
            },
        )
        .await
    }

    /// Marks `endpoint` drained (or not) in every group that has it; returns the new fleet
    /// version and the groups changed.
    pub async fn set_drained(
        &self,
        endpoint: &str,
        drained: bool,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut changed = Vec::new();
        for mut g in self.groups()? {
            if !g.endpoints.iter().any(|e| e == endpoint) {
                continue;
            }
            if drained {
                g.drained.insert(endpoint.to_string());
            } else {
                g.drained.remove(endpoint);
            }
            changed.push(g);
        }
        if changed.is_empty() {
            return Err(StoreError::NoEndpoint(endpoint.to_string()));
        }
        let names = changed.iter().map(|g| g.name.clone()).collect();
        let verb = if drained { "drained" } else { "undrained" };
        let version = self
            .change_groups(&format!("OMA endpoint {endpoint} {verb}"), |groups| {
                for g in &changed {
                    groups.insert(g.name.as_bytes(), json(g))?;
                }
                Ok(())
            })
            .await?;
        Ok((version, names))
    }

    /// Appends an event to the log (durable before return).
    pub async fn log_event(&self, text: &str) -> Result<(), StoreError> {
        let seq = self.db.generate_id()?;
        let event = json(&Event {
            seq,
            at_unix_ms: now_unix_ms(),
            text: text.to_string(),
        });
        self.events.insert(seq.to_be_bytes(), event)?;
        self.durable().await
    }

    /// Alerts, newest first; only firing ones unless `all`.
    pub fn alerts(&self, all: bool) -> Result<Vec<Alert>, StoreError> {
        let mut v: Vec<Alert> = decode_all(&self.alerts, "alerts")?;
        v.retain(|a| all || a.status == AlertStatus::Firing);
        v.reverse();
        Ok(v)
    }

    /// One alert.
    pub fn alert(&self, id: u64) -> Result<Option<Alert>, StoreError> {
        self.alerts
            .get(id.to_be_bytes())?
            .map(|v| decode(&v, "alerts", &id.to_string()))
            .transpose()
    }

    /// Records a new firing alert (id assigned here) and queues one delivery per hook unless a
    /// silence matches; durable before return.
    pub async fn fire_alert(
        &self,
        mut alert: Alert,
        hooks: &[String],
    ) -> Result<Alert, StoreError> {
        alert.id = self.db.generate_id()? + 1;
        alert.status = AlertStatus::Firing;
        alert.silenced = self.silenced(&alert.key(), now_unix_ms())?;
        self.write_alert(&alert, hooks).await?;
        Ok(alert)
    }

    /// Resolves a firing alert and queues its resolution to the hooks its firing went to.
    pub async fn resolve_alert(&self, id: u64, hooks: &[String]) -> Result<Alert, StoreError> {
        let mut alert = self.alert(id)?.ok_or(StoreError::NoAlert(id))?;
        alert.status = AlertStatus::Resolved;
        alert.resolved_unix_ms = Some(now_unix_ms());
        self.write_alert(&alert, hooks).await?;
        Ok(alert)
    }

    /// Acknowledges an alert (someone is on it).
    pub async fn ack_alert(&self, id: u64, by: &str) -> Result<Alert, StoreError> {
        let mut alert = self.alert(id)?.ok_or(StoreError::NoAlert(id))?;
        alert.acked_by = Some(by.to_string());
        alert.acked_unix_ms = Some(now_unix_ms());
        self.alerts.insert(id.to_be_bytes(), json(&alert))?;
        self.durable().await?;
        Ok(alert)
    }

    async fn write_alert(&self, alert: &Alert, hooks: &[String]) -> Result<(), StoreError> {
        {
            let mut deliveries = Vec::new();
            if !alert.silenced {
                for h in hooks {
                    let seq = self.db.generate_id()?;
                    deliveries.push((
                        seq,
                        json(&Delivery {
                            seq,
                            hook: h.clone(),
                            idempotency_key: alert.idempotency_key(),
                            alert: alert.clone(),
                            attempts: 0,
                            next_attempt_unix_ms: 0,
                            last_error: None,
                        }),
                    ));
                }
            }
            let value = json(alert);
            (&self.alerts, &self.outbox)
                .transaction(|(alerts, outbox)| {
                    alerts.insert(&alert.id.to_be_bytes(), value.clone())?;
                    for (seq, d) in &deliveries {
                        outbox.insert(&seq.to_be_bytes(), d.clone())?;
                    }
                    Ok(())
                })
                .map_err(tx_error)?;
            self.durable().await
        }
    }

    /// Every queued delivery, oldest first.
    pub fn deliveries(&self) -> Result<Vec<Delivery>, StoreError> {
        decode_all(&self.outbox, "outbox")
    }

    /// A delivery succeeded: it leaves the outbox (durable before return).
    pub async fn delivered(&self, seq: u64) -> Result<(), StoreError> {
        self.outbox.remove(seq.to_be_bytes())?;
        self.durable().await
    }

    /// A delivery failed: record the attempt and when to try again.
    pub async fn delivery_failed(&self, d: &Delivery) -> Result<(), StoreError> {
        self.outbox.insert(d.seq.to_be_bytes(), json(d))?;
        self.durable().await
    }

    /// Adds a silence; returns it with its id.
    pub async fn add_silence(&self, mut s: Silence) -> Result<Silence, StoreError> {
        s.id = self.db.generate_id()? + 1;
        self.silences.insert(s.id.to_be_bytes(), json(&s))?;
        self.durable().await?;
        Ok(s)
    }

    /// Silences still in force at `now_unix_ms`.
    pub fn silences(&self, now_unix_ms: u64) -> Result<Vec<Silence>, StoreError> {
        let mut v: Vec<Silence> = decode_all(&self.silences, "silences")?;
        v.retain(|s| s.until_unix_ms > now_unix_ms);
        Ok(v)
    }

    fn silenced(&self, key: &str, now_unix_ms: u64) -> Result<bool, StoreError> {
        Ok(self
            .silences(now_unix_ms)?
            .iter()
            .any(|s| glob_match(&s.matcher, key)))
    }

    /// Stores a new join token under the SHA-256 of its secret (the secret is never stored).
    pub async fn put_token(&self, hash: &str, t: &JoinToken) -> Result<(), StoreError> {
        self.tokens.insert(hash.as_bytes(), json(t))?;
        self.log_event(&format!(
            "join token {} created (labels {:?}, agent {:?})",
            t.id, t.labels, t.agent
        ))
        .await
    }

    /// Every join token, used and expired ones included.
    pub fn tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        let mut v: Vec<JoinToken> = decode_all(&self.tokens, "tokens")?;
        v.sort_by_key(|t| t.created_unix_ms);
        Ok(v)
    }

    /// Deletes a join token by its id.
    pub async fn delete_token(&self, id: &str) -> Result<(), StoreError> {
        let key = self
            .tokens
            .iter()
            .find_map(|r| {
                let (k, v) = r.ok()?;
                let t: JoinToken = serde_json::from_slice(&v).ok()?;
                (t.id == id).then_some(k)
            })
            .ok_or_else(|| StoreError::NoToken(id.to_string()))?;
        self.tokens.remove(key)?;
        self.log_event(&format!("join token {id} deleted")).await
    }

    /// Spends the token whose secret hashes to `hash` for `agent_id`, at `now_unix_ms`: it must
    /// exist, be unused and unexpired, name this agent if it names one, and an agent the
    /// coordinator already knows may only be enrolled again by a token that names it. The
    /// spend is durable before this returns: a token is never good twice, even across kill -9.
    pub async fn spend_token(
        &self,
        hash: &str,
        agent_id: &str,
        now_unix_ms: u64,
    ) -> Result<JoinToken, StoreError> {
        let known = self.agents.get(agent_id.as_bytes())?.is_some();
        let refused = |r: String| {
            Err(sled::transaction::ConflictableTransactionError::Abort(
                StoreError::TokenRefused(r),
            ))
        };
        let result = self.tokens.transaction(|tx| {
            let Some(v) = tx.get(hash.as_bytes())? else {
                return refused("unknown join token".into());
            };
            let mut t: JoinToken = match serde_json::from_slice(&v) {
                Ok(t) => t,
                Err(e) => return refused(format!("join token record unreadable: {e}")),
            };
            if let Some(by) = &t.used_by {
                return refused(format!(
                    "join token {} was already used (by agent {by:?})",
                    t.id
                ));
            }
            if now_unix_ms >= t.expires_unix_ms {
                return refused(format!(
                    "join token {} expired {} ago",
                    t.id,
                    humantime::format_duration(std::time::Duration::from_secs(
                        (now_unix_ms - t.expires_unix_ms) / 1000
                    ))
                ));
            }
            match &t.agent {
                Some(a) if a != agent_id => {
                    return refused(format!(
                        "join token {} is for agent {a:?}, not {agent_id:?}",
                        t.id
                    ));
                }
                None if known => {
                    return refused(format!(
                        "agent {agent_id:?} is already enrolled; re-enrolling it needs a token made for it (tunnelfleet token create --agent {agent_id})"
                    ));
                }
                _ => {}
            }
            t.used_by = Some(agent_id.to_string());
            t.used_unix_ms = Some(now_unix_ms);
            tx.insert(hash.as_bytes(), json(&t))?;
            Ok(t)
        });
        let t = match result {
            Ok(t) => t,
            Err(sled::transaction::TransactionError::Abort(e)) => return Err(e),
            Err(sled::transaction::TransactionError::Storage(e)) => return Err(e.into()),
        };
        // The agent's record carries the token's labels from now on.
        let mut rec = self.agent(agent_id)?.unwrap_or_default();
        rec.id = agent_id.to_string();
        rec.enrolled_labels = t.labels.clone();
        self.agents.insert(agent_id.as_bytes(), json(&rec))?;
        self.log_event(&format!(
            "agent {agent_id} enrolled with join token {}",
            t.id
        ))
        .await?;
        Ok(t)
    }

    /// Revokes an agent: it is refused from now on, whatever certificate it holds.
    pub async fn revoke(&self, agent_id: &str, reason: &str) -> Result<Revocation, StoreError> {
        let r = Revocation {
            agent: agent_id.to_string(),
            at_unix_ms: now_unix_ms(),
            reason: reason.to_string(),
        };
        self.revoked.insert(agent_id.as_bytes(), json(&r))?;
        self.log_event(&format!("agent {agent_id} revoked: {reason}"))
            .await?;
        Ok(r)
    }

    /// Lifts a revocation; returns whether there was one.
    pub async fn unrevoke(&self, agent_id: &str) -> Result<bool, StoreError> {
        let had = self.revoked.remove(agent_id.as_bytes())?.is_some();
        if had {
            self.log_event(&format!("agent {agent_id} no longer revoked"))
                .await?;
        }
        Ok(had)
    }

    /// The revocation of an agent, if any.
    pub fn revocation(&self, agent_id: &str) -> Result<Option<Revocation>, StoreError> {
        self.revoked
            .get(agent_id.as_bytes())?
            .map(|v| decode(&v, "revoked", agent_id))
            .transpose()
    }

    /// Every revoked agent.
    pub fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        decode_all(&self.revoked, "revoked")
    }

    /// Groups changes (bumps the fleet version, logs the event) in one transaction.
    async fn change_groups<F>(&self, what: &str, f: F) -> Result<u64, StoreError>
    where
        F: Fn(
            &sled::transaction::TransactionalTree,
        ) -> sled::transaction::ConflictableTransactionResult<(), sled::Error>,
    {
        let seq = self.db.generate_id()?;
        let event = json(&Event {
            seq,
            at_unix_ms: now_unix_ms(),
            text: what.to_string(),
        });
        let version = (&self.groups, &self.meta, &self.events)
            .transaction(|(groups, meta, events)| {
                f(groups)?;
                let next = meta
                    .get(META_FLEET_VERSION)?
                    .map(|v| u64_of(&v))
                    .unwrap_or(0)
                    + 1;
                meta.insert(META_FLEET_VERSION, &next.to_be_bytes())?;
                events.insert(&seq.to_be_bytes(), event.clone())?;
                Ok(next)
            })
            .map_err(tx_error)?;
        self.durable().await?;
        Ok(version)
    }

    /// Returns once everything this caller wrote is on disk: by its own flush, or by one that
    /// started after its write (group commit; see `flush_lock` for why one flush at a time).
    async fn durable(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        // Taken after this caller's writes: any flush that starts later covers them.
        let ticket = self.tickets.taken.fetch_add(1, SeqCst) + 1;
        let _one = self.flush_lock.lock().await;
        if self.tickets.flushed.load(SeqCst) >= ticket {
            return Ok(());
        }
        // Every ticket up to here was taken after its write, so this flush covers them all.
        let covers = self.tickets.taken.load(SeqCst);
        self.db.flush_async().await?;
        self.tickets.flushed.store(covers, SeqCst);
        self.tickets.flushes.fetch_add(1, SeqCst);
        Ok(())
    }

    /// Flushes run since the store was opened (`durable` calls share them).
    pub fn flushes(&self) -> u64 {
        self.tickets
            .flushes
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Applies a change to profiles/assignments, bumps the fleet version and logs an event,
    /// atomically; returns the new version after `flush_async`.
    async fn change<F>(&self, what: &str, f: F) -> Result<u64, StoreError>
    where
        F: Fn(
            &sled::transaction::TransactionalTree,
            &sled::transaction::TransactionalTree,
        ) -> sled::transaction::ConflictableTransactionResult<(), sled::Error>,
    {
        let seq = self.db.generate_id()?;
        let event = json(&Event {
            seq,
            at_unix_ms: now_unix_ms(),
            text: what.to_string(),
        });
        let version = (&self.profiles, &self.assignments, &self.meta, &self.events)
            .transaction(|(profiles, assignments, meta, events)| {
                f(profiles, assignments)?;
                let next = meta
                    .get(META_FLEET_VERSION)?
                    .map(|v| u64_of(&v))
                    .unwrap_or(0)
                    + 1;
                meta.insert(META_FLEET_VERSION, &next.to_be_bytes())?;
                events.insert(&seq.to_be_bytes(), event.clone())?;
                Ok(next)
            })
            .map_err(tx_error)?;
        // The revision goes to disk with the change itself (one flush below).
        let rev = Revision {
            version,
            at_unix_ms: now_unix_ms(),
            what: what.to_string(),
            profiles: self.profiles()?,
            assignments: self.assignments()?,
        };
        self.history.insert(version.to_be_bytes(), json(&rev))?;
        while self.history.len() > HISTORY_KEPT {
            if self.history.pop_min()?.is_none() {
                break;
            }
        }
        self.durable().await?;
        Ok(version)
    }

    /// The last `n` revisions, newest first.
    pub fn history(&self, n: usize) -> Result<Vec<RevisionSummary>, StoreError> {
        self.history
            .iter()
            .rev()
            .take(n)
            .map(|r| {
                let (k, v) = r?;
                let rev: Revision = decode(&v, "history", &u64_of(&k).to_string())?;
                Ok(RevisionSummary {
                    version: rev.version,
                    at_unix_ms: rev.at_unix_ms,
                    what: rev.what,
                    profiles: rev.profiles.len(),
                    assignments: rev.assignments.len(),
                })
            })
            .collect()
    }

    /// One revision.
    pub fn revision(&self, version: u64) -> Result<Revision, StoreError> {
        self.history
            .get(version.to_be_bytes())?
            .map(|v| decode(&v, "history", &version.to_string()))
            .transpose()?
            .ok_or(StoreError::NoRevision(version))
    }

    /// Makes the profiles and assignments what revision `version` left them, as a new version
    /// (history only grows). Refused when a profile names an OMA group that no longer exists.
    pub async fn rollback(&self, version: u64) -> Result<u64, StoreError> {
        let rev = self.revision(version)?;
        for p in &rev.profiles {
            if let Some(g) = &p.group
                && self.groups.get(g.as_bytes())?.is_none()
            {
                return Err(StoreError::UnknownGroup {
                    profile: p.name.clone(),
                    group: g.clone(),
                });
            }
        }
        let current_profiles: Vec<sled::IVec> =
            self.profiles.iter().keys().collect::<Result<_, _>>()?;
        let current_assignments: Vec<sled::IVec> =
            self.assignments.iter().keys().collect::<Result<_, _>>()?;
        let profiles: Vec<(String, Vec<u8>)> = rev
            .profiles
            .iter()
            .map(|p| (p.name.clone(), json(p)))
            .collect();
        let assignments: Vec<Vec<u8>> = rev.assignments.iter().map(json).collect();
        self.change(
            &format!("rollback to version {version} ({})", rev.what),
            |pt, at| {
                for k in &current_profiles {
                    pt.remove(k)?;
                }
                for k in &current_assignments {
                    at.remove(k)?;
                }
                for (name, v) in &profiles {
                    pt.insert(name.as_bytes(), v.clone())?;
                }
                for a in &assignments {
                    at.insert(a.clone(), a.clone())?;
                }
                Ok(())
            },
        )
        .await
    }
}

fn tx_error(e: sled::transaction::TransactionError<sled::Error>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Abort(e)
        | sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain structs of strings and numbers to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(
    v: &[u8],
    tree: &'static str,
    key: &str,
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn decode_all<T: serde::de::DeserializeOwned>(
    t: &sled::Tree,
    tree: &'static str,
) -> Result<Vec<T>, StoreError> {
    t.iter()
        .map(|r| {
            let (k, v) = r?;
            decode(&v, tree, &String::from_utf8_lossy(&k))
        })
        .collect()
}

fn u64_of(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use std::sync::atomic::Ordering::SeqCst;

    use super::*;

    /// Fifty writers queued behind a flush in progress are all covered by the next single
    /// flush, and each still returns only after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_queued_behind_a_flush_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (flushes, taken) = (s.flushes(), s.tickets.taken.load(SeqCst));
        // A flush in progress: the lock held.
        let held = s.flush_lock.clone().lock_owned().await;
        let writers: Vec<_> = (0..50)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let rec = AgentRecord {
                        id: format!("a{i}"),
                        ..Default::default()
                    };
                    s.record_agent(&rec).await
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while s.tickets.taken.load(SeqCst) < taken + 50 {
            assert!(tokio::time::Instant::now() < deadline, "writers stuck");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "none returned unflushed"
        );
        drop(held);
        for w in writers {
            w.await.unwrap().unwrap();
        }
        assert_eq!(s.flushes() - flushes, 1);
        assert_eq!(s.tickets.flushed.load(SeqCst), taken + 50);
        assert_eq!(s.agents().unwrap().len(), 50);
        // A write after that flush is not covered by it: it flushes again.
        s.record_agent(&AgentRecord {
            id: "late".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(s.flushes() - flushes, 2);
    }
}
