//! The admin HTTP API: JSON over HTTP on 127.0.0.1 by default, a bearer token from a file.
//!
//! The CLI's `agents`, `profiles`, `assign` and `rollout` commands are thin clients of this.
//! Every change is durable (flushed) before the response and pushed to connected agents right
//! after. Profiles arrive in the agent's own config form and are validated by the agent's own
//! rules, so a profile the coordinator accepts is one the agent will accept.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tunnelfleet_agent::config::ProfileConfig;
use tunnelfleet_protocol::{Heartbeat, ProfileSpec};

use crate::link::Fleet;
use crate::store::{Assignment, Selector, StoreError};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Admin {
    /// The fleet.
    pub fleet: Arc<Fleet>,
    /// The bearer token every request must carry.
    pub token: Arc<String>,
}

/// The router.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/v1/agents", get(agents))
        .route("/v1/agents/{id}", get(agent))
        .route("/v1/profiles", get(profiles))
        .route(
            "/v1/profiles/{name}",
            get(profile).put(put_profile).delete(delete_profile),
        )
        .route("/v1/assignments", get(assignments).post(assign))
        .route("/v1/rollout", get(rollout))
        .with_state(admin)
}

/// An error as JSON with a status code.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoProfile(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

fn authorize(admin: &Admin, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare without an early exit, so timing does not reveal the token.
    let want = admin.token.as_bytes();
    let same = given.len() == want.len()
        && given
            .as_bytes()
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
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
    /// Labels.
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
}

fn summaries(fleet: &Fleet) -> Result<Vec<AgentDetail>, ApiError> {
    let mut out = Vec::new();
    for rec in fleet.store.agents()? {
        let link = fleet.links.get(&rec.id);
        let hb = link.as_ref().and_then(|l| l.last_heartbeat.clone());
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
                connected: link.as_ref().is_some_and(|l| l.connected),
                online: link.as_ref().is_some_and(|l| l.connected && l.online),
                labels: rec.labels.clone(),
                last_seen_unix_ms: rec.last_seen_unix_ms,
                applied_version: rec.applied_version,
                applied_ok: rec.applied_ok,
                tunnels_up: up,
                tunnels: total,
                heartbeats: link.as_ref().map(|l| l.heartbeats).unwrap_or(0),
            },
            apply_errors: rec.apply_errors.clone(),
            last_heartbeat: hb,
        });
    }
    Ok(out)
}

async fn agents(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Vec<AgentSummary>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(
        summaries(&a.fleet)?
            .into_iter()
            .map(|d| d.summary)
            .collect(),
    ))
}

async fn agent(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<AgentDetail>, ApiError> {
    authorize(&a, &h)?;
    summaries(&a.fleet)?
        .into_iter()
        .find(|d| d.summary.id == id)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no agent {id:?}")))
}

async fn profiles(
    State(a): State<Admin>,
    h: HeaderMap,
) -> Result<Json<Vec<ProfileSpec>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.profiles()?))
}

async fn profile(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<ProfileSpec>, ApiError> {
    authorize(&a, &h)?;
    a.fleet
        .store
        .profiles()?
        .into_iter()
        .find(|p| p.name == name)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no profile named {name:?}")))
}

/// The answer to a change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Changed {
    /// The new fleet version.
    pub version: u64,
    /// Agents the change was pushed to.
    pub pushed_to: Vec<String>,
}

async fn put_profile(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(spec): Json<ProfileSpec>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    if spec.name != name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body names profile {:?}, the URL {name:?}", spec.name),
        ));
    }
    ProfileConfig::from_spec(&spec).map_err(|(key, reason)| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("profile.{name}.{key}: {reason}"),
        )
    })?;
    let version = a.fleet.store.put_profile(&spec).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

async fn delete_profile(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    let version = a.fleet.store.delete_profile(&name).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

async fn assignments(
    State(a): State<Admin>,
    h: HeaderMap,
) -> Result<Json<Vec<Assignment>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.assignments()?))
}

/// `POST /v1/assignments`: a profile to one agent or to every agent with these labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssignRequest {
    /// Profile name.
    pub profile: String,
    /// One agent.
    pub agent: Option<String>,
    /// Or every agent with all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

async fn assign(
    State(a): State<Admin>,
    h: HeaderMap,
    Json(req): Json<AssignRequest>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    let selector = match (req.agent, req.labels.is_empty()) {
        (Some(id), true) => Selector::Agent(id),
        (None, false) => Selector::Labels(req.labels),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give either an agent or labels".into(),
            ));
        }
    };
    let version = a
        .fleet
        .store
        .assign(&Assignment {
            profile: req.profile,
            selector,
        })
        .await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

/// The rollout of the current version: who applied it, who failed and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// The current fleet version.
    pub version: u64,
    /// Agents at this version with every forward applied.
    pub applied: Vec<String>,
    /// Agents at this version with failures, and the failures.
    pub failed: BTreeMap<String, Vec<String>>,
    /// Agents not at this version yet (offline, or still applying).
    pub pending: Vec<String>,
}

async fn rollout(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Rollout>, ApiError> {
    authorize(&a, &h)?;
    let version = a.fleet.store.fleet_version()?;
    let mut r = Rollout {
        version,
        applied: vec![],
        failed: BTreeMap::new(),
        pending: vec![],
    };
    for rec in a.fleet.store.agents()? {
        match rec.applied_version {
            Some(v) if v == version && rec.applied_ok => r.applied.push(rec.id),
            Some(v) if v == version => {
                r.failed.insert(rec.id, rec.apply_errors);
            }
            _ => r.pending.push(rec.id),
        }
    }
    Ok(Json(r))
}
