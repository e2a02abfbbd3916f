//! Revisions: the profiles and assignments as each change left them, for `profiles history`
//! and rollback. History only grows; the oldest are pruned past [`HISTORY_KEPT`].
use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_runtime::clock::now_unix_ms;

use super::engine::{Abort, TxTree};
use super::{Assignment, Store, StoreError, decode, json, u64_of};

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

impl Store {
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
        let now = (self.profiles.keys()?, self.assignments.keys()?);
        self.change(
            &format!("rollback to version {version} ({})", rev.what),
            |pt, at| replace_contents(pt, at, &now, &rev.profiles, &rev.assignments),
        )
        .await
    }

    /// Records what change `version` left (written with the change, flushed by its caller).
    pub(super) fn record_revision(&self, version: u64, what: &str) -> Result<(), StoreError> {
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
        Ok(())
    }
}

/// Inside a change's transaction: the profiles and assignments become exactly `profiles` and
/// `assignments`, the keys there now (`now`: profiles', assignments') removed first. A
/// rollback and a rollout's abort both do this.
pub(super) fn replace_contents(
    pt: &TxTree<'_>,
    at: &TxTree<'_>,
    now: &(Vec<Vec<u8>>, Vec<Vec<u8>>),
    profiles: &[ProfileSpec],
    assignments: &[Assignment],
) -> Result<(), Abort> {
    for k in &now.0 {
        pt.remove(k)?;
    }
    for k in &now.1 {
        at.remove(k)?;
    }
    for p in profiles {
        pt.insert(p.name.as_bytes(), json(p))?;
    }
    for a in assignments {
        let k = json(a);
        at.insert(&k, &k)?;
    }
    Ok(())
}
