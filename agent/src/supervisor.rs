//! The agent's profiles and the commands that act on them.
//!
//! The supervisor owns every profile's handle; the control socket reaches it through
//! [`SupervisorHandle`] (a channel), so commands are applied one at a time in arrival order and
//! no lock is ever shared between the socket and the profiles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use tokio::sync::{mpsc, oneshot};

use crate::config::AgentConfig;
use crate::control::{Request, Response};
use crate::health::run_check;
use crate::identity::{IdentityError, load_identity};
use crate::profile::{self, ProfileHandle};
use crate::status::{AgentStatus, ForwardState, ProfileShared};
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_protocol::{Applied, ForwardResult, ProfileSet};
use tunnelfleet_runtime::clock::now_unix_ms;

/// How long `apply` waits for new listeners to bind before reporting.
const APPLY_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Why the agent cannot start its profiles.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A profile's identity file is unusable.
    #[error("profile {profile}: {source}")]
    Identity {
        /// Profile name.
        profile: String,
        /// Why.
        source: IdentityError,
    },
}

/// Where a profile came from: a local profile is never replaced by a pushed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Local,
    Pushed,
}

struct Slot {
    origin: Origin,
    cfg: Arc<ProfileSpec>,
    key: Arc<PrivateKey>,
    shared: Arc<ProfileShared>,
    running: Option<ProfileHandle>,
}

/// All profiles of the agent.
pub struct Supervisor {
    slots: BTreeMap<String, Slot>,
    drain: Duration,
    started_unix_ms: u64,
}

impl Supervisor {
    /// Checks every profile's identity file; refuses the whole config if one is unusable.
    pub fn new(cfg: &AgentConfig) -> Result<Self, StartError> {
        let mut slots = BTreeMap::new();
        for p in &cfg.profiles {
            let key = load_identity(&p.identity_file).map_err(|source| StartError::Identity {
                profile: p.name.clone(),
                source,
            })?;
            for exposed in p.exposed_forwards() {
                tracing::warn!(profile = %p.name, forward = %exposed, "forward listens beyond loopback, as configured");
            }
            slots.insert(
                p.name.clone(),
                Slot {
                    origin: Origin::Local,
                    cfg: Arc::new(p.clone()),
                    key: Arc::new(key),
                    shared: profile::new_shared(p),
                    running: None,
                },
            );
        }
        Ok(Supervisor {
            slots,
            drain: cfg.agent.drain_timeout,
            started_unix_ms: now_unix_ms(),
        })
    }

    /// How many profiles it holds (local and pushed).
    pub fn profile_count(&self) -> usize {
        self.slots.len()
    }

    /// Starts every profile marked `autostart`.
    pub fn start_autostart(&mut self) {
        let names: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.cfg.autostart)
            .map(|s| s.cfg.name.clone())
            .collect();
        for n in names {
            let _ = self.start(&n);
        }
    }

    /// Starts a profile.
    pub fn start(&mut self, name: &str) -> Result<String, String> {
        let drain = self.drain;
        let slot = self.slot(name)?;
        if slot.running.is_some() {
            return Ok(format!("{name} is already running"));
        }
        // Fresh counters and state per run: a stop/start is a new tunnel.
        slot.shared = profile::new_shared(&slot.cfg);
        slot.running = Some(profile::start(
            slot.cfg.clone(),
            slot.key.clone(),
            slot.shared.clone(),
            drain,
        ));
        tracing::info!(profile = name, "profile started");
        Ok(format!("{name} started"))
    }

    /// Stops a profile gracefully.
    pub async fn stop(&mut self, name: &str) -> Result<String, String> {
        let slot = self.slot(name)?;
        match slot.running.take() {
            Some(h) => {
                h.stop().await;
                tracing::info!(profile = name, "profile stopped");
                Ok(format!("{name} stopped"))
            }
            None => Ok(format!("{name} is not running")),
        }
    }

    /// Restarts a profile's session (starts it if stopped).
    pub fn restart(&mut self, name: &str) -> Result<String, String> {
        let slot = self.slot(name)?;
        match &slot.running {
            Some(h) => {
                h.restart("restart requested");
                Ok(format!("{name} restarting"))
            }
            None => self.start(name),
        }
    }

    /// Runs the profile's health check now (the result does not count towards the threshold).
    pub fn health_check(
        &mut self,
        name: &str,
    ) -> Result<impl std::future::Future<Output = Response> + use<>, String> {
        let slot = self.slot(name)?;
        let Some(h) = slot.cfg.health.clone() else {
            return Err(format!("profile {name} has no health check configured"));
        };
        let target = h.target().map_err(|e| e.to_string())?;
        Ok(async move { Response::Health(run_check(&target, h.timeout).await) })
    }

    /// A snapshot of everything.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            started_unix_ms: self.started_unix_ms,
            profiles: self.slots.values().map(|s| s.shared.snapshot()).collect(),
        }
    }

    /// Stops every profile, concurrently, each with its bounded drain.
    pub async fn shutdown(&mut self) {
        let handles: Vec<ProfileHandle> = self
            .slots
            .values_mut()
            .filter_map(|s| s.running.take())
            .collect();
        let stops = handles.into_iter().map(|h| h.stop());
        futures_join_all(stops).await;
    }

    /// Applies a pushed profile set as a diff: pushed profiles that are gone are stopped,
    /// identical ones are left running untouched (their connections stay open), changed ones
    /// are replaced, new ones started. Local profiles are never touched; a pushed profile with a
    /// local profile's name is refused. Returns one result per forward, after the listeners
    /// have settled, so a port conflict is reported in the acknowledgement.
    #[tracing::instrument(name = "apply_profiles", skip_all, fields(version = set.version, profiles = set.profiles.len()))]
    pub async fn apply(&mut self, set: &ProfileSet) -> Applied {
        let mut results = Vec::new();
        let wanted: BTreeMap<&str, &ProfileSpec> =
            set.profiles.iter().map(|p| (p.name.as_str(), p)).collect();
        let gone: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.origin == Origin::Pushed && !wanted.contains_key(s.cfg.name.as_str()))
            .map(|s| s.cfg.name.clone())
            .collect();
        for name in gone {
            if let Some(mut slot) = self.slots.remove(&name)
                && let Some(h) = slot.running.take()
            {
                h.stop().await;
            }
            tracing::info!(profile = %name, version = set.version, "pushed profile removed");
        }
        let mut started = Vec::new();
        for (name, spec) in wanted {
            let fail = |detail: String| ForwardResult {
                profile: name.to_string(),
                forward: "*".into(),
                ok: false,
                detail,
            };
            if let Err(e) = spec.validate_runnable() {
                results.push(fail(e.within(&format!("profile.{name}")).to_string()));
                continue;
            }
            let cfg = ProfileSpec {
                // Resolved by the coordinator into `endpoints`: the agent runs endpoints only.
                group: None,
                // A pushed profile runs: the coordinator decides by assigning it.
                autostart: true,
                ..(*spec).clone()
            };
            match self.slots.get(name) {
                Some(s) if s.origin == Origin::Local => {
                    results.push(fail(format!(
                        "a local profile named {name:?} exists; the local one stays"
                    )));
                    continue;
                }
                Some(s) if *s.cfg == cfg => {
                    for f in &cfg.forwards {
                        results.push(ForwardResult {
                            profile: name.to_string(),
                            forward: f.clone(),
                            ok: true,
                            detail: "unchanged".into(),
                        });
                    }
                    continue;
                }
                _ => {}
            }
            let key = match load_identity(&cfg.identity_file) {
                Ok(k) => k,
                Err(e) => {
                    results.push(fail(e.to_string()));
                    continue;
                }
            };
            let replaced = match self.slots.remove(name) {
                Some(mut old) => {
                    // Make before break: the old session stops accepting (ports freed) but
                    // keeps its open connections while the new one starts.
                    if let Some(h) = old.running.take() {
                        h.replace(profile::REPLACE_DRAIN).await;
                    }
                    true
                }
                None => false,
            };
            self.slots.insert(
                name.to_string(),
                Slot {
                    origin: Origin::Pushed,
                    shared: profile::new_shared(&cfg),
                    cfg: Arc::new(cfg),
                    key: Arc::new(key),
                    running: None,
                },
            );
            let _ = self.start(name);
            tracing::info!(profile = %name, version = set.version, replaced, "pushed profile applied");
            started.push((name.to_string(), replaced));
        }
        // Let the new listeners bind (or fail to) before reporting.
        let deadline = tokio::time::Instant::now() + APPLY_SETTLE;
        for (name, replaced) in started {
            let Some(slot) = self.slots.get(&name) else {
                continue;
            };
            let snap = loop {
                let snap = slot.shared.snapshot();
                let settled = snap
                    .forwards
                    .iter()
                    .all(|f| f.state != ForwardState::Stopped);
                if settled || tokio::time::Instant::now() >= deadline {
                    break snap;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            };
            for (spec, f) in slot.cfg.forwards.iter().zip(&snap.forwards) {
                let verb = if replaced { "replaced" } else { "started" };
                let (ok, detail) = match f.state {
                    ForwardState::Retrying => (false, f.detail.clone().unwrap_or_default()),
                    ForwardState::Stopped => (false, "did not start".to_string()),
                    s => (true, format!("{verb}, {s:?}").to_lowercase()),
                };
                results.push(ForwardResult {
                    profile: name.clone(),
                    forward: spec.clone(),
                    ok,
                    detail,
                });
            }
        }
        Applied {
            version: set.version,
            ok: results.iter().all(|r| r.ok),
            results,
        }
    }

    fn slot(&mut self, name: &str) -> Result<&mut Slot, String> {
        let known: Vec<String> = self.slots.keys().cloned().collect();
        self.slots
            .get_mut(name)
            .ok_or_else(|| format!("no profile named {name:?} (profiles: {})", known.join(", ")))
    }

    /// Applies one control request.
    pub async fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Status => return Response::Status(self.status()),
            Request::Start { name } => self.start(&name),
            Request::Stop { name } => self.stop(&name).await,
            Request::Restart { name } => self.restart(&name),
            Request::Health { name } => match self.health_check(&name) {
                Ok(fut) => return fut.await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(message) => Response::Ok { message },
            Err(message) => Response::Error { message },
        }
    }
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

/// A command for the supervisor and where its answer goes.
pub enum Envelope {
    /// From the control socket.
    Control(Request, oneshot::Sender<Response>),
    /// A profile set pushed by the coordinator.
    Apply(ProfileSet, oneshot::Sender<Applied>),
}

/// Sends commands to a running supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<Envelope>,
}

impl SupervisorHandle {
    /// A handle and the receiving end the supervisor loop reads.
    pub fn channel() -> (Self, mpsc::Receiver<Envelope>) {
        let (tx, rx) = mpsc::channel(64);
        (SupervisorHandle { tx }, rx)
    }

    /// Sends a control request and waits for the answer.
    pub async fn call(&self, req: Request) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Envelope::Control(req, tx)).await.is_err() {
            return Response::Error {
                message: "agent is shutting down".into(),
            };
        }
        rx.await.unwrap_or(Response::Error {
            message: "agent is shutting down".into(),
        })
    }

    /// Applies a pushed profile set; `None` when the agent is shutting down.
    pub async fn apply(&self, set: ProfileSet) -> Option<Applied> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Envelope::Apply(set, tx)).await.ok()?;
        rx.await.ok()
    }

    /// A status snapshot; `None` when the agent is shutting down.
    pub async fn status(&self) -> Option<AgentStatus> {
        match self.call(Request::Status).await {
            Response::Status(s) => Some(s),
            _ => None,
        }
    }
}
