//! Operator commands run on a connected agent: sent on its link, answered by it alone, bounded
//! in time.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;
use tunnelfleet_protocol::{Command, CommandAction, CommandResult, CoordinatorMessage, encode};

use super::Fleet;

/// Commands waiting for their answer: id -> the agent asked and who waits.
pub(super) type Pending = HashMap<u64, (String, oneshot::Sender<CommandResult>)>;

/// Why an operator's command did not get an answer from the agent.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No connection to that agent.
    #[error("agent {0:?} is not connected")]
    NotConnected(String),
    /// Its connection went away before the command was sent.
    #[error("agent {0:?} disconnected")]
    Disconnected(String),
    /// Its connection went away before it answered.
    #[error("agent {0:?} disconnected before answering")]
    NoAnswer(String),
    /// It did not answer in time.
    #[error("agent {agent:?} did not answer within {timeout:?}")]
    Timeout {
        /// The agent.
        agent: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The command could not be encoded.
    #[error(transparent)]
    Encode(#[from] tunnelfleet_protocol::EncodeError),
}

/// How long an operator's command may take on the agent (a health check is bounded by its
/// own timeout, well below this).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

impl Fleet {
    /// Runs an operator's command on a connected agent and waits for its result.
    pub async fn command(
        &self,
        agent: &str,
        action: CommandAction,
        profile: &str,
    ) -> Result<CommandResult, CommandError> {
        let id = self
            .next_command
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tx = self
            .links
            .lock()
            .get(agent)
            .filter(|(l, _)| l.connected)
            .and_then(|(_, live)| live.as_ref().map(|l| l.tx.clone()))
            .ok_or_else(|| CommandError::NotConnected(agent.to_string()))?;
        let frame = encode(&CoordinatorMessage::Command(Command {
            id,
            action,
            profile: profile.to_string(),
        }))?;
        let (done, answer) = oneshot::channel();
        self.pending().insert(id, (agent.to_string(), done));
        if tx.send(frame).await.is_err() {
            self.pending().remove(&id);
            return Err(CommandError::Disconnected(agent.to_string()));
        }
        let r = tokio::time::timeout(COMMAND_TIMEOUT, answer).await;
        self.pending().remove(&id);
        match r {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(CommandError::NoAnswer(agent.to_string())),
            Err(_) => Err(CommandError::Timeout {
                agent: agent.to_string(),
                timeout: COMMAND_TIMEOUT,
            }),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.commands.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the waiter of command `id` if it was sent to `agent_id` (an agent cannot answer
    /// another agent's command).
    pub fn answered(&self, agent_id: &str, id: u64) -> Option<oneshot::Sender<CommandResult>> {
        let mut p = self.pending();
        match p.get(&id) {
            Some((asked, _)) if asked == agent_id => p.remove(&id).map(|(_, done)| done),
            _ => None,
        }
    }
}
