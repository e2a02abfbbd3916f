//! Alerts as the coordinator records and delivers them, and the outbox entries that carry
//! them to hooks. Plain data: the rules that raise and resolve alerts live in
//! [`crate::monitor`], persistence in [`crate::store`], delivery in [`crate::hooks`].

use serde::{Deserialize, Serialize};

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// An OMA endpoint failed its checks: one incident for the fleet, naming the agents on it.
    OmaDown,
    /// A tunnel's health check keeps failing on one agent while its OMA is healthy.
    TunnelHealth,
    /// An agent stopped sending heartbeats.
    AgentOffline,
    /// An OMA refuses an agent's key.
    SshAuth,
    /// A forward cannot bind its port (or the server refuses it).
    PortConflict,
    /// An agent process keeps restarting.
    AgentRestarting,
}

impl AlertKind {
    /// The name used in keys, hooks and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::OmaDown => "oma_down",
            AlertKind::TunnelHealth => "tunnel_health",
            AlertKind::AgentOffline => "agent_offline",
            AlertKind::SshAuth => "ssh_auth",
            AlertKind::PortConflict => "port_conflict",
            AlertKind::AgentRestarting => "agent_restarting",
        }
    }

    /// How bad: OMA and auth problems take tunnels down for many or for good.
    pub fn severity(self) -> &'static str {
        match self {
            AlertKind::OmaDown | AlertKind::SshAuth | AlertKind::TunnelHealth => "critical",
            _ => "warning",
        }
    }
}

/// Firing or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    /// The condition holds.
    Firing,
    /// The condition cleared.
    Resolved,
}

/// One alert, from firing to resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Id (assigned by the store).
    pub id: u64,
    /// Kind.
    pub kind: AlertKind,
    /// What it is about: an endpoint, `agent`, `agent/profile` or `agent/profile/forward`.
    pub subject: String,
    /// One line for people.
    pub summary: String,
    /// Agents affected (the OMA-down incident lists every agent on the endpoint).
    pub affected_agents: Vec<String>,
    /// Firing or resolved.
    pub status: AlertStatus,
    /// When it fired (Unix ms).
    pub fired_unix_ms: u64,
    /// When it resolved (Unix ms).
    pub resolved_unix_ms: Option<u64>,
    /// Who acknowledged it.
    pub acked_by: Option<String>,
    /// When (Unix ms).
    pub acked_unix_ms: Option<u64>,
    /// A silence matched when it fired: recorded, not delivered.
    pub silenced: bool,
}

impl Alert {
    /// `kind:subject`: one firing alert per key at a time.
    pub fn key(&self) -> String {
        alert_key(self.kind, &self.subject)
    }

    /// The idempotency key of this alert in its current state: a receiver that sees it twice
    /// (at-least-once delivery) can drop the second.
    pub fn idempotency_key(&self) -> String {
        let state = match self.status {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        };
        format!("tunnelfleet-alert-{}-{state}", self.id)
    }
}

/// `kind:subject`.
pub fn alert_key(kind: AlertKind, subject: &str) -> String {
    format!("{}:{subject}", kind.as_str())
}

/// One alert state on its way to one hook; stays in the outbox until delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Outbox order.
    pub seq: u64,
    /// Hook name.
    pub hook: String,
    /// Same for every attempt of this alert state.
    pub idempotency_key: String,
    /// The alert as it was at this state.
    pub alert: Alert,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before (Unix ms).
    pub next_attempt_unix_ms: u64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// Alerts whose key matches are recorded but not delivered until `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    /// Id (assigned by the store).
    pub id: u64,
    /// Glob on the alert key (`oma_down:*`, `*:vma-7*`).
    pub matcher: String,
    /// Until (Unix ms).
    pub until_unix_ms: u64,
    /// Why.
    pub comment: String,
}
