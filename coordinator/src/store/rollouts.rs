//! Staged rollouts: a profile change that goes to canaries first, then in waves, each stage
//! promoted only once its agents run it healthy for the whole wait. The record holds what the
//! fleet ran before (so the agents not promoted yet, and the ones that failed, are pushed
//! that), the stages, and where the rollout stands; it is written in the transaction of the
//! change itself and after every step, so a restart resumes where it was.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_runtime::clock::now_unix_ms;

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
        mut rollout: Rollout,
    ) -> Result<Rollout, StoreError> {
        for spec in specs {
            if let Some(g) = &spec.group
                && self.groups.get(g.as_bytes())?.is_none()
            {
                return Err(StoreError::UnknownGroup {
                    profile: spec.name.clone(),
                    group: g.clone(),
                });
            }
        }
        rollout.base_profiles = self.profiles()?;
        rollout.base_assignments = self.assignments()?;
        let event = self.change_event(&rollout.what).await?;
        let values: Vec<(String, Vec<u8>)> =
            specs.iter().map(|p| (p.name.clone(), json(p))).collect();
        let result = self
            .db
            .transaction(
                [&self.profiles, &self.meta, &self.events, &self.rollouts],
                |[profiles, meta, events, rollouts]| {
                    if let Some(v) = rollouts.get(ACTIVE)? {
                        let other: Rollout = match serde_json::from_slice(&v) {
                            Ok(r) => r,
                            Err(e) => {
                                return Err(StoreError::Corrupt {
                                    tree: "rollouts",
                                    key: "active".into(),
                                    reason: e.to_string(),
                                }
                                .into());
                            }
                        };
                        return Err(StoreError::RolloutInProgress(other.version).into());
                    }
                    let now = meta
                        .get(super::META_FLEET_VERSION)?
                        .map(|v| super::u64_of(&v))
                        .unwrap_or(0);
                    if now != rollout.base_version {
                        return Err(StoreError::FleetChanged {
                            planned: rollout.base_version,
                            now,
                        }
                        .into());
                    }
                    for (name, v) in &values {
                        profiles.insert(name.as_bytes(), v)?;
                    }
                    let version = super::bump_version(meta, events, &event)?;
                    let mut r = rollout.clone();
                    r.version = version;
                    rollouts.insert(ACTIVE, json(&r))?;
                    Ok(r)
                },
            )
            .await;
        let r = result?;
        self.record_revision(r.version, &r.what)?;
        self.durable().await?;
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
                    if r.active() {
                        rollouts.insert(ACTIVE, json(&r))?;
                    } else {
                        rollouts.insert(r.version.to_be_bytes(), json(&r))?;
                        rollouts.remove(ACTIVE)?;
                    }
                    super::bump_version(meta, events, &event)
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
            self.rollouts.insert(ACTIVE, json(r))?;
            self.durable().await?;
        }
        Ok(())
    }

    /// Abandons the rollout in progress: the profiles and assignments it started from are
    /// restored as a new version, and the rollout is closed as aborted, in one transaction.
    /// Returns the new version and the rollout as closed.
    pub async fn abort_rollout(&self) -> Result<(u64, Rollout), StoreError> {
        let mut r = self
            .active_rollout()?
            .ok_or(StoreError::NoRolloutInProgress)?;
        let now = (self.profiles.keys()?, self.assignments.keys()?);
        let what = format!(
            "rollout of version {} aborted: back to version {}'s profiles",
            r.version, r.base_version
        );
        let event = self.change_event(&what).await?;
        r.state = RolloutState::Aborted;
        r.finished_unix_ms = Some(now_unix_ms());
        let version = self
            .db
            .transaction(
                [
                    &self.profiles,
                    &self.assignments,
                    &self.meta,
                    &self.events,
                    &self.rollouts,
                ],
                |[pt, at, meta, events, rollouts]| {
                    super::history::replace_contents(
                        pt,
                        at,
                        &now,
                        &r.base_profiles,
                        &r.base_assignments,
                    )?;
                    let version = super::bump_version(meta, events, &event)?;
                    rollouts.insert(r.version.to_be_bytes(), json(&r))?;
                    rollouts.remove(ACTIVE)?;
                    Ok(version)
                },
            )
            .await?;
        self.record_revision(version, &what)?;
        self.prune_rollouts()?;
        self.durable().await?;
        Ok((version, r))
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
