//! Revisions: the profiles and assignments as each change left them, for `profiles history`
//! and rollback. History only grows; the oldest are pruned past [`HISTORY_KEPT`].
use serde::{Deserialize, Serialize};

use super::model::{Contents, Revision};
use super::{Store, StoreError, decode, u64_of};

/// Revisions kept for `profiles history` and rollback; older ones are pruned.
pub const HISTORY_KEPT: usize = 1000;

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
        self.change(
            &format!("rollback to version {version} ({})", rev.what),
            |base| {
                for p in &rev.profiles {
                    base.check_group(p)?;
                }
                Ok(Contents::from_lists(&rev.profiles, &rev.assignments))
            },
        )
        .await
    }

    /// Drops the oldest revisions past [`HISTORY_KEPT`] (each change writes its own in its
    /// transaction).
    pub(super) fn prune_history(&self) -> Result<(), StoreError> {
        while self.history.len() > HISTORY_KEPT {
            if self.history.pop_min()?.is_none() {
                break;
            }
        }
        Ok(())
    }
}
