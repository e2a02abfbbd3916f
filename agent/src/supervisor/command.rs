//! What the supervisor is asked and how it answers: the control socket's [`Request`] and
//! [`Response`] (JSON lines), pushed profile sets, and the [`SupervisorHandle`] every other
//! task holds.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tunnelfleet_protocol::{Applied, ProfileSet};

use crate::status::{AgentStatus, HealthResult};

/// A command for the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Every profile's status.
    Status,
    /// Start a stopped profile.
    Start {
        /// Profile name.
        name: String,
    },
    /// Stop a profile gracefully.
    Stop {
        /// Profile name.
        name: String,
    },
    /// Re-establish a profile's session now.
    Restart {
        /// Profile name.
        name: String,
    },
    /// Run a profile's health check now.
    Health {
        /// Profile name.
        name: String,
    },
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done; the message says what happened.
    Ok {
        /// What happened.
        message: String,
    },
    /// Status snapshot.
    Status(AgentStatus),
    /// Health check result.
    Health(HealthResult),
    /// Refused or failed.
    Error {
        /// Why it was refused or failed, for the operator.
        message: String,
    },
}

/// Work that outlives the supervisor's turn (a drain, a health check, an apply settling):
/// it runs in its own task and answers when done, so the supervisor's loop never waits on it.
pub type Later<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The answer to a request: at once, or when the work behind it is done.
pub enum Reply {
    /// Answered during the supervisor's turn.
    Now(Response),
    /// Answered by a task.
    Later(Later<Response>),
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
