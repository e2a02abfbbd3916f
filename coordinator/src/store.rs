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

use serde::{Deserialize, Serialize};
use sled::Transactional;
use tunnelfleet_protocol::{ProfileSet, ProfileSpec};

/// The schema this build writes and reads.
pub const SCHEMA_VERSION: u64 = 1;

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

/// The coordinator's persistent state.
#[derive(Clone)]
pub struct Store {
    /// One flush at a time. sled 0.34 runs every `flush_async` on its small IO thread pool,
    /// and the log writes a flush waits for need a thread from that same pool: hundreds of
    /// agents connecting at once (one durable record each) blocked every pool thread in a
    /// flush and the store deadlocked (found by bench-fleet). Queued callers still each get
    /// their write flushed before they return.
    flush_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    db: sled::Db,
    meta: sled::Tree,
    profiles: sled::Tree,
    assignments: sled::Tree,
    agents: sled::Tree,
    events: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store in `dir`, checking the schema version.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::open(dir)?;
        let s = Store {
            flush_lock: std::sync::Arc::new(tokio::sync::Mutex::new(())),
            meta: db.open_tree("meta")?,
            profiles: db.open_tree("profiles")?,
            assignments: db.open_tree("assignments")?,
            agents: db.open_tree("agents")?,
            events: db.open_tree("events")?,
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
            }
            None => {
                s.meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                s.db.flush()?;
            }
        }
        Ok(s)
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
        let wanted: std::collections::BTreeSet<String> = self
            .assignments()?
            .into_iter()
            .filter(|a| a.selector.matches(id, labels))
            .map(|a| a.profile)
            .collect();
        let profiles = self
            .profiles()?
            .into_iter()
            .filter(|p| wanted.contains(&p.name))
            .collect();
        Ok(ProfileSet {
            version: self.fleet_version()?,
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

    /// Flushes everything written so far; see `flush_lock` for why one at a time.
    async fn durable(&self) -> Result<(), StoreError> {
        let _one = self.flush_lock.lock().await;
        self.db.flush_async().await?;
        Ok(())
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
            at_unix_ms: now_ms(),
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
            .map_err(
                |e: sled::transaction::TransactionError<sled::Error>| match e {
                    sled::transaction::TransactionError::Abort(e)
                    | sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                },
            )?;
        self.db.flush_async().await?;
        Ok(version)
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
