//! Why a hook was refused at start, and why one delivery attempt failed (the outbox records it
//! as text and tries again later).

use std::time::Duration;

/// A `[[hook]]` entry that cannot be used; nothing starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hook {hook:?}: {key}: {reason}")]
pub struct HookConfigError {
    /// The hook's name.
    pub hook: String,
    /// The offending key.
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The receiver answered with an error status.
    #[error("HTTP {status}: {body}")]
    Status {
        /// Its status.
        status: hyper::StatusCode,
        /// The start of its body.
        body: String,
    },
    /// The request could not be made or sent.
    #[error("{0}")]
    Transport(String),
    /// The command hook's program failed.
    #[error("{program}: {reason}")]
    Command {
        /// The program.
        program: String,
        /// How it failed.
        reason: String,
    },
    /// The SMTP relay did not take the message.
    #[error("{relay}: {reason}")]
    Smtp {
        /// `host:port` of the relay.
        relay: String,
        /// The relay's answer, or that it gave none in time.
        reason: String,
    },
    /// The email could not be built.
    #[error("building the message: {0}")]
    Message(#[from] lettre::error::Error),
}
