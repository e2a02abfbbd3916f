//! `/v1/agents`: the fleet's agents as the coordinator knows them, and commands run on one
//! (`tunnels … --agent`, `net check --agent`, `audit --agent`).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::Heartbeat;

use super::Admin;
use super::error::ApiError;
use crate::fleet::{CommandError, Fleet};
use crate::monitor::{ProfilePlacement, placement};
use tunnelfleet_runtime::clock::now_unix_ms;

/// The routes of this resource.
pub(super) fn routes() -> Router<Admin> {
    Router::new()
        .route("/v1/agents", get(agents))
        .route("/v1/agents/{id}", get(agent))
        .route(
            "/v1/agents/{id}/tunnels/{profile}/{action}",
            post(agent_command),
        )
        .route("/v1/agents/{id}/net-check", post(agent_net_check))
        .route("/v1/agents/{id}/audit", post(agent_audit))
}

/// One agent in `agents list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSummary {
    /// Agent id.
    pub id: String,
    /// Connected now.
    pub connected: bool,
    /// Heartbeats arriving (false after three missed).
    pub online: bool,
    /// Its labels: from its hello, with its join token's on top.
    pub labels: BTreeMap<String, String>,
    /// Last contact (Unix ms).
    pub last_seen_unix_ms: u64,
    /// Fleet version it acknowledged.
    pub applied_version: Option<u64>,
    /// Whether that apply succeeded.
    pub applied_ok: bool,
    /// Tunnels up / total, from the last heartbeat.
    pub tunnels_up: usize,
    /// Tunnels in the last heartbeat.
    pub tunnels: usize,
    /// Heartbeats received on its current connection.
    pub heartbeats: u64,
    /// Revoked: refused at every connection.
    #[serde(default)]
    pub revoked: bool,
    /// The coordinator it is linked to (several coordinators on etcd; None: not linked).
    #[serde(default)]
    pub coordinator: Option<String>,
    /// Its latest SSH certificate (none before one was issued).
    #[serde(default)]
    pub ssh_cert: Option<SshCertExpiry>,
}

/// An agent's latest SSH certificate: which, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshCertExpiry {
    /// Its serial (in sshd's log: `ID <agent> (serial N)`).
    pub serial: u64,
    /// When it runs out (Unix seconds); the agent asks for the next one at half-life.
    pub valid_before_unix_s: u64,
    /// It has less than a quarter of its life left (the `ssh_cert_expiring` rule).
    pub expiring: bool,
}

/// `agents show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: AgentSummary,
    /// Failures of its last apply.
    pub apply_errors: Vec<String>,
    /// The last heartbeat.
    pub last_heartbeat: Option<Heartbeat>,
    /// Where each profile runs against its OMA group's choice (diverged, and why).
    #[serde(default)]
    pub placement: Vec<ProfilePlacement>,
}

/// Every known agent, with its last heartbeat and where each profile runs.
/// Every agent with what this coordinator (`me`) knows of it: from its link when it is linked
/// here, else from the latest evidence another coordinator published (several on etcd).
pub(crate) fn details(fleet: &Fleet, me: &str) -> Result<Vec<AgentDetail>, ApiError> {
    let mut out = Vec::new();
    let remote = fleet.store.latest_live(me)?;
    let revoked = fleet.store.revoked_agents()?;
    let groups = fleet.store.groups()?;
    let certs: BTreeMap<String, crate::store::SshCertRecord> = fleet
        .store
        .ssh_certs()?
        .into_iter()
        .map(|c| (c.agent_id.clone(), c))
        .collect();
    let now_s = now_unix_ms() / 1000;
    for rec in fleet.store.agents()? {
        let link = fleet.links.get(&rec.id);
        let labels = rec.effective_labels();
        let here = link.as_ref().is_some_and(|l| l.connected);
        let there = remote.get(&rec.id).filter(|_| !here);
        let hb = match there {
            Some(r) => r.heartbeat.clone().map(std::sync::Arc::new),
            None => link.as_ref().and_then(|l| l.last_heartbeat.clone()),
        };
        let (up, total) = hb
            .as_ref()
            .map(|h| {
                (
                    h.profiles
                        .iter()
                        .filter(|p| p.state == tunnelfleet_protocol::TunnelState::Up)
                        .count(),
                    h.profiles.len(),
                )
            })
            .unwrap_or((0, 0));
        out.push(AgentDetail {
            summary: AgentSummary {
                id: rec.id.clone(),
                connected: here || there.is_some_and(|r| r.connected),
                online: link.as_ref().is_some_and(|l| l.connected && l.online)
                    || there.is_some_and(|r| r.connected && r.online),
                labels,
                // The last heartbeat (or hello, or acknowledgement) of a connected agent; the
                // stored time once it is gone.
                last_seen_unix_ms: link
                    .as_ref()
                    .map(|l| {
                        now_unix_ms().saturating_sub(l.last_heard.elapsed().as_millis() as u64)
                    })
                    .unwrap_or(0)
                    .max(rec.last_seen_unix_ms),
                applied_version: rec.applied_version,
                applied_ok: rec.applied_ok,
                tunnels_up: up,
                tunnels: total,
                heartbeats: match there {
                    Some(r) => r.heartbeats,
                    None => link.as_ref().map(|l| l.heartbeats).unwrap_or(0),
                },
                revoked: revoked.contains(&rec.id),
                coordinator: if here {
                    Some(me.to_string())
                } else {
                    there.filter(|r| r.connected).map(|r| r.coordinator.clone())
                },
                ssh_cert: certs.get(&rec.id).map(|c| SshCertExpiry {
                    serial: c.serial,
                    valid_before_unix_s: c.valid_before,
                    expiring: crate::monitor::cert_expiring(c.valid_after, c.valid_before, now_s),
                }),
            },
            apply_errors: rec.apply_errors.clone(),
            placement: hb
                .iter()
                .flat_map(|h| h.profiles.iter().map(|p| placement(&groups, p)))
                .collect(),
            last_heartbeat: hb.map(|h| (*h).clone()),
        });
    }
    Ok(out)
}

async fn agents(State(a): State<Admin>) -> Result<Json<Vec<AgentSummary>>, ApiError> {
    Ok(Json(
        details(&a.fleet, &a.name)?
            .into_iter()
            .map(|d| d.summary)
            .collect(),
    ))
}

async fn agent(
    State(a): State<Admin>,
    Path(id): Path<String>,
) -> Result<Json<AgentDetail>, ApiError> {
    details(&a.fleet, &a.name)?
        .into_iter()
        .find(|d| d.summary.id == id)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no agent {id:?}")))
}

async fn agent_command(
    State(a): State<Admin>,
    Path((id, profile, action)): Path<(String, String, String)>,
) -> Result<Json<tunnelfleet_protocol::CommandResult>, ApiError> {
    use tunnelfleet_protocol::CommandAction;
    let action = match action.as_str() {
        "start" => CommandAction::Start,
        "stop" => CommandAction::Stop,
        "restart" => CommandAction::Restart,
        "health" => CommandAction::Health,
        other => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("{other:?}: expected start, stop, restart or health"),
            ));
        }
    };
    on_agent(&a, &id, action, &profile).await
}

async fn agent_net_check(
    State(a): State<Admin>,
    Path(id): Path<String>,
) -> Result<Json<tunnelfleet_protocol::CommandResult>, ApiError> {
    on_agent(&a, &id, tunnelfleet_protocol::CommandAction::NetCheck, "").await
}

async fn agent_audit(
    State(a): State<Admin>,
    Path(id): Path<String>,
) -> Result<Json<tunnelfleet_protocol::CommandResult>, ApiError> {
    on_agent(&a, &id, tunnelfleet_protocol::CommandAction::Audit, "").await
}

/// Runs a command on a connected agent. Linked to another coordinator (several on etcd): a
/// 421 naming it, where the command must go. Not connected anywhere, or no answer: a 409.
async fn on_agent(
    a: &Admin,
    id: &str,
    action: tunnelfleet_protocol::CommandAction,
    profile: &str,
) -> Result<Json<tunnelfleet_protocol::CommandResult>, ApiError> {
    match a.fleet.command(id, action, profile).await {
        Ok(r) => Ok(Json(r)),
        Err(e @ CommandError::NotConnected(_)) => {
            let there = a
                .fleet
                .store
                .latest_live(&a.name)?
                .remove(id)
                .filter(|r| r.connected);
            Err(match there {
                Some(r) => ApiError::elsewhere(
                    &a.fleet.store,
                    &r.coordinator,
                    &format!("agent {id:?} is linked to coordinator {}", r.coordinator),
                ),
                None => e.into(),
            })
        }
        Err(e) => Err(e.into()),
    }
}
