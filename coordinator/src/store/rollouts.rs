//! Staged rollouts: a profile change that goes to canaries first, then in waves, each stage
//! promoted only once its agents run it healthy for the whole wait. The record holds what the
//! fleet ran before (so the agents not promoted yet, and the ones that failed, are pushed
//! that), the stages, and where the rollout stands; it is written in the transaction of the
//! change itself and after every step, so a restart resumes where it was.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_runtime::clock::now_unix_ms;

use super::engine::{Abort, TxTree};
use super::model::{Contents, bump_version};
use super::{Assignment, Store, StoreError, decode, json};

/// The key of the rollout in progress (running or halted) in the `rollouts` tree; finished
/// ones are kept under their id.
pub(super) const ACTIVE: &[u8] = b"active";

/// Finished rollouts kept for `rollout` to show the last one.
const FINISHED_KEPT: usize = 100;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// The current stage is being pushed or waited on.
    Running,
    /// A stage failed: its failed agents are back on the previous version, the stages after it
    /// never got the new one; waits for `rollout resume` or `rollout abort`.
    Halted,
    /// Every stage passed: the new version is the fleet's.
    Done,
    /// Abandoned: the previous profiles and assignments were restored as a new version.
    Aborted,
}

/// One stage: the canaries, or a wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// `canary`, `wave 1`, …
    pub name: String,
    /// Its agents.
    pub agents: Vec<String>,
    /// When it got the new version (Unix ms).
    pub started_unix_ms: Option<u64>,
    /// When it passed (Unix ms).
    pub passed_unix_ms: Option<u64>,
    /// Its agents that were not connected when it started: not waited for (an appliance that
    /// is away does not hold the fleet's rollout), given the new version when they return.
    #[serde(default)]
    pub offline: Vec<String>,
}

/// A staged rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The fleet version the change made (also the rollout's id).
    pub version: u64,
    /// The version before it.
    pub base_version: u64,
    /// What changed.
    pub what: String,
    /// Who started it (the token's name).
    pub started_by: String,
    /// When (Unix ms).
    pub started_unix_ms: u64,
    /// How long each stage must run healthy before the next gets it (ms).
    pub wait_ms: u64,
    /// How long an agent of a stage may take to apply it and come up (ms).
    #[serde(default)]
    pub settle_ms: u64,
    /// The canaries, then the waves.
    pub stages: Vec<Stage>,
    /// The stage in progress (or the one that halted).
    pub current: usize,
    /// Where it stands.
    pub state: RolloutState,
    /// Why it halted: agent -> reason.
    pub reasons: BTreeMap<String, String>,
    /// When it halted (Unix ms).
    pub halted_unix_ms: Option<u64>,
    /// Agents of the current stage put back on the previous version.
    pub reverted: BTreeSet<String>,
    /// The `rollout_halted` alert while it is halted.
    pub alert: Option<u64>,
    /// When it finished (done or aborted, Unix ms).
    pub finished_unix_ms: Option<u64>,
    /// Every profile before the change.
    pub base_profiles: Vec<ProfileSpec>,
    /// Every assignment before the change.
    pub base_assignments: Vec<Assignment>,
}

impl Rollout {
    /// Whether it still holds agents back (running or halted).
    pub fn active(&self) -> bool {
        matches!(self.state, RolloutState::Running | RolloutState::Halted)
    }

    /// The agents that run the new version now: the stages up to the current one, less the
    /// ones put back.
    pub fn promoted(&self) -> BTreeSet<String> {
        self.stages
            .iter()
            .take(self.current + 1)
            .flat_map(|s| s.agents.iter().cloned())
            .filter(|a| !self.reverted.contains(a))
            .collect()
    }
}

impl Store {
    /// Applies `specs` as one change (one new version) and starts `rollout` for it, in one
    /// transaction: refused when another rollout is in progress, or when the fleet version is
    /// no longer `rollout.base_version` (the plan was made on a fleet that has changed since).
    /// Returns the rollout with its version, once durable.
    pub async fn start_rollout(
        &self,
        specs: &[ProfileSpec],
        rollout: Rollout,
    ) -> Result<Rollout, StoreError> {
        let (_, r) = self
            .change_contents(
                &rollout.what,
                |base| {
                    // The stages were planned on this version: never worked out again on
                    // another (the caller plans again).
                    if base.version != rollout.base_version {
                        return Err(StoreError::FleetChanged {
                            planned: rollout.base_version,
                            now: base.version,
                        });
                    }
                    let mut next = Contents::of(base);
                    for spec in specs {
                        base.check_group(spec)?;
                        next.profiles.insert(spec.name.clone(), spec.clone());
                    }
                    Ok(next)
                },
                |rollouts, base, version| {
                    if let Some(v) = rollouts.get(ACTIVE)? {
                        let other: Rollout = decode(&v, "rollouts", "active")?;
                        return Err(StoreError::RolloutInProgress(other.version).into());
                    }
                    let mut r = rollout.clone();
                    r.version = version;
                    r.base_profiles = base.profiles.values().cloned().collect();
                    r.base_assignments = base.assignments.clone();
                    rollouts.insert(ACTIVE, json(&r))?;
                    Ok(r)
                },
            )
            .await?;
        Ok(r)
    }

    /// The rollout in progress (running or halted), if any.
    pub fn active_rollout(&self) -> Result<Option<Rollout>, StoreError> {
        self.rollouts
            .get(ACTIVE)?
            .map(|v| decode(&v, "rollouts", "active"))
            .transpose()
    }

    /// The rollout in progress, or else the last finished one.
    pub fn last_rollout(&self) -> Result<Option<Rollout>, StoreError> {
        if let Some(r) = self.active_rollout()? {
            return Ok(Some(r));
        }
        self.rollouts
            .iter()
            .rev()
            .find_map(|r| match r {
                Ok((k, v)) if k.as_slice() != ACTIVE => Some(Ok(v)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .transpose()?
            .map(|v| decode(&v, "rollouts", "last"))
            .transpose()
    }

    /// Records a step of the rollout in progress (a stage promoted, a halt, a resume, the
    /// end) as a new fleet version, in one transaction, durable before return: what agents
    /// get changes with each step, and the version tells an agent's acknowledgement of the
    /// step from one of the push before it. A finished rollout (done) is moved out of the way.
    /// Returns the new version.
    pub async fn step_rollout(&self, r: &Rollout, what: &str) -> Result<u64, StoreError> {
        let event = self.change_event(what).await?;
        let mut r = r.clone();
        if !r.active() {
            r.finished_unix_ms.get_or_insert_with(now_unix_ms);
        }
        let version = self
            .db
            .transaction(
                [&self.meta, &self.events, &self.rollouts],
                |[meta, events, rollouts]| {
                    still_running(rollouts, r.version)?;
                    if r.active() {
                        rollouts.insert(ACTIVE, json(&r))?;
                    } else {
                        rollouts.insert(r.version.to_be_bytes(), json(&r))?;
                        rollouts.remove(ACTIVE)?;
                    }
                    bump_version(meta, events, &event)
                },
            )
            .await?;
        self.prune_rollouts()?;
        self.durable().await?;
        Ok(version)
    }

    /// Records what changed in the rollout in progress without changing what any agent gets
    /// (the id of its alert), durable before return.
    pub async fn note_rollout(&self, r: &Rollout) -> Result<(), StoreError> {
        if r.active() {
            self.db
                .transaction([&self.rollouts], |[rollouts]| {
                    still_running(rollouts, r.version)?;
                    rollouts.insert(ACTIVE, json(r))?;
                    Ok(())
                })
                .await?;
            self.durable().await?;
        }
        Ok(())
    }

    /// Abandons the rollout in progress: the profiles and assignments it started from are
    /// restored as a new version, and the rollout is closed as aborted, in one transaction.
    /// Returns the new version and the rollout as closed.
    pub async fn abort_rollout(&self) -> Result<(u64, Rollout), StoreError> {
        let started = self
            .active_rollout()?
            .ok_or(StoreError::NoRolloutInProgress)?;
        let what = format!(
            "rollout of version {} aborted: back to version {}'s profiles",
            started.version, started.base_version
        );
        let r = self
            .change_contents(
                &what,
                // What a rollout started from never changes while it runs.
                |_| {
                    Ok(Contents::from_lists(
                        &started.base_profiles,
                        &started.base_assignments,
                    ))
                },
                |rollouts, _, _| {
                    let mut r = still_running(rollouts, started.version)?;
                    r.state = RolloutState::Aborted;
                    r.finished_unix_ms = Some(now_unix_ms());
                    rollouts.insert(r.version.to_be_bytes(), json(&r))?;
                    rollouts.remove(ACTIVE)?;
                    Ok(r)
                },
            )
            .await?;
        self.prune_rollouts()?;
        Ok(r)
    }

    fn prune_rollouts(&self) -> Result<(), StoreError> {
        // The active key sorts after every big-endian id ('a' > 0x00…), so it is never first.
        while self.rollouts.len() > FINISHED_KEPT + 1 {
            if self.rollouts.pop_min()?.is_none() {
                break;
            }
        }
        Ok(())
    }
}

/// The rollout in progress as this transaction sees it, refused unless it is the rollout of
/// `version`: a step, a note or an abort worked out on a rollout that has since ended (an
/// abort on another coordinator, say) never brings it back.
fn still_running(rollouts: &TxTree<'_>, version: u64) -> Result<Rollout, Abort> {
    match rollouts.get(ACTIVE)? {
        Some(v) => match decode::<Rollout>(&v, "rollouts", "active") {
            Ok(r) if r.version == version => Ok(r),
            Ok(_) => Err(StoreError::NoRolloutInProgress.into()),
            Err(e) => Err(e.into()),
        },
        None => Err(StoreError::NoRolloutInProgress.into()),
    }
}
