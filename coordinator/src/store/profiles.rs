//! Profiles and assignments (which agents get which profile), and the [`Snapshot`] every push
//! is made from: read once, each profile's OMA group resolved.
use std::collections::{BTreeMap, BTreeSet};

use tunnelfleet_protocol::{ProfileSet, ProfileSpec};

use super::model::{Assignment, Base, Contents};
use super::{Store, StoreError, decode_all};

/// The fleet's profiles and assignments at one version (see [`Store::snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The fleet version.
    pub version: u64,
    now: Resolved,
    /// While a staged rollout is in progress: what the agents it has not promoted get.
    held: Option<Held>,
}

/// Profiles (each resolved against its OMA group) and assignments.
#[derive(Debug, Clone, Default)]
struct Resolved {
    assignments: Vec<Assignment>,
    profiles: BTreeMap<String, ProfileSpec>,
}

impl Resolved {
    fn names_for(&self, id: &str, labels: &BTreeMap<String, String>) -> BTreeSet<String> {
        self.assignments
            .iter()
            .filter(|a| a.selector.matches(id, labels))
            .filter(|a| self.profiles.contains_key(&a.profile))
            .map(|a| a.profile.clone())
            .collect()
    }
}

/// The profiles and assignments from before a rollout, and the agents that are past them.
#[derive(Debug, Clone)]
struct Held {
    before: Resolved,
    promoted: BTreeSet<String>,
}

/// Which profile set an agent gets: the names, and whether from before a rollout in progress
/// (agents that share a key share one pushed frame).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetKey {
    /// From before the rollout in progress.
    pub held: bool,
    /// The profiles' names.
    pub names: BTreeSet<String>,
}

impl Snapshot {
    /// The profiles assigned to an agent: the current ones, or those from before a rollout in
    /// progress that has not promoted it.
    pub fn names_for(&self, id: &str, labels: &BTreeMap<String, String>) -> SetKey {
        match &self.held {
            Some(h) if !h.promoted.contains(id) => SetKey {
                held: true,
                names: h.before.names_for(id, labels),
            },
            _ => SetKey {
                held: false,
                names: self.now.names_for(id, labels),
            },
        }
    }

    /// Whether an agent's set differs between before and after the rollout in progress (always
    /// false without one).
    pub fn changes_for(&self, id: &str, labels: &BTreeMap<String, String>) -> bool {
        let Some(h) = &self.held else {
            return false;
        };
        let before = h.before.names_for(id, labels);
        let after = self.now.names_for(id, labels);
        before != after
            || after
                .iter()
                .any(|n| h.before.profiles.get(n) != self.now.profiles.get(n))
    }

    /// The set of `key` at this version.
    pub fn set_of(&self, key: &SetKey) -> ProfileSet {
        let from = match (&self.held, key.held) {
            (Some(h), true) => &h.before,
            _ => &self.now,
        };
        ProfileSet {
            version: self.version,
            profiles: key
                .names
                .iter()
                .filter_map(|n| from.profiles.get(n).cloned())
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
        self.change(&format!("profile {} applied", spec.name), |base| {
            base.check_group(spec)?;
            let mut next = Contents::of(base);
            next.profiles.insert(spec.name.clone(), spec.clone());
            Ok(next)
        })
        .await
    }

    /// Deletes a profile and its assignments; returns the new fleet version once durable.
    pub async fn delete_profile(&self, name: &str) -> Result<u64, StoreError> {
        self.change(&format!("profile {name} deleted"), |base| {
            let mut next = Contents::of(base);
            if next.profiles.remove(name).is_none() {
                return Err(StoreError::NoProfile(name.to_string()));
            }
            next.assignments.retain(|a| a.profile != name);
            Ok(next)
        })
        .await
    }

    /// Adds an assignment; returns the new fleet version once durable.
    pub async fn assign(&self, a: &Assignment) -> Result<u64, StoreError> {
        self.change(
            &format!("assigned {} to {:?}", a.profile, a.selector),
            |base| {
                if !base.profiles.contains_key(&a.profile) {
                    return Err(StoreError::NoProfile(a.profile.clone()));
                }
                let mut next = Contents::of(base);
                next.assignments.push(a.clone());
                Ok(next)
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

    /// Everything a push needs, read at one version: the version, the assignments, and every
    /// profile with its OMA group resolved into endpoints (active endpoint first); during a
    /// staged rollout, the same from before it for the agents it has not promoted.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        loop {
            let base = self.base()?;
            let rollout = self.active_rollout()?;
            // Every rollout step moves the version too: unmoved, the rollout read is the one
            // of this version.
            if self.fleet_version()? == base.version {
                return Ok(snapshot_of(base, None, rollout.as_ref()));
            }
        }
    }

    /// The snapshot the fleet would have with `specs` applied (and no rollout): what a staged
    /// rollout is planned on.
    pub fn snapshot_with(&self, specs: &[ProfileSpec]) -> Result<Snapshot, StoreError> {
        Ok(snapshot_of(self.base()?, Some(specs), None))
    }
}

fn snapshot_of(
    base: Base,
    overlay: Option<&[ProfileSpec]>,
    rollout: Option<&super::Rollout>,
) -> Snapshot {
    let groups = &base.groups;
    let resolve = |p: ProfileSpec| {
        let p = match p.group.as_ref().and_then(|g| groups.get(g)) {
            Some(g) => p.resolved(&g.ordered()),
            None => p,
        };
        (p.name.clone(), p)
    };
    let mut profiles: BTreeMap<String, ProfileSpec> =
        base.profiles.values().cloned().map(resolve).collect();
    for p in overlay.unwrap_or_default() {
        let (n, p) = resolve(p.clone());
        profiles.insert(n, p);
    }
    let held = rollout.filter(|r| r.active()).map(|r| Held {
        before: Resolved {
            assignments: r.base_assignments.clone(),
            profiles: r.base_profiles.iter().cloned().map(resolve).collect(),
        },
        promoted: r.promoted(),
    });
    Snapshot {
        version: base.version,
        now: Resolved {
            assignments: base.assignments,
            profiles,
        },
        held,
    }
}
