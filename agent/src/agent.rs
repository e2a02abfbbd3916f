//! `run`: the whole standalone agent, as a library call.
//!
//! The binary and the tests call the same function with a config and a shutdown token (the
//! mini-redis pattern), so what the tests prove is what ships.

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::control::{self, ControlError};
use crate::supervisor::{StartError, Supervisor, SupervisorHandle};
use tokio_util::task::TaskTracker;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Profiles could not be prepared (identity files).
    #[error(transparent)]
    Start(#[from] StartError),
    /// The control socket could not be bound.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Enrollment with a join token failed.
    #[error(transparent)]
    Enroll(#[from] crate::enroll::EnrollError),
    /// The metrics listener could not be bound.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// A prepared agent: config checked, identities loaded, control socket (and metrics listener)
/// bound.
pub struct Agent {
    coordinator: Option<crate::config::CoordinatorSection>,
    supervisor: Supervisor,
    listener: UnixListener,
    socket: std::path::PathBuf,
    metrics: Option<(tokio::net::TcpListener, crate::metrics::Metrics)>,
}

impl Agent {
    /// Prepares everything that can fail before any tunnel starts, so a bad config changes nothing.
    pub async fn prepare(cfg: &AgentConfig) -> Result<Self, RunError> {
        let supervisor = Supervisor::new(cfg)?;
        if let Some(c) = &cfg.coordinator {
            if crate::enroll::needed(c) {
                crate::enroll::enroll(c).await?;
            }
            tunnelfleet_runtime::secret::check_permissions(&c.key).map_err(|source| {
                StartError::Identity {
                    profile: "coordinator".into(),
                    source: source.into(),
                }
            })?;
        }
        let metrics = match cfg.agent.metrics_listen {
            Some(addr) => Some((
                crate::metrics::bind(addr).await?,
                crate::metrics::Metrics::new()?,
            )),
            None => None,
        };
        let listener = control::bind(&cfg.agent.control_socket).await?;
        Ok(Agent {
            coordinator: cfg.coordinator.clone(),
            supervisor,
            listener,
            socket: cfg.agent.control_socket.clone(),
            metrics,
        })
    }

    /// Where `/metrics` is served, when it is (the bound address: port 0 is resolved).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Runs until `shutdown` is cancelled, then stops every profile gracefully.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (handle, mut requests) = SupervisorHandle::channel();
        let control_stop = CancellationToken::new();
        let control = tokio::spawn(control::serve(
            self.listener,
            handle.clone(),
            control_stop.clone(),
        ));
        let metrics = self.metrics.take().map(|(listener, metrics)| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics");
            }
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics,
                handle.clone(),
                control_stop.clone(),
            ))
        });
        tracing::info!(socket = %self.socket.display(), "agent running");
        self.supervisor.start_autostart();
        let fleet_stop = CancellationToken::new();
        let mut fleet = None;
        if let Some(c) = self.coordinator.take() {
            // The cached set runs first: tunnels come up without waiting for the coordinator.
            if let Some(set) = crate::fleet::load_cache(&c.state_dir) {
                let applied = self.supervisor.apply(&set).await;
                tracing::info!(
                    version = set.version,
                    ok = applied.ok,
                    "running cached profiles"
                );
            }
            fleet = Some(tokio::spawn(crate::fleet::run(
                c,
                handle.clone(),
                self.supervisor.coordination(),
                self.supervisor.ssh_credential(),
                fleet_stop.clone(),
            )));
        }
        tunnelfleet_runtime::systemd::ready(&format!(
            "{} profiles; control socket {}",
            self.supervisor.profile_count(),
            self.socket.display()
        ));
        let watchdog = tunnelfleet_runtime::systemd::spawn_watchdog(shutdown.clone());
        // Drains, health checks and applies settling answer from here, not from the loop.
        let work = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(env) = requests.recv() => self.supervisor.serve(env, &work),
            }
        }
        // Requests still queued or arriving (control socket, /metrics, the fleet link) now get
        // "shutting down" at once instead of waiting for a loop that no longer runs, so the
        // listeners below can finish their graceful shutdown.
        drop(requests);
        tunnelfleet_runtime::systemd::stopping();
        if let Some(w) = watchdog {
            let _ = w.await;
        }
        fleet_stop.cancel();
        if let Some(f) = fleet {
            let _ = f.await;
        }
        control_stop.cancel();
        let _ = control.await;
        if let Some(m) = metrics {
            let _ = m.await;
        }
        self.supervisor.shutdown().await;
        work.close();
        work.wait().await;
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("agent stopped");
    }
}

/// Prepares and runs the agent.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    Agent::prepare(&cfg).await?.run(shutdown).await;
    Ok(())
}
