//! The messages of the control link.
//!
//! The agent opens with [`Hello`]; the coordinator answers [`Welcome`] or [`CoordinatorMessage::Refused`]
//! (for example on a version mismatch, which both sides log with the reason). After that the
//! agent sends [`Heartbeat`]s and [`Applied`] acknowledgements; the coordinator pushes
//! [`ProfileSet`]s. Durations are exact (`std::time::Duration`, or integer milliseconds) and
//! latencies integer microseconds, so every message compares equal after a round trip (no
//! floats).
//!
//! Compatibility: enums are encoded by variant index, so new variants go at the end and a
//! removed one leaves its slot; a change that older peers cannot read bumps
//! [`crate::PROTOCOL_VERSION`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;
use crate::profile::ProfileSpec;

/// What the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum AgentMessage {
    /// First message on a connection.
    Hello(Hello),
    /// Periodic state.
    Heartbeat(Heartbeat),
    /// The result of applying a pushed profile set.
    Applied(Applied),
    /// The answer to a [`CoordinatorMessage::Command`].
    CommandResult(CommandResult),
    /// A certificate for the agent's own SSH key, asked for when it has none or it is past
    /// half its life.
    SshCertRequest(SshCertRequest),
}

/// What the coordinator sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum CoordinatorMessage {
    /// The hello was accepted.
    Welcome(Welcome),
    /// The hello was refused; the connection closes after this.
    Refused {
        /// Why, for both sides' logs.
        reason: String,
    },
    /// The profiles this agent must run now.
    Push(ProfileSet),
    /// An operator's command for one of the agent's profiles (`tunnelfleet tunnels … --agent`).
    Command(Command),
    /// The answer to an [`AgentMessage::SshCertRequest`].
    SshCert(SshCert),
    /// What the coordinator sees of an endpoint this agent's health check fails through: how
    /// many other agents on it pass theirs. Sent while the agent reports failing checks there,
    /// so its health rule can tell "the OMA's service is down" (move) from "this appliance's
    /// problem" (stay, alerted).
    Evidence(EndpointEvidence),
}

/// Other agents' health checks through one endpoint ([`CoordinatorMessage::Evidence`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct EndpointEvidence {
    /// The endpoint (`host:port`), as the agent reported it.
    pub endpoint: String,
    /// Other agents up on it whose health check passed in the last minute with no failure since.
    pub others_passing: u32,
    /// Other agents whose health check fails through it now.
    pub others_failing: u32,
}

/// The agent's SSH public key, for the coordinator's SSH user CA to certify. The private half
/// never leaves the appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SshCertRequest {
    /// One OpenSSH public key line (`ssh-ed25519 AAAA… comment`), at most
    /// [`crate::limits::MAX_SSH_KEY_LINE`] bytes.
    pub public_key: String,
}

/// What the coordinator's SSH user CA made of an [`SshCertRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum SshCert {
    /// The certificate, one OpenSSH line (`ssh-ed25519-cert-v01@openssh.com AAAA…`).
    Granted {
        /// The certificate line.
        certificate: String,
    },
    /// Refused, with the reason for the agent's log (the agent asks again later).
    Refused {
        /// Why.
        reason: String,
    },
}

/// What an operator asks of a profile on an agent, as `tunnelfleet tunnels` does locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum CommandAction {
    /// Start a stopped profile.
    Start,
    /// Stop it, draining open connections.
    Stop,
    /// Re-establish its session now.
    Restart,
    /// Run its health check now.
    Health,
    /// `tunnelfleet net check` from the agent against its OMA endpoints (the profile is
    /// ignored).
    NetCheck,
    /// `tunnelfleet audit` on the agent's host (the profile is ignored).
    Audit,
}

/// Coordinator -> agent: run `action` on `profile`; answered by a [`CommandResult`] with the
/// same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Command {
    /// Matches the answer to the question.
    pub id: u64,
    /// What to do.
    pub action: CommandAction,
    /// Which profile.
    pub profile: String,
}

/// Agent -> coordinator: how a [`Command`] went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CommandResult {
    /// The command's id.
    pub id: u64,
    /// Done (for `Health`: the check passed).
    pub ok: bool,
    /// What happened, as the local CLI would print it.
    pub message: String,
    /// The full report as JSON, for `--json` (net check, audit).
    pub report: Option<String>,
}

/// The agent introduces itself. Its identity comes from its certificate; `agent_id` must
/// match it or the coordinator refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// The agent id it believes it has.
    pub agent_id: String,
    /// Agent software version.
    pub agent_version: String,
    /// Labels for assignment (`site=dc1`).
    #[serde(deserialize_with = "crate::limits::labels")]
    pub labels: BTreeMap<String, String>,
    /// The profile-set version it runs now (from its cache), if any.
    pub applied_version: Option<u64>,
    /// When this agent process started (Unix ms): a new value on a reconnect is a restart.
    pub started_unix_ms: u64,
}

/// The coordinator accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the coordinator.
    pub protocol: u32,
    /// How often to send heartbeats.
    pub heartbeat_interval_ms: u32,
    /// Coordinator software version.
    pub coordinator_version: String,
    /// The fleet's SSH host CA (one OpenSSH public key line): profiles with `fleet_host_ca`
    /// trust OMA host certificates it signed. None when the coordinator has none.
    pub ssh_host_ca: Option<String>,
}

/// The peer speaks another protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol version mismatch: peer speaks {theirs}, this side speaks {ours}")]
pub struct VersionMismatch {
    /// The version this side speaks.
    pub ours: u32,
    /// The version the peer speaks.
    pub theirs: u32,
}

/// Checks a peer's protocol version against ours.
pub fn check_version(theirs: u32) -> Result<(), VersionMismatch> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        })
    }
}

/// Periodic agent state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Heartbeat {
    /// Increases by one per heartbeat on a connection.
    pub seq: u64,
    /// Agent wall clock when sent (Unix ms).
    pub sent_unix_ms: u64,
    /// Every profile the agent runs.
    #[serde(deserialize_with = "crate::limits::report_profiles")]
    pub profiles: Vec<ProfileReport>,
}

/// A session's state (`up`, `backoff`, … in JSON; by index in frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    /// Not running.
    Stopped,
    /// Connecting, handshaking or authenticating.
    Connecting,
    /// Session established; forwards served.
    Up,
    /// Waiting to reconnect.
    Backoff,
    /// Draining open connections and closing.
    Stopping,
}

/// A forward's state (`active`, `retrying`, … in JSON; by index in frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum ForwardState {
    /// Not running.
    Stopped,
    /// Bound; session down.
    Listening,
    /// Serving connections through the session.
    Active,
    /// Remote forward waiting for the session.
    Waiting,
    /// Cannot bind or refused by the server; retrying.
    Retrying,
}

/// One profile in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ProfileReport {
    /// Profile name.
    pub name: String,
    /// Session state.
    pub state: TunnelState,
    /// Endpoint in use.
    pub active_endpoint: String,
    /// Session up since (Unix ms).
    pub up_since_unix_ms: Option<u64>,
    /// Sessions re-established.
    pub reconnects: u64,
    /// Endpoint changes.
    pub failovers: u64,
    /// Last failure.
    pub last_error: Option<String>,
    /// Health checks failed in a row now: grows with every failed check until one passes (it
    /// is not reset when the agent restarts the session), so `threshold` here means
    /// `threshold` failures in a row — the coordinator's `tunnel_health` rule.
    pub consecutive_failures: u32,
    /// Health results since the previous heartbeat.
    #[serde(deserialize_with = "crate::limits::health_samples")]
    pub health: Vec<HealthSample>,
    /// Forwards in config order.
    #[serde(deserialize_with = "crate::limits::forward_reports")]
    pub forwards: Vec<ForwardReport>,
    /// Session failures per endpoint and kind since the agent started (monotonic counters,
    /// so a lost heartbeat loses nothing: the coordinator compares with the previous one).
    #[serde(deserialize_with = "crate::limits::error_counts")]
    pub errors: Vec<ErrorCount>,
    /// The latest endpoint changes the agent made on its own, oldest first (bounded), so an
    /// agent that failed over while the coordinator was unreachable reports it on reconnect.
    #[serde(deserialize_with = "crate::limits::failover_log")]
    pub failover_log: Vec<FailoverRecord>,
}

impl ProfileReport {
    /// A report of profile `name` in `state` on `active_endpoint`, with no counters, health
    /// results, forwards, errors or moves yet (fill in what a caller has).
    pub fn new(name: &str, state: TunnelState, active_endpoint: &str) -> Self {
        ProfileReport {
            name: name.to_string(),
            state,
            active_endpoint: active_endpoint.to_string(),
            up_since_unix_ms: None,
            reconnects: 0,
            failovers: 0,
            last_error: None,
            consecutive_failures: 0,
            health: Vec::new(),
            forwards: Vec::new(),
            errors: Vec::new(),
            failover_log: Vec::new(),
        }
    }
}

/// What kind of session failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum ErrorKind {
    /// TCP connect refused or unreachable.
    Connect,
    /// No session within the connect timeout (a blackholed endpoint looks like this).
    Timeout,
    /// The server's host key was refused.
    HostKey,
    /// The server refused our key.
    Auth,
    /// An established session died (keepalive timeout, reset, disconnect).
    SessionLost,
    /// Any other SSH failure.
    Ssh,
    /// A jump host on the way failed (connect, host key, authentication, or it would not open
    /// a channel to the endpoint), or a session through jump hosts was lost: the path's
    /// problem as far as the agent can tell, not evidence against the endpoint.
    Jump,
}

impl ErrorKind {
    /// True for failures that say something about the endpoint rather than this agent's
    /// credentials or trust (evidence that the endpoint is down).
    pub fn implicates_endpoint(self) -> bool {
        matches!(
            self,
            ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::SessionLost
        )
    }
}

/// How often one kind of failure happened against one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ErrorCount {
    /// `host:port`.
    pub endpoint: String,
    /// What kind of failure.
    pub kind: ErrorKind,
    /// Times since the agent started.
    pub count: u64,
    /// The latest such failure, as logged.
    pub last_detail: String,
    /// When the latest happened (Unix ms).
    pub last_unix_ms: u64,
}

/// An endpoint change the agent made on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FailoverRecord {
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// The endpoint it left.
    pub from: String,
    /// The endpoint it went to.
    pub to: String,
    /// The failure that made it move.
    pub reason: String,
}

impl FailoverRecord {
    /// The reason an agent gives for a move its health check made (its check failed
    /// `failures` times in a row, the last with `detail`): the coordinator tells these moves
    /// from the others by it ([`FailoverRecord::for_health`]).
    pub fn health_reason(failures: u32, detail: &str) -> String {
        format!("{HEALTH_MOVE} {failures} times in a row ({detail})")
    }

    /// Whether the agent made this move for its health check.
    pub fn for_health(&self) -> bool {
        self.reason.starts_with(HEALTH_MOVE)
    }
}

const HEALTH_MOVE: &str = "health check failed";

/// One health check result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HealthSample {
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// Whether the check passed.
    pub ok: bool,
    /// Latency in microseconds.
    pub latency_us: u64,
    /// `HTTP 200` or the failure reason.
    pub detail: String,
}

/// One forward in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ForwardReport {
    /// The forward as written.
    pub spec: String,
    /// Where the forward stands.
    pub state: ForwardState,
    /// Why retrying.
    pub detail: Option<String>,
    /// Bytes into the tunnel.
    pub bytes_out: u64,
    /// Bytes out of the tunnel.
    pub bytes_in: u64,
    /// Connections open.
    pub connections_open: u64,
}

/// A versioned set of profiles for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ProfileSet {
    /// Version; increases with every change.
    pub version: u64,
    /// The profiles.
    #[serde(deserialize_with = "crate::limits::set_profiles")]
    pub profiles: Vec<ProfileSpec>,
}

/// The agent applied (or could not apply) a profile set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Applied {
    /// The version applied.
    pub version: u64,
    /// True when every forward was applied.
    pub ok: bool,
    /// One result per forward.
    #[serde(deserialize_with = "crate::limits::results")]
    pub results: Vec<ForwardResult>,
}

/// One forward's result of an apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ForwardResult {
    /// The profile the forward belongs to.
    pub profile: String,
    /// The forward as written.
    pub forward: String,
    /// Applied (bound or requested).
    pub ok: bool,
    /// What happened (`unchanged`, `replaced`, the bind error naming the port, …).
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only what says something about the endpoint counts against it: a bad key, an unknown
    /// host key or a jump host on the way are this agent's or the path's problem.
    #[test]
    fn only_connect_timeout_and_lost_sessions_implicate_the_endpoint() {
        for (kind, implicates) in [
            (ErrorKind::Connect, true),
            (ErrorKind::Timeout, true),
            (ErrorKind::SessionLost, true),
            (ErrorKind::HostKey, false),
            (ErrorKind::Auth, false),
            (ErrorKind::Ssh, false),
            (ErrorKind::Jump, false),
        ] {
            assert_eq!(kind.implicates_endpoint(), implicates, "{kind:?}");
        }
    }

    #[test]
    fn a_health_move_is_told_from_the_others_by_its_reason() {
        let reason = FailoverRecord::health_reason(3, "HTTP 503");
        assert_eq!(reason, "health check failed 3 times in a row (HTTP 503)");
        let record = |reason: String| FailoverRecord {
            at_unix_ms: 1,
            from: "a:22".into(),
            to: "b:22".into(),
            reason,
        };
        assert!(record(reason).for_health());
        assert!(!record("connect: connection refused".into()).for_health());
    }
}
