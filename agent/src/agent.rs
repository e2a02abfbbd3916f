//! `run`: the whole standalone agent, as a library call.
//!
//! The binary and the tests call the same function with a config and a shutdown token (the
//! mini-redis pattern), so what the tests prove is what ships.

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::control::{self, ControlError};
use crate::supervisor::{StartError, Supervisor, SupervisorHandle};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Profiles could not be prepared (identity files).
    #[error(transparent)]
    Start(#[from] StartError),
    /// The control socket could not be bound.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A prepared agent: config checked, identities loaded, control socket bound.
pub struct Agent {
    supervisor: Supervisor,
    listener: UnixListener,
    socket: std::path::PathBuf,
}

impl Agent {
    /// Prepares everything that can fail before any tunnel starts, so a bad config changes nothing.
    pub async fn prepare(cfg: &AgentConfig) -> Result<Self, RunError> {
        let supervisor = Supervisor::new(cfg)?;
        let listener = control::bind(&cfg.agent.control_socket).await?;
        Ok(Agent {
            supervisor,
            listener,
            socket: cfg.agent.control_socket.clone(),
        })
    }

    /// Runs until `shutdown` is cancelled, then stops every profile gracefully.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (handle, mut requests) = SupervisorHandle::channel();
        let control_stop = CancellationToken::new();
        let control = tokio::spawn(control::serve(self.listener, handle, control_stop.clone()));
        tracing::info!(socket = %self.socket.display(), "agent running");
        self.supervisor.start_autostart();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((req, reply)) = requests.recv() => {
                    let resp = self.supervisor.handle(req).await;
                    let _ = reply.send(resp);
                }
            }
        }
        control_stop.cancel();
        let _ = control.await;
        self.supervisor.shutdown().await;
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("agent stopped");
    }
}

/// Prepares and runs the agent.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    Agent::prepare(&cfg).await?.run(shutdown).await;
    Ok(())
}
