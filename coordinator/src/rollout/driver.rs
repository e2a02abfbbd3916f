//! The rollout driver: starts a staged rollout, then four times a second judges the stage in
//! progress and promotes it, halts it or finishes the rollout; resumes and aborts on the
//! operator's word. Every step is durable before the pushes it causes.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_runtime::clock::now_unix_ms;

use super::judge::{AgentView, Check, check};
use super::plan::{Canary, plan_stages};
use crate::fleet::Fleet;
use crate::hooks::Outbox;
use crate::store::{Alert, AlertKind, Rollout, RolloutState, Store, StoreError};

/// How long an agent of a stage may take by default to apply the new version and come up
/// (from the stage's start, or the coordinator's): past it, what it is still waiting for is a
/// failure.
pub const SETTLE: Duration = Duration::from_secs(120);

/// Longest wait between stages.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Most waves.
pub const MAX_WAVES: u32 = 20;

/// How often the stage in progress is judged.
const TICK: Duration = Duration::from_millis(250);

/// Body of `POST /v1/rollouts`: profiles to apply as one staged change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartRequest {
    /// The profiles (created or replaced), as `profiles apply` sends them.
    pub profiles: Vec<ProfileSpec>,
    /// How many canaries.
    pub canary: Canary,
    /// Waves after the canaries.
    pub waves: u32,
    /// How long each stage must run healthy before the next (ms).
    pub wait_ms: u64,
    /// How long an agent may take to apply it and come up (ms; [`SETTLE`] when absent).
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
}

fn default_settle_ms() -> u64 {
    SETTLE.as_millis() as u64
}

/// Why a rollout could not start, resume or abort.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The request is wrong: what and why.
    #[error("{0}")]
    Invalid(String),
    /// Not in a state for it.
    #[error("{0}")]
    Conflict(String),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The agents of a stage not connected as it starts.
fn offline_of(agents: &[String], connected: &BTreeSet<String>) -> Vec<String> {
    agents
        .iter()
        .filter(|a| !connected.contains(*a))
        .cloned()
        .collect()
}

/// Runs staged rollouts (cheap to clone).
#[derive(Clone)]
pub struct Rollouts {
    fleet: Arc<Fleet>,
    /// This coordinator's name (its own agents' evidence is its links).
    me: Arc<String>,
    /// Where steps are written (the leader's store).
    store: Store,
    outbox: Arc<Outbox>,
    /// One operation at a time (start, step, resume, abort).
    turn: Arc<tokio::sync::Mutex<Memory>>,
}

/// What the driver remembers of the stage in progress (not stored: after a restart the wait
/// starts again).
#[derive(Default)]
struct Memory {
    /// (version, stage, its start): a new key is a new stage.
    key: Option<(u64, usize, Option<u64>)>,
    /// When this coordinator began watching the stage.
    since: Option<Instant>,
    /// Agents good since when.
    good_since: HashMap<String, Instant>,
    /// Agents seen connected during the stage.
    seen: BTreeSet<String>,
}

impl Rollouts {
    /// A driver over `fleet`, raising its alert through `outbox`'s hooks.
    pub fn new(fleet: Arc<Fleet>, me: &str, store: Store, outbox: Arc<Outbox>) -> Self {
        Rollouts {
            fleet,
            me: Arc::new(me.to_string()),
            store,
            outbox,
            turn: Arc::default(),
        }
    }

    /// Applies `req.profiles` as one new version staged over the agents it changes (already
    /// validated by the caller), pushes it to the canaries, and returns the rollout.
    pub async fn start(&self, req: &StartRequest, by: &str) -> Result<Rollout, StartError> {
        if req.profiles.is_empty() {
            return Err(StartError::Invalid("no profile to roll out".into()));
        }
        if req.waves == 0 || req.waves > MAX_WAVES {
            return Err(StartError::Invalid(format!(
                "waves: 1 to {MAX_WAVES}, not {}",
                req.waves
            )));
        }
        if req.settle_ms < 1000 || Duration::from_millis(req.settle_ms) > MAX_WAIT {
            return Err(StartError::Invalid(format!(
                "settle: between 1s and {}",
                humantime::format_duration(MAX_WAIT)
            )));
        }
        if Duration::from_millis(req.wait_ms) > MAX_WAIT {
            return Err(StartError::Invalid(format!(
                "wait: at most {}",
                humantime::format_duration(MAX_WAIT)
            )));
        }
        let _turn = self.turn.lock().await;
        let store = &self.store;
        if let Some(r) = store.active_rollout()? {
            return Err(StoreError::RolloutInProgress(r.version).into());
        }
        let before = store.snapshot()?;
        let after = store.snapshot_with(&req.profiles)?;
        // The agents whose profiles change: the known ones and the connected ones.
        let mut agents: BTreeMap<String, BTreeMap<String, String>> =
            store.agent_labels()?.into_iter().collect();
        let connected = self.connected_anywhere()?;
        for id in &connected {
            if let Some(l) = self.fleet.links.get(id) {
                agents.insert(id.clone(), l.labels);
            }
        }
        let affected: BTreeMap<String, BTreeMap<String, String>> = agents
            .into_iter()
            .filter(|(id, labels)| {
                before.set_for(id, labels).profiles != after.set_for(id, labels).profiles
            })
            .collect();
        let mut stages = plan_stages(&affected, &connected, req.canary, req.waves);
        let now = now_unix_ms();
        if let Some(first) = stages.first_mut() {
            first.started_unix_ms = Some(now);
            first.offline = offline_of(&first.agents, &connected);
        }
        let names: Vec<&str> = req.profiles.iter().map(|p| p.name.as_str()).collect();
        let rollout = Rollout {
            version: 0,
            base_version: before.version,
            what: format!(
                "staged rollout of profiles {} ({} agents)",
                names.join(", "),
                affected.len()
            ),
            started_by: by.to_string(),
            started_unix_ms: now,
            wait_ms: req.wait_ms,
            settle_ms: req.settle_ms,
            stages,
            current: 0,
            state: RolloutState::Running,
            reasons: BTreeMap::new(),
            halted_unix_ms: None,
            reverted: BTreeSet::new(),
            alert: None,
            finished_unix_ms: None,
            base_profiles: vec![],
            base_assignments: vec![],
        };
        let mut r = store.start_rollout(&req.profiles, rollout).await?;
        tracing::info!(
            version = r.version,
            agents = affected.len(),
            stages = r.stages.len(),
            by,
            "staged rollout started"
        );
        if r.stages.is_empty() {
            // Nobody's profiles change: nothing to stage.
            r.state = RolloutState::Done;
            store
                .step_rollout(
                    &r,
                    &format!("rollout of version {} done: no agent to stage", r.version),
                )
                .await?;
        }
        self.fleet.push_changed()?;
        Ok(r)
    }

    /// Resumes a halted rollout: the stage that halted is pushed the new version again (its
    /// failed agents included) and waited on from the start.
    pub async fn resume(&self, by: &str) -> Result<Rollout, StartError> {
        let _turn = self.turn.lock().await;
        let store = &self.store;
        let mut r = store
            .active_rollout()?
            .ok_or(StoreError::NoRolloutInProgress)?;
        if r.state != RolloutState::Halted {
            return Err(StartError::Conflict(format!(
                "the rollout of version {} is running, not halted",
                r.version
            )));
        }
        self.resolve_alert(&mut r).await?;
        r.state = RolloutState::Running;
        r.reasons.clear();
        r.reverted.clear();
        r.halted_unix_ms = None;
        let now = now_unix_ms();
        let connected = self.connected_anywhere()?;
        let stage = match r.stages.get_mut(r.current) {
            Some(s) => {
                s.started_unix_ms = Some(now);
                s.offline = offline_of(&s.agents, &connected);
                s.name.clone()
            }
            None => String::new(),
        };
        store
            .step_rollout(
                &r,
                &format!(
                    "rollout of version {} resumed at {stage} by {by}",
                    r.version
                ),
            )
            .await?;
        tracing::warn!(version = r.version, by, "staged rollout resumed");
        self.fleet.push_changed()?;
        Ok(r)
    }

    /// Abandons the rollout in progress: every agent gets the profiles from before it back (as
    /// a new version).
    pub async fn abort(&self, by: &str) -> Result<(u64, Rollout), StartError> {
        let _turn = self.turn.lock().await;
        let store = &self.store;
        let mut r = store
            .active_rollout()?
            .ok_or(StoreError::NoRolloutInProgress)?;
        if r.alert.is_some() {
            self.resolve_alert(&mut r).await?;
            store.note_rollout(&r).await?;
        }
        let (version, r) = store.abort_rollout().await?;
        tracing::warn!(version, rollout = r.version, by, "staged rollout aborted");
        self.fleet.push_changed()?;
        Ok((version, r))
    }

    /// Judges the stage in progress every [`TICK`] until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.step(Instant::now()).await {
                        tracing::error!("staged rollout: {e}");
                    }
                }
            }
        }
    }

    /// One look at the stage in progress at `now`: promote it, halt it, finish, or wait.
    pub async fn step(&self, now: Instant) -> Result<(), StoreError> {
        let mut mem = self.turn.lock().await;
        let store = &self.store;
        let Some(mut r) = store.active_rollout()? else {
            *mem = Memory::default();
            return Ok(());
        };
        if r.state != RolloutState::Running {
            return Ok(());
        }
        let Some(stage) = r.stages.get(r.current).cloned() else {
            return Ok(());
        };
        let key = (r.version, r.current, stage.started_unix_ms);
        if mem.key != Some(key) {
            *mem = Memory {
                key: Some(key),
                since: Some(now),
                ..Memory::default()
            };
        }
        let since = mem.since.unwrap_or(now);
        let wait = Duration::from_millis(r.wait_ms);
        let settle = Duration::from_millis(r.settle_ms);
        let mut failed = BTreeMap::new();
        let mut waiting = 0;
        let judged: Vec<&String> = stage
            .agents
            .iter()
            .filter(|a| !stage.offline.contains(a))
            .collect();
        let remote = self.store.latest_live(&self.me)?;
        for agent in judged.iter().copied() {
            let view = self.view(agent, &mut mem.seen, &remote)?;
            match check(&view) {
                Check::Good => {
                    mem.good_since.entry(agent.clone()).or_insert(now);
                }
                Check::NotYet(why) => {
                    mem.good_since.remove(agent);
                    waiting += 1;
                    if now.saturating_duration_since(since) > settle {
                        failed.insert(
                            agent.clone(),
                            format!(
                                "not ready after {}: {why}",
                                humantime::format_duration(settle)
                            ),
                        );
                    }
                }
                Check::Failed(why) => {
                    mem.good_since.remove(agent);
                    failed.insert(agent.clone(), why);
                }
            }
        }
        if !failed.is_empty() {
            return self.halt(&mut r, failed).await;
        }
        let passed = waiting == 0
            && judged.iter().all(|a| {
                mem.good_since
                    .get(*a)
                    .is_some_and(|t| now.saturating_duration_since(*t) >= wait)
            });
        if !passed {
            return Ok(());
        }
        let at = now_unix_ms();
        r.stages[r.current].passed_unix_ms = Some(at);
        let what = if r.current + 1 < r.stages.len() {
            r.current += 1;
            r.stages[r.current].started_unix_ms = Some(at);
            let connected = self.connected_anywhere()?;
            r.stages[r.current].offline = offline_of(&r.stages[r.current].agents, &connected);
            tracing::info!(
                version = r.version,
                stage = %r.stages[r.current].name,
                agents = r.stages[r.current].agents.len(),
                "staged rollout: stage {} passed, promoted",
                stage.name
            );
            format!(
                "rollout of version {}: {} passed, {} gets it",
                r.version, stage.name, r.stages[r.current].name
            )
        } else {
            r.state = RolloutState::Done;
            tracing::info!(
                version = r.version,
                "staged rollout done: every stage passed"
            );
            format!("rollout of version {} done: every stage passed", r.version)
        };
        // Durable before any agent of the next stage is pushed the new version.
        store.step_rollout(&r, &what).await?;
        self.fleet.push_changed()?;
        Ok(())
    }

    /// The agents connected to this coordinator or, as their evidence says, another one.
    fn connected_anywhere(&self) -> Result<BTreeSet<String>, StoreError> {
        let mut c: BTreeSet<String> = self.fleet.links.connected().into_iter().collect();
        c.extend(
            self.store
                .latest_live(&self.me)?
                .into_values()
                .filter(|r| r.connected)
                .map(|r| r.agent),
        );
        Ok(c)
    }

    /// What is known of one agent of the stage: from its link here, or from the evidence of
    /// the coordinator it is linked to (`remote`).
    fn view(
        &self,
        agent: &str,
        seen: &mut BTreeSet<String>,
        remote: &BTreeMap<String, crate::store::LiveRecord>,
    ) -> Result<AgentView, StoreError> {
        let here = self.fleet.links.get(agent).is_some_and(|l| l.connected);
        if !here && let Some(r) = remote.get(agent).filter(|r| r.connected) {
            seen.insert(agent.to_string());
            let acked = r.acked.is_some() && r.acked == r.pushed;
            let apply = match self.store.agent(agent)? {
                Some(rec) if acked && rec.applied_version == r.acked => Some(if rec.applied_ok {
                    Ok(())
                } else {
                    Err(rec.apply_errors)
                }),
                _ => None,
            };
            let fresh = r.heartbeats > r.acked_heartbeats;
            return Ok(AgentView {
                connected: true,
                online: r.online,
                seen: true,
                pushed_new: r.pushed.is_some() && !r.pushed_held,
                acked,
                apply,
                heartbeat: r.heartbeat.clone().map(Arc::new).filter(|_| fresh),
                reported: r.reported.clone().map(Arc::new).filter(|_| fresh),
                profiles: r.profiles.clone(),
            });
        }
        let Some(l) = self.fleet.links.get(agent) else {
            // Linked nowhere now: online while the coordinator it left still counts it so
            // (a relink within the offline threshold).
            return Ok(AgentView {
                seen: seen.contains(agent),
                online: remote.get(agent).is_some_and(|r| r.online),
                ..AgentView::default()
            });
        };
        if l.connected {
            seen.insert(agent.to_string());
        }
        let acked = l.acked.is_some() && l.acked == l.pushed;
        let apply = match self.store.agent(agent)? {
            Some(rec) if acked && rec.applied_version == l.acked => Some(if rec.applied_ok {
                Ok(())
            } else {
                Err(rec.apply_errors)
            }),
            _ => None,
        };
        Ok(AgentView {
            connected: l.connected,
            online: l.online,
            seen: seen.contains(agent),
            pushed_new: l.pushed.is_some() && !l.pushed_held,
            acked,
            apply,
            heartbeat: l
                .judged
                .clone()
                .filter(|_| l.heartbeats > l.acked_heartbeats),
            reported: l
                .last_heartbeat
                .clone()
                .filter(|_| l.heartbeats > l.acked_heartbeats),
            profiles: l.given.keys().cloned().collect(),
        })
    }

    /// Halts the rollout: the failed agents get the previous version back at once, the alert
    /// says who and why.
    async fn halt(
        &self,
        r: &mut Rollout,
        failed: BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let store = &self.store;
        r.state = RolloutState::Halted;
        r.halted_unix_ms = Some(now_unix_ms());
        r.reverted = failed.keys().cloned().collect();
        r.reasons = failed;
        let stage = r
            .stages
            .get(r.current)
            .map(|s| s.name.clone())
            .unwrap_or_default();
        store
            .step_rollout(
                r,
                &format!(
                    "rollout of version {} halted at {stage}: {} back on the previous version",
                    r.version,
                    r.reverted.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
            .await?;
        self.fleet.push_changed()?;
        let reasons: Vec<String> = r.reasons.iter().map(|(a, w)| format!("{a}: {w}")).collect();
        let summary = format!(
            "staged rollout of version {} halted at {stage}: {}; the failed agents are back on the previous version, later stages never got it (tunnelfleet rollout resume | abort)",
            r.version,
            reasons.join("; ")
        );
        tracing::warn!(version = r.version, stage = %stage, "{summary}");
        let alert = Alert::firing(
            AlertKind::RolloutHalted,
            format!("version {}", r.version),
            summary,
            r.reasons.keys().cloned().collect(),
        );
        let a = store.fire_alert(alert, &self.outbox.names()).await?;
        self.outbox.wake();
        r.alert = Some(a.id);
        store.note_rollout(r).await
    }

    async fn resolve_alert(&self, r: &mut Rollout) -> Result<(), StoreError> {
        if let Some(id) = r.alert.take() {
            self.store.resolve_alert(id, &self.outbox.names()).await?;
            self.outbox.wake();
        }
        Ok(())
    }
}
