//! Profiles and assignments (which agents get which profile), and the [`Snapshot`] every push
//! is made from: read once, each profile's OMA group resolved.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use tunnelfleet_protocol::{ProfileSet, ProfileSpec};

use super::{OmaGroup, Store, StoreError, bump_version, decode_all, json, tx_error};

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

impl Store {
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

    /// Applies a change to profiles/assignments, bumps the fleet version and logs an event,
    /// atomically; returns the new version after `flush_async`.
    pub(super) async fn change<F>(&self, what: &str, f: F) -> Result<u64, StoreError>
    where
        F: Fn(
            &sled::transaction::TransactionalTree,
            &sled::transaction::TransactionalTree,
        ) -> sled::transaction::ConflictableTransactionResult<(), sled::Error>,
    {
        let event = self.change_event(what)?;
        let version = (&self.profiles, &self.assignments, &self.meta, &self.events)
            .transaction(|(profiles, assignments, meta, events)| {
                f(profiles, assignments)?;
                bump_version(meta, events, &event)
            })
            .map_err(tx_error)?;
        // The revision goes to disk with the change itself (one flush below).
        self.record_revision(version, what)?;
        self.durable().await?;
        Ok(version)
    }
}
