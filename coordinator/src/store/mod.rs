//! Fleet state: one file per record family, and the transaction that bumps the fleet version
//! once.
//!
//! Everything the coordinator acknowledges to anyone is durable first: every write method is
//! `async` and returns only after the engine made it durable, so an acknowledged change
//! survives kill -9. Multi-tree changes (a profile and the fleet version that numbers it) go
//! in one transaction. Records are JSON so a schema change is visible and migratable; the
//! schema version is checked at open and a store written by a newer coordinator is refused.
//! The record families see only [`engine`]'s trees and transactions; sled stays inside it.
//!
//! # Layout
//! - [`engine`]: the key-value engine (sled): trees, transactions, ids, group commit.
//! - [`change`]: every change of the profiles, assignments and OMA groups: worked out at one
//!   fleet version and committed only at it, with its event and revision.
//! - [`model`]: what a change works on and makes: the fleet at one version, the profiles and
//!   assignments it leaves, the version step.
//! - [`profiles`]: profiles, assignments and the snapshot a push is made from.
//! - [`live`]: agents' evidence from every coordinator, for the leader's rules.
//! - [`history`]: revisions for `profiles history` and rollback.
//! - [`groups`]: OMA groups: definition, active endpoint, drains.
//! - [`agents`]: what is remembered about each agent between connections.
//! - [`events`]: the event log.
//! - [`alerts`]: alerts from firing to resolution.
//! - [`outbox`]: each alert state on its way to each hook, written with the alert.
//! - [`silences`]: alerts recorded but not delivered while a silence matches.
//! - [`tokens`]: join tokens and revocations.
//! - [`ssh_certs`]: the latest SSH certificate issued to each agent.
//! - [`access`]: named admin tokens with their roles, and the audit log.
//! - [`rollouts`]: staged rollouts: the stages, where they stand, what the fleet ran before.
//! - [`copy`]: a fleet's state moved into another store, records byte for byte (`migrate`).
//! - [`coordinators`]: the coordinators sharing the store and the one that leads (a lease
//!   each; the leader's writes fenced by its claim).
//! - [`schema`]: the schema version and migrations.

mod access;
mod agents;
mod alerts;
mod change;
mod coordinators;
mod copy;
mod engine;
mod events;
mod groups;
mod history;
mod live;
mod model;
mod outbox;
mod profiles;
mod rollouts;
mod schema;
mod silences;
mod ssh_certs;
mod tokens;

use std::path::Path;

use serde::Serialize;
use tunnelfleet_runtime::clock::now_unix_ms;

use engine::{Db, Tree};

pub use access::{AUDIT_RETENTION, AdminToken, AuditEntry, Role, UnknownRole};
pub use agents::{AgentRecord, Labels};
pub use alerts::{Alert, AlertKind, AlertStatus, alert_key};
pub use coordinators::{CoordinatorRecord, Membership, Standing};
pub use copy::{Copied, CopyError};
pub use engine::DiskError;
pub use events::Event;
pub use history::{HISTORY_KEPT, RevisionSummary};
pub use live::{LiveRecord, latest_per_agent};
pub use model::{Assignment, GroupError, OmaGroup, Revision, Selector};
pub use outbox::Delivery;
pub use profiles::{SetKey, Snapshot};
pub use rollouts::{Rollout, RolloutState, Stage};
pub use silences::{Silence, glob_match};
pub use ssh_certs::SshCertRecord;
pub use tokens::{JoinToken, Revocation};

/// Where an etcd store is (`store = "etcd"` with an `[etcd]` section in coordinator.toml).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`https://etcd-1:2379`, …).
    pub endpoints: Vec<String>,
    /// Every key of this fleet starts with it (several fleets may share one cluster).
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// The CA etcd's certificates are checked against (TLS when set).
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// This coordinator's client certificate for etcd (with `key`).
    #[serde(default)]
    pub cert: Option<std::path::PathBuf>,
    /// Its private key (refused when group or others can read it).
    #[serde(default)]
    pub key: Option<std::path::PathBuf>,
    /// An etcd user (etcd's own auth), with `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    /// The file holding that user's password (0600).
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// How long one etcd request may take.
    #[serde(default = "default_etcd_timeout", with = "humantime_serde")]
    pub timeout: std::time::Duration,
    /// The lease a coordinator registers and leads under: a leader that dies is replaced
    /// within it (it steps down itself after half of it without renewing).
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: std::time::Duration,
    /// Spread the agents over the coordinators: one holding more than its share of the links
    /// (after a peer restarted, say) asks a few at a time to link to another
    /// (`tunnelfleet_coordinator::balance`). Off: agents stay where they linked.
    #[serde(default = "default_rebalance")]
    pub rebalance: bool,
}

fn default_rebalance() -> bool {
    true
}

fn default_lease_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(3)
}

fn default_etcd_prefix() -> String {
    "/tunnelfleet/".into()
}

fn default_etcd_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

impl EtcdConfig {
    /// The defaults with these endpoints.
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: default_etcd_prefix(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
            timeout: default_etcd_timeout(),
            lease_ttl: default_lease_ttl(),
            rebalance: default_rebalance(),
        }
    }
}

/// The schema this build writes and reads.
/// 2: profiles in the one profile model (durations as `"15s"`, `autostart`), protocol 4.
pub const SCHEMA_VERSION: u64 = 2;

const META_SCHEMA: &[u8] = b"schema_version";
const META_FLEET_VERSION: &[u8] = b"fleet_version";
/// A random identity of this state directory, made when it is created (or first opened by a
/// version that has it): alert idempotency keys carry it, so a directory recreated from
/// scratch (ids from 1 again) never repeats the keys of the one it replaced.
const META_STORE_ID: &[u8] = b"store_id";

/// Set once the `firing` index of the alerts holds every firing alert (stores written before it
/// existed get it built at open).
const META_FIRING_INDEXED: &[u8] = b"firing_indexed";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The local state directory failed (IO, corruption).
    #[error("state store: {0}")]
    Disk(DiskError),
    /// etcd refused or did not answer (no quorum, unreachable, a limit).
    #[error("state store in etcd ({endpoints}): {reason}")]
    Etcd {
        /// The endpoints as configured.
        endpoints: String,
        /// What failed and why.
        reason: String,
    },
    /// A write of the leader's after it lost the lead (its claim in etcd is gone): not made.
    #[error(
        "this coordinator no longer leads the fleet: the change was not made (the new leader decides)"
    )]
    NotLeader,
    /// A tree of one engine given to another's transaction (a bug, never a peer's doing).
    #[error("state store: a tree of another engine in a transaction")]
    ForeignTree,
    /// A stored record does not decode.
    #[error("state store: record {key:?} in {tree}: {reason}")]
    Corrupt {
        /// Tree name.
        tree: &'static str,
        /// The record's key.
        key: String,
        /// The JSON error.
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
    /// A profile change while a staged rollout is in progress.
    #[error(
        "the staged rollout of version {0} is in progress: finish it, or `tunnelfleet rollout abort`, before another profile change"
    )]
    RolloutInProgress(u64),
    /// No rollout to resume or abort.
    #[error("no staged rollout is in progress")]
    NoRolloutInProgress,
    /// A change (a rollout, a rollback) was worked out on another fleet version than the one
    /// it would commit on.
    #[error(
        "the fleet changed while this change was worked out (from version {planned}, now {now}): run it again"
    )]
    FleetChanged {
        /// The version it was worked out on.
        planned: u64,
        /// The version now.
        now: u64,
    },
    /// No admin token of that name.
    #[error("no admin token named {0:?} (see `tunnelfleet admin-token list`)")]
    NoAdminToken(String),
    /// An admin token name already taken.
    #[error("an admin token named {0:?} exists already (revoke it first to replace it)")]
    AdminTokenExists(String),
    /// A join token that cannot be used, and why.
    #[error("{0}")]
    TokenRefused(String),
}

/// The coordinator's persistent state.
#[derive(Clone)]
pub struct Store {
    db: Db,
    meta: Tree,
    profiles: Tree,
    assignments: Tree,
    agents: Tree,
    events: Tree,
    groups: Tree,
    alerts: Tree,
    outbox: Tree,
    /// The outbox by hook: `hook \0 seq` -> nothing, so a hook's next entry and its backlog
    /// are found without reading the other hooks' entries.
    outbox_by_hook: Tree,
    /// The ids of the firing alerts (`id` -> nothing): what `/metrics`, the watcher's start
    /// and `alerts list` read, without decoding 90 days of resolved ones.
    firing: Tree,
    silences: Tree,
    tokens: Tree,
    revoked: Tree,
    /// Agent id -> its latest SSH certificate ([`SshCertRecord`]).
    ssh_certs: Tree,
    history: Tree,
    /// Staged rollouts: the one in progress under `active`, finished ones by version.
    rollouts: Tree,
    /// Named admin tokens by the SHA-256 of their secret.
    admin_tokens: Tree,
    /// Admin token name -> the hash it is stored under (one token per name).
    admin_names: Tree,
    /// The audit log: `seq` -> [`AuditEntry`].
    audit_log: Tree,
    /// The coordinators up (etcd: each under its own lease): name -> [`CoordinatorRecord`].
    coordinators: Tree,
    /// Agents' evidence by agent and coordinator ([`LiveRecord`]).
    live: Tree,
    /// `leader`: the leading coordinator's name, under its lease (etcd).
    lead: Tree,
    /// [`META_STORE_ID`].
    id: String,
}

impl Store {
    /// Opens (or creates) the store in `dir` (embedded sled), checking the schema version.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::on(Db::open_sled(dir)?, &dir.display().to_string())
    }

    /// Opens the store in etcd (made there if new), checking the schema version: every
    /// coordinator pointed at the same endpoints and prefix shares it.
    pub async fn open_etcd(cfg: &EtcdConfig) -> Result<Store, StoreError> {
        let db = Db::open_etcd(cfg).await?;
        // The identity first, in a transaction: two coordinators opening a new store at once
        // agree on it.
        let meta = db.open_tree("meta")?;
        let fresh = format!("{:016x}", rand::random::<u64>());
        db.transaction([&meta], |[m]| {
            if m.get(META_STORE_ID)?.is_none() {
                m.insert(META_STORE_ID, fresh.as_bytes())?;
            }
            Ok(())
        })
        .await?;
        let s = Store::on(
            db,
            &format!("etcd {}{}", cfg.endpoints.join(","), cfg.prefix),
        )?;
        // What opening wrote (schema version, indexes) is committed before anyone is told.
        s.durable().await?;
        Ok(s)
    }

    /// The store's trees on `db`, nothing read or written.
    fn trees(db: Db, id: String) -> Result<Store, StoreError> {
        Ok(Store {
            meta: db.open_tree("meta")?,
            profiles: db.open_tree("profiles")?,
            assignments: db.open_tree("assignments")?,
            agents: db.open_tree("agents")?,
            events: db.open_tree("events")?,
            groups: db.open_tree("groups")?,
            alerts: db.open_tree("alerts")?,
            outbox: db.open_tree("outbox")?,
            outbox_by_hook: db.open_tree("outbox_by_hook")?,
            firing: db.open_tree("firing")?,
            silences: db.open_tree("silences")?,
            tokens: db.open_tree("tokens")?,
            revoked: db.open_tree("revoked")?,
            ssh_certs: db.open_tree("ssh_certs")?,
            history: db.open_tree("history")?,
            admin_tokens: db.open_tree("admin_tokens")?,
            rollouts: db.open_tree("rollouts")?,
            admin_names: db.open_tree("admin_names")?,
            audit_log: db.open_tree("audit_log")?,
            coordinators: db.open_tree("coordinators")?,
            lead: db.open_tree("lead")?,
            live: db.open_tree("live")?,
            id,
            db,
        })
    }

    fn on(db: Db, path: &str) -> Result<Store, StoreError> {
        let mut s = Store::trees(db, String::new())?;
        s.index_outbox()?;
        s.index_firing()?;
        s.id = match s.meta.get(META_STORE_ID)? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let id = format!("{:016x}", rand::random::<u64>());
                s.meta.insert(META_STORE_ID, id.as_bytes())?;
                s.db.flush()?;
                id
            }
        };
        match s.meta.get(META_SCHEMA)? {
            Some(v) => {
                let found = u64_of(&v);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: path.to_string(),
                        found,
                    });
                }
                if found < SCHEMA_VERSION {
                    s.migrate_profiles_to_v2()?;
                }
            }
            None => {
                s.meta.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes())?;
                s.db.flush()?;
            }
        }
        Ok(s)
    }

    /// Whether other coordinators may share this store (etcd), so changes can come from
    /// elsewhere.
    pub fn shared(&self) -> bool {
        if self.db.etcd().is_some() {
            return true;
        }
        false
    }

    /// On etcd: told each time this coordinator's copy of the state has seen more of it
    /// (anyone's writes); None on sled, where every write is this coordinator's own.
    pub fn changes(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        if let Some(db) = self.db.etcd() {
            return Some(db.revisions());
        }
        None
    }

    /// On etcd: requests sent, failed, and their total time in seconds (None on sled).
    pub fn etcd_stats(&self) -> Option<(u64, u64, f64)> {
        if let Some(db) = self.db.etcd() {
            return Some(db.stats());
        }
        None
    }

    /// This state directory's identity ([`META_STORE_ID`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current fleet version (bumped by every profile or assignment change).
    pub fn fleet_version(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta
            .get(META_FLEET_VERSION)?
            .map(|v| u64_of(&v))
            .unwrap_or(0))
    }

    /// Returns once everything this caller wrote is durable (group commit: see
    /// [`engine::Db::durable`]).
    async fn durable(&self) -> Result<(), StoreError> {
        self.db.durable().await
    }

    /// Flushes run since the store was opened (`durable` calls share them).
    pub fn flushes(&self) -> u64 {
        self.db.flushes()
    }

    /// The event that will number a change, made before its transaction (ids are not
    /// transactional in sled).
    async fn change_event(&self, what: &str) -> Result<(u64, Vec<u8>), StoreError> {
        let seq = self.db.generate_id().await?;
        let event = json(&Event {
            seq,
            at_unix_ms: now_unix_ms(),
            text: what.to_string(),
        });
        Ok((seq, event))
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
    t: &Tree,
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
