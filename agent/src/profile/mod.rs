//! The life of one profile: its SSH session, reconnects, failover, forwards and health.
//!
//! One task per profile owns the session and decides when to reconnect and where (the rules are
//! [`crate::placement`]'s). Listener, remote-forward and health tasks hang off it and learn about
//! the session through watch channels. Reasons to leave a session (lost, health threshold,
//! command, shutdown) all come to one `select!`, so there is exactly one place that decides what
//! happens next — and logs why.
//!
//! A move to another endpoint while the current session works (failback to the preferred
//! endpoint, or following the group when the coordinator moved it) is make-before-break: the new
//! session must come up, bind every remote forward and pass the health check through itself
//! before it carries anything; until then the old one carries everything, and a refusal leaves
//! the profile where it works with the reason in its status. The old session then stops
//! accepting and carries its open connections to their end (bounded by the drain).
//!
//! `run`: the runner's loop (connect, serve, leave, back off); `moves`: make-before-break
//! moves and what they check; `standby`: the warm standby session; `remote`: remote-forward
//! requests and their refusals.

mod moves;
mod remote;
mod run;
mod standby;

pub use moves::MoveRefused;
pub use remote::RemoteRefused;

use std::sync::Arc;
use std::time::Duration;

use russh::client::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hostkey::HostTrust;
use crate::placement::Coordinated;
use crate::ssh::{self, ClientHandler, Live, RemoteForwards, SessionParams, SshSession};
use crate::status::{HealthStatus, ProfileShared};
use standby::WarmStandby;
use tunnelfleet_protocol::ProfileSpec;

/// Why the runner left a session.
#[derive(Debug)]
enum SessionEnd {
    Lost(String),
    Restart(String),
    Shutdown,
}

/// How long a replaced profile's old session keeps carrying its open connections (make before
/// break: the new session serves new connections meanwhile). Long, because an NBD transfer
/// through a forward that did not change must not be cut by an unrelated change.
pub const REPLACE_DRAIN: Duration = Duration::from_secs(3600);

/// Handle of a running profile. Dropping it stops the profile (without the graceful drain).
pub struct ProfileHandle {
    cancel: CancellationToken,
    restart: mpsc::Sender<String>,
    retarget: watch::Sender<Vec<String>>,
    task: Option<JoinHandle<()>>,
    /// Fires once the profile stopped accepting (listeners closed, ports free).
    accepting_closed: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Replaces the configured drain when set before cancelling.
    drain_override: Arc<std::sync::Mutex<Option<Duration>>>,
}

/// A signal that something finished (a profile stopped, a replaced profile freed its ports),
/// which any number of tasks can wait for. A profile started after a [`Gate`] binds nothing
/// until the gate opens, so a replacement never races its predecessor for a port.
#[derive(Clone, Debug, Default)]
pub struct Gate(CancellationToken);

impl Gate {
    /// A gate that opens once `done` completes (run in its own task).
    pub fn after(done: impl std::future::Future<Output = ()> + Send + 'static) -> Gate {
        let gate = Gate::default();
        let open = gate.0.clone();
        tokio::spawn(async move {
            done.await;
            open.cancel();
        });
        gate
    }

    /// Waits until the gate is open.
    pub async fn wait(&self) {
        self.0.cancelled().await;
    }
}

impl ProfileHandle {
    /// Stops gracefully: stop accepting, drain (bounded), cancel remote forwards, disconnect.
    pub async fn stop(self) {
        self.begin_stop().await;
    }

    /// Starts the graceful stop now; the returned future resolves when it is complete (it need
    /// not be polled for the stop to proceed).
    pub fn begin_stop(mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.cancel.cancel();
        let task = self.task.take();
        async move {
            if let Some(task) = task {
                let _ = task.await;
            }
        }
    }

    /// Make-before-break replacement: stops accepting now and lets the old session carry its
    /// open connections for up to `drain` in the background, so the replacement can start at
    /// once. The returned future resolves when the ports are free.
    pub fn begin_replace(
        mut self,
        drain: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        *self
            .drain_override
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(drain);
        self.cancel.cancel();
        let closed = self.accepting_closed.take();
        // Detached: the old session ends when its last connection does (or at `drain`).
        drop(self.task.take());
        async move {
            if let Some(rx) = closed {
                let _ = rx.await;
            }
        }
    }

    /// Asks for a fresh session now (also cuts a pending backoff short).
    pub fn restart(&self, cause: &str) {
        let _ = self.restart.try_send(cause.to_string());
    }

    /// The coordinator moved the group: `endpoints` in their new order, the group's choice
    /// first. The profile follows make-before-break, keeping its session, counters and health.
    pub fn retarget(&self, endpoints: Vec<String>) {
        self.retarget.send_replace(endpoints);
    }
}

impl Drop for ProfileHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Fresh shared state for a profile's status.
pub fn new_shared(cfg: &ProfileSpec) -> Arc<ProfileShared> {
    let specs: Vec<String> = cfg
        .forward_specs()
        .map(|v| v.iter().map(|f| f.to_string()).collect())
        .unwrap_or_else(|_| cfg.forwards.clone());
    let health = cfg.health.as_ref().map(|h| HealthStatus {
        target: h.target().map(|t| t.describe()).unwrap_or_default(),
        threshold: h.threshold,
        consecutive_failures: 0,
        healthy: true,
        checks: 0,
        failures: 0,
        last: None,
    });
    let shared = ProfileShared::new(
        &cfg.name,
        &cfg.description,
        cfg.endpoints.clone(),
        &specs,
        health,
    );
    shared.lock().jump = cfg.jump.clone();
    Arc::new(shared)
}

/// Starts a profile once every gate in `after` is open (its predecessors released their
/// ports); the identity must already be loaded (see `Supervisor`). `coordinated` tells whether a
/// coordinator decides moves for it now.
pub fn start(
    cfg: Arc<ProfileSpec>,
    login: ssh::Login,
    shared: Arc<ProfileShared>,
    drain: Duration,
    rekey: (u64, Duration),
    after: Vec<Gate>,
    coordinated: Coordinated,
) -> ProfileHandle {
    let cancel = CancellationToken::new();
    let (restart_tx, restart_rx) = mpsc::channel(4);
    let (retarget_tx, retarget_rx) = watch::channel(cfg.endpoints.clone());
    let trust = HostTrust {
        known_hosts: cfg.known_hosts.clone(),
        pinned: HostTrust::pins(&cfg.host_key_fingerprints),
        trust_on_first_use: cfg.trust_on_first_use,
        fleet_host_ca: login.fleet_host_ca,
    };
    // Servers are asked for host certificates only when some authority could vouch for one.
    let certificates = trust.has_cert_authorities();
    let params = SessionParams {
        profile: cfg.name.clone(),
        user: cfg.user.clone(),
        identity: login.identity,
        trust: Arc::new(trust),
        config: Arc::new(ssh::client_config(
            cfg.keepalive_interval,
            cfg.keepalive_count,
            rekey,
            certificates,
        )),
        remote: Arc::new(RemoteForwards::default()),
        tracker: TaskTracker::new(),
        connect_timeout: cfg.connect_timeout,
        jump: cfg.jump_hosts().unwrap_or_default(),
    };
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let drain_override = Arc::new(std::sync::Mutex::new(None));
    let runner = Runner {
        cfg,
        shared,
        params,
        drain,
        drain_override: drain_override.clone(),
        accepting_closed: Some(closed_tx),
        cancel: cancel.clone(),
        restart: restart_rx,
        retarget: retarget_rx,
        coordinated,
        warm: None,
    };
    let task = tokio::spawn(async move {
        for gate in &after {
            tokio::select! {
                _ = gate.wait() => {}
                // Stopped before it could start: nothing was bound.
                _ = runner.cancel.cancelled() => return,
            }
        }
        runner.run().await
    });
    ProfileHandle {
        cancel,
        restart: restart_tx,
        retarget: retarget_tx,
        task: Some(task),
        accepting_closed: Some(closed_rx),
        drain_override,
    }
}

struct Runner {
    cfg: Arc<ProfileSpec>,
    shared: Arc<ProfileShared>,
    params: SessionParams,
    drain: Duration,
    drain_override: Arc<std::sync::Mutex<Option<Duration>>>,
    accepting_closed: Option<tokio::sync::oneshot::Sender<()>>,
    cancel: CancellationToken,
    restart: mpsc::Receiver<String>,
    retarget: watch::Receiver<Vec<String>>,
    coordinated: Coordinated,
    /// `standby = "warm"`: the session held open to the next endpoint.
    warm: Option<WarmStandby>,
}

/// The session that carries the profile's traffic now.
struct Current {
    live: Arc<Live>,
    closed: oneshot::Receiver<String>,
    started: Instant,
    /// Cancels this session's pending remote-forward requests.
    remote_cancel: CancellationToken,
    /// Sessions to the jump hosts it runs through (closed with it).
    _jumps: Vec<Handle<ClientHandler>>,
}

/// A session that passed every check of a move and is ready to carry traffic.
struct Candidate {
    session: SshSession,
    /// `(forward index, bound port)` of its remote forwards, all bound.
    bound: Vec<(usize, u32)>,
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// `host:port` of an endpoint.
fn addr((host, port): &(String, u16)) -> String {
    format!("{host}:{port}")
}
