//! How the fleet's definition changes: every change of the profiles, the assignments or the
//! OMA groups is worked out on what the fleet holds at one version ([`Base`]) and committed
//! only while the fleet is still at that version, with its event and (for profiles and
//! assignments) its revision, in one transaction. A change that lost the race to another
//! (another request, another coordinator sharing the store) is worked out again on what that
//! one left, so no change is made on a view another has already moved past.
//!
//! This works because every such change moves the fleet version in its own transaction:
//! while the version holds, what was read at it is all there is. Neither engine lists keys
//! inside a transaction; reading at a version and committing at it is what makes a rollback
//! that removes "every profile there is" see a profile added a moment before.
use std::collections::BTreeMap;
use std::time::Duration;

use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_runtime::backoff::Backoff;
use tunnelfleet_runtime::clock::now_unix_ms;

use super::engine::{Abort, TxTree};
use super::model::{Base, Contents, GroupEdit, Revision, bump_version};
use super::rollouts::{ACTIVE, Rollout};
use super::{
    Assignment, META_FLEET_VERSION, OmaGroup, Store, StoreError, decode, decode_all, json, u64_of,
};

/// Times a change is worked out again while others keep landing first, before the caller
/// is told the fleet changed (a 409: run it again).
const ATTEMPTS: u32 = 16;

/// The pause before working a change out again: jittered, and growing with each lost race,
/// so two coordinators changing the fleet back to back take turns instead of one of them
/// (the one whose mirror of etcd trails) losing every race.
fn lost_race() -> Backoff {
    Backoff::new(Duration::from_millis(1), Duration::from_millis(64))
}

impl Store {
    /// The fleet's definition at one version (read again if a change landed meanwhile).
    pub(super) fn base(&self) -> Result<Base, StoreError> {
        loop {
            let version = self.fleet_version()?;
            let base = Base {
                version,
                profiles: decode_all::<ProfileSpec>(&self.profiles, "profiles")?
                    .into_iter()
                    .map(|p| (p.name.clone(), p))
                    .collect(),
                assignments: decode_all(&self.assignments, "assignments")?,
                groups: decode_all::<OmaGroup>(&self.groups, "groups")?
                    .into_iter()
                    .map(|g| (g.name.clone(), g))
                    .collect(),
            };
            if self.fleet_version()? == version {
                return Ok(base);
            }
        }
    }

    /// Changes the profiles and assignments: `plan` works out what they become from a
    /// [`Base`] (its errors are the caller's, returned as they are); `rollouts` decides, in
    /// the transaction, what the change means for the staged rollout (given the base and the
    /// new version). The change, its event, its revision and the new version commit together
    /// only while the fleet is still at the base's version, else it is worked out again.
    /// Returns the new version and what `rollouts` returned, once durable.
    pub(super) async fn change_contents<T>(
        &self,
        what: &str,
        plan: impl Fn(&Base) -> Result<Contents, StoreError>,
        rollouts: impl Fn(&TxTree<'_>, &Base, u64) -> Result<T, Abort>,
    ) -> Result<(u64, T), StoreError> {
        let (mut attempts, mut backoff) = (0, lost_race());
        loop {
            attempts += 1;
            let base = self.base()?;
            let next = plan(&base)?;
            let writes = content_writes(&base, &next);
            let event = self.change_event(what).await?;
            let result = self
                .db
                .transaction(
                    [
                        &self.profiles,
                        &self.assignments,
                        &self.meta,
                        &self.events,
                        &self.rollouts,
                        &self.history,
                    ],
                    |[pt, at, meta, events, rt, history]| {
                        still_at(meta, base.version)?;
                        let value = rollouts(rt, &base, base.version + 1)?;
                        for (k, v) in &writes.0 {
                            match v {
                                Some(v) => pt.insert(k, v)?,
                                None => pt.remove(k)?,
                            };
                        }
                        for (k, add) in &writes.1 {
                            if *add {
                                at.insert(k, k)?;
                            } else {
                                at.remove(k)?;
                            }
                        }
                        let version = bump_version(meta, events, &event)?;
                        let rev = Revision {
                            version,
                            at_unix_ms: now_unix_ms(),
                            what: what.to_string(),
                            profiles: next.profiles.values().cloned().collect(),
                            assignments: writes.2.clone(),
                        };
                        history.insert(version.to_be_bytes(), json(&rev))?;
                        Ok((version, value))
                    },
                )
                .await;
            if lost(&result, attempts, &mut backoff).await {
                continue;
            }
            let r = result?;
            self.prune_history()?;
            self.durable().await?;
            return Ok(r);
        }
    }

    /// A plain profile change (apply, delete, assign, rollback): refused while a staged
    /// rollout is in progress. Returns the new version once durable.
    pub(super) async fn change(
        &self,
        what: &str,
        plan: impl Fn(&Base) -> Result<Contents, StoreError>,
    ) -> Result<u64, StoreError> {
        let (version, ()) = self
            .change_contents(what, plan, |rollouts, _, _| no_rollout(rollouts))
            .await?;
        Ok(version)
    }

    /// Changes OMA groups: `plan` works out the edit from a [`Base`]; it commits with its event
    /// and the new version only while the fleet is still at the base's version, else it is
    /// worked out again. Returns the new version and the edit's value, once durable.
    pub(super) async fn change_groups<T>(
        &self,
        plan: impl Fn(&Base) -> Result<GroupEdit<T>, StoreError>,
    ) -> Result<(u64, T), StoreError> {
        let (mut attempts, mut backoff) = (0, lost_race());
        loop {
            attempts += 1;
            let base = self.base()?;
            let edit = plan(&base)?;
            let event = self.change_event(&edit.what).await?;
            let writes: Vec<(String, Option<Vec<u8>>)> = edit
                .writes
                .iter()
                .map(|(name, g)| (name.clone(), g.as_ref().map(json)))
                .collect();
            let result = self
                .db
                .transaction(
                    [&self.groups, &self.meta, &self.events],
                    |[groups, meta, events]| {
                        still_at(meta, base.version)?;
                        for (name, v) in &writes {
                            match v {
                                Some(v) => groups.insert(name.as_bytes(), v)?,
                                None => groups.remove(name.as_bytes())?,
                            };
                        }
                        bump_version(meta, events, &event)
                    },
                )
                .await;
            if lost(&result, attempts, &mut backoff).await {
                continue;
            }
            let version = result?;
            self.durable().await?;
            return Ok((version, edit.value));
        }
    }
}

/// Whether a change's transaction that ended in `result` lost the race to another change
/// and is worked out again (attempts are left): then after a jittered pause, when this
/// returns.
async fn lost<T>(result: &Result<T, StoreError>, attempts: u32, backoff: &mut Backoff) -> bool {
    let again = matches!(result, Err(StoreError::FleetChanged { .. })) && attempts < ATTEMPTS;
    if again {
        tokio::time::sleep(backoff.next_delay()).await;
    }
    again
}

/// The profile writes (name -> JSON, or `None` to remove), the assignment writes (key ->
/// added or removed) that turn `base` into `next`, and `next`'s assignments without
/// duplicates, in key order.
#[allow(clippy::type_complexity)]
fn content_writes(
    base: &Base,
    next: &Contents,
) -> (
    Vec<(Vec<u8>, Option<Vec<u8>>)>,
    Vec<(Vec<u8>, bool)>,
    Vec<Assignment>,
) {
    let mut profiles = Vec::new();
    for name in base.profiles.keys() {
        if !next.profiles.contains_key(name) {
            profiles.push((name.as_bytes().to_vec(), None));
        }
    }
    for (name, p) in &next.profiles {
        if base.profiles.get(name) != Some(p) {
            profiles.push((name.as_bytes().to_vec(), Some(json(p))));
        }
    }
    let keyed = |list: &[Assignment]| -> BTreeMap<Vec<u8>, Assignment> {
        list.iter().map(|a| (json(a), a.clone())).collect()
    };
    let (before, after) = (keyed(&base.assignments), keyed(&next.assignments));
    let mut assignments: Vec<(Vec<u8>, bool)> = before
        .keys()
        .filter(|k| !after.contains_key(*k))
        .map(|k| (k.clone(), false))
        .collect();
    assignments.extend(
        after
            .keys()
            .filter(|k| !before.contains_key(*k))
            .map(|k| (k.clone(), true)),
    );
    (profiles, assignments, after.into_values().collect())
}

/// Refuses the transaction with [`StoreError::FleetChanged`] unless the fleet is at `planned`.
pub(super) fn still_at(meta: &TxTree<'_>, planned: u64) -> Result<(), Abort> {
    let now = meta
        .get(META_FLEET_VERSION)?
        .map(|v| u64_of(&v))
        .unwrap_or(0);
    if now == planned {
        Ok(())
    } else {
        Err(StoreError::FleetChanged { planned, now }.into())
    }
}

/// Refuses a profile change while a staged rollout is in progress.
pub(super) fn no_rollout(rollouts: &TxTree<'_>) -> Result<(), Abort> {
    if let Some(v) = rollouts.get(ACTIVE)? {
        let r: Rollout = decode(&v, "rollouts", "active")?;
        return Err(StoreError::RolloutInProgress(r.version).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;
    use crate::store::Selector;

    fn profile(name: &str, port: u16) -> ProfileSpec {
        let mut p = ProfileSpec::new(name, "vma", "/etc/tunnelfleet/id");
        p.endpoints = vec!["oma-a:443".into()];
        p.forwards = vec![format!("L {port}:localhost:{port}")];
        p
    }

    fn to(agent: &str, profile: &str) -> Assignment {
        Assignment {
            profile: profile.into(),
            selector: Selector::Agent(agent.into()),
        }
    }

    /// Only what differs is written: a removed profile is removed, a changed one rewritten, an
    /// unchanged one left alone; assignments are added and removed by key, and a duplicate in
    /// what the change makes is one assignment.
    #[test]
    fn a_change_writes_what_differs_and_nothing_else() {
        let base = Base {
            version: 7,
            profiles: [profile("a", 1), profile("b", 2), profile("c", 3)]
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
            assignments: vec![to("vma-1", "a"), to("vma-2", "b")],
            groups: BTreeMap::new(),
        };
        let mut next = Contents::of(&base);
        next.profiles.remove("b");
        next.profiles.insert("c".into(), profile("c", 30));
        next.profiles.insert("d".into(), profile("d", 4));
        next.assignments.retain(|a| a.profile != "b");
        next.assignments.push(to("vma-3", "d"));
        next.assignments.push(to("vma-3", "d"));
        let (profiles, assignments, kept) = content_writes(&base, &next);
        let named: Vec<(&str, bool)> = profiles
            .iter()
            .map(|(k, v)| (std::str::from_utf8(k).unwrap(), v.is_some()))
            .collect();
        assert_eq!(named, vec![("b", false), ("c", true), ("d", true)]);
        assert_eq!(
            assignments,
            vec![
                (json(&to("vma-2", "b")), false),
                (json(&to("vma-3", "d")), true)
            ]
        );
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.contains(&to("vma-1", "a")) && kept.contains(&to("vma-3", "d")));
        // Nothing changed: nothing written.
        let same = content_writes(&base, &Contents::of(&base));
        assert!(same.0.is_empty() && same.1.is_empty());
    }
}
