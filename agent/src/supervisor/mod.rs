//! The agent's profiles and the commands that act on them.
//!
//! The supervisor owns every profile's handle; the control socket, `/metrics` and the
//! coordinator link reach it through [`SupervisorHandle`] (a channel), so commands are applied
//! one at a time in arrival order and no lock is ever shared between them and the profiles.
//! Its turn never waits on long work: a drain, a health check or an apply settling runs in its
//! own task and answers when done ([`Reply::Later`]), so `tunnels status`, heartbeats and
//! `/metrics` are answered while a profile drains. A profile started after a stop or replace
//! waits (in its own task) for its predecessor's ports ([`profile::Gate`]).
//!
//! # Layout
//! - this module: the profiles, start, stop, restart, health, status, shutdown.
//! - [`apply`]: a pushed profile set applied as a diff.
//! - [`command`]: requests, responses and the handle.

mod apply;
pub mod command;

pub use command::{Envelope, Later, Reply, Request, Response, SupervisorHandle};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_runtime::clock::now_unix_ms;

use crate::config::AgentConfig;
use crate::health::run_check;
use crate::identity::{IdentityError, load_identity};
use crate::placement::Coordinated;
use crate::profile::{self, Gate, ProfileHandle};
use crate::ssh::{Identity, Login};
use crate::sshcert::SshCredential;
use crate::status::{AgentStatus, ProfileShared};

/// Why the agent cannot start its profiles.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A profile's identity file is unusable.
    #[error("profile {profile}: {source}")]
    Identity {
        /// Profile name.
        profile: String,
        /// Why the key cannot be used (unreadable, loose permissions, encrypted).
        source: IdentityError,
    },
    /// The agent's own SSH key (for certificates) cannot be made or read.
    #[error("the agent's SSH key: {0}")]
    SshKey(#[from] crate::sshcert::SshCredentialError),
}

/// Why a command on a profile was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No profile of that name.
    #[error("no profile named {name:?} (profiles: {})", known.join(", "))]
    NoProfile {
        /// The name asked for.
        name: String,
        /// The profiles there are.
        known: Vec<String>,
    },
    /// `tunnels health` on a profile without a health check.
    #[error("profile {0} has no health check configured")]
    NoHealthCheck(String),
    /// Its health check's target does not parse (validated at load; here for safety).
    #[error(transparent)]
    HealthTarget(#[from] tunnelfleet_protocol::profile::HealthTargetError),
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
    login: Login,
    shared: Arc<ProfileShared>,
    running: Option<ProfileHandle>,
    /// Opens when the previous run of this profile released its ports; the next start
    /// waits for it.
    released: Option<Gate>,
}

/// All profiles of the agent.
pub struct Supervisor {
    slots: BTreeMap<String, Slot>,
    drain: Duration,
    /// Every session's rekey limits (bytes, time).
    rekey: (u64, Duration),
    started_unix_ms: u64,
    /// Whether the coordinator is connected (it then decides moves for pushed profiles).
    coordinated: Coordinated,
    /// The agent's own certified SSH key (an agent with a coordinator): what profiles without
    /// an `identity_file` log in with.
    ssh: Option<Arc<SshCredential>>,
}

/// What a profile logs in with (its identity file, else the agent's certified key) and the
/// fleet's host CA file when it trusts it.
fn login(p: &ProfileSpec, ssh: Option<&Arc<SshCredential>>) -> Result<Login, IdentityError> {
    let identity = match (&p.identity_file, ssh) {
        (Some(path), _) => Identity::Key(Arc::new(load_identity(path)?)),
        (None, Some(cred)) => Identity::Certified(cred.clone()),
        (None, None) => return Err(IdentityError::NoCoordinator),
    };
    let fleet_host_ca = match (p.fleet_host_ca, ssh) {
        (false, _) => None,
        (true, Some(cred)) => Some(cred.host_ca_path()),
        (true, None) => return Err(IdentityError::NoFleetHostCa),
    };
    Ok(Login {
        identity,
        fleet_host_ca,
    })
}

impl Supervisor {
    /// Checks every profile's identity file; refuses the whole config if one is unusable. An
    /// agent with a coordinator opens its own SSH key (made on first use) for certificates.
    pub fn new(cfg: &AgentConfig) -> Result<Self, StartError> {
        let ssh = match &cfg.coordinator {
            Some(c) => Some(Arc::new(SshCredential::open(
                &c.state_dir.join("ssh"),
                &c.agent_id,
            )?)),
            None => None,
        };
        let mut slots = BTreeMap::new();
        for p in &cfg.profiles {
            let login = login(p, ssh.as_ref()).map_err(|source| StartError::Identity {
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
                    login,
                    shared: profile::new_shared(p),
                    running: None,
                    released: None,
                },
            );
        }
        Ok(Supervisor {
            slots,
            drain: cfg.agent.drain_timeout,
            rekey: (cfg.agent.rekey_after_bytes, cfg.agent.rekey_after),
            started_unix_ms: now_unix_ms(),
            coordinated: Coordinated::default(),
            ssh,
        })
    }

    /// The agent's own certified SSH key, when it has a coordinator.
    pub fn ssh_credential(&self) -> Option<Arc<SshCredential>> {
        self.ssh.clone()
    }

    /// The flag the coordinator link sets while it is connected.
    pub fn coordination(&self) -> Coordinated {
        self.coordinated.clone()
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
    pub fn start(&mut self, name: &str) -> Result<String, CommandError> {
        let (drain, rekey) = (self.drain, self.rekey);
        let coordinated = self.coordinated.clone();
        let slot = self.slot(name)?;
        // A local profile is on its own whether or not a coordinator is connected.
        let coordinated = match slot.origin {
            Origin::Pushed => coordinated,
            Origin::Local => Coordinated::default(),
        };
        if slot.running.is_some() {
            return Ok(format!("{name} is already running"));
        }
        // Fresh counters and state per run: a stop/start is a new tunnel.
        slot.shared = profile::new_shared(&slot.cfg);
        let after = slot.released.take().into_iter().collect();
        slot.running = Some(profile::start(
            slot.cfg.clone(),
            slot.login.clone(),
            slot.shared.clone(),
            drain,
            rekey,
            after,
            coordinated,
        ));
        tracing::info!(profile = name, "profile started");
        Ok(format!("{name} started"))
    }

    /// Stops a profile gracefully: it stops accepting now; the answer comes when its drain is
    /// over.
    pub fn stop(&mut self, name: &str) -> Result<Reply, CommandError> {
        let slot = self.slot(name)?;
        let Some(h) = slot.running.take() else {
            return Ok(Reply::Now(Response::Ok {
                message: format!("{name} is not running"),
            }));
        };
        let released = Gate::after(h.begin_stop());
        slot.released = Some(released.clone());
        let name = name.to_string();
        Ok(Reply::Later(Box::pin(async move {
            released.wait().await;
            tracing::info!(profile = %name, "profile stopped");
            Response::Ok {
                message: format!("{name} stopped"),
            }
        })))
    }

    /// Restarts a profile's session (starts it if stopped).
    pub fn restart(&mut self, name: &str) -> Result<String, CommandError> {
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
    pub fn health_check(&mut self, name: &str) -> Result<Reply, CommandError> {
        let slot = self.slot(name)?;
        let Some(h) = slot.cfg.health.clone() else {
            return Err(CommandError::NoHealthCheck(name.to_string()));
        };
        let target = h.target()?;
        Ok(Reply::Later(Box::pin(async move {
            Response::Health(run_check(&target, h.timeout).await)
        })))
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

    fn slot(&mut self, name: &str) -> Result<&mut Slot, CommandError> {
        let known: Vec<String> = self.slots.keys().cloned().collect();
        self.slots
            .get_mut(name)
            .ok_or_else(|| CommandError::NoProfile {
                name: name.to_string(),
                known,
            })
    }

    /// Applies one control request during the supervisor's turn.
    pub fn handle(&mut self, req: Request) -> Reply {
        let result = match req {
            Request::Status => return Reply::Now(Response::Status(self.status())),
            Request::Start { name } => self.start(&name),
            Request::Stop { name } => return self.stop(&name).unwrap_or_else(refused),
            Request::Restart { name } => self.restart(&name),
            Request::Health { name } => return self.health_check(&name).unwrap_or_else(refused),
        };
        Reply::Now(match result {
            Ok(message) => Response::Ok { message },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        })
    }

    /// Takes one envelope: what can be answered now is; longer work goes to `tasks` and
    /// answers from there.
    pub fn serve(&mut self, env: Envelope, tasks: &TaskTracker) {
        match env {
            Envelope::Control(req, reply) => match self.handle(req) {
                Reply::Now(resp) => {
                    let _ = reply.send(resp);
                }
                Reply::Later(work) => {
                    tasks.spawn(async move {
                        let _ = reply.send(work.await);
                    });
                }
            },
            Envelope::Apply(set, reply) => {
                let work = self.begin_apply(&set);
                tasks.spawn(async move {
                    let _ = reply.send(work.await);
                });
            }
        }
    }
}

fn refused(e: CommandError) -> Reply {
    Reply::Now(Response::Error {
        message: e.to_string(),
    })
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
