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

use crate::config::{AgentConfig, ProfileConfig};
use crate::control::{Request, Response};
use crate::health::run_check;
use crate::identity::{IdentityError, load_identity};
use crate::profile::{self, ProfileHandle};
use crate::status::{AgentStatus, ProfileShared, now_unix_ms};

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

struct Slot {
    cfg: Arc<ProfileConfig>,
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
        let target = h.target()?;
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

/// A request and where its answer goes.
pub type Envelope = (Request, oneshot::Sender<Response>);

/// Sends requests to a running supervisor.
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

    /// Sends a request and waits for the answer.
    pub async fn call(&self, req: Request) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((req, tx)).await.is_err() {
            return Response::Error {
                message: "agent is shutting down".into(),
            };
        }
        rx.await.unwrap_or(Response::Error {
            message: "agent is shutting down".into(),
        })
    }
}
