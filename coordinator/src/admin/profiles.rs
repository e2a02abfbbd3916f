//! `/v1/profiles`, `/v1/assignments`, `/v1/rollout`, `/v1/plan`, `/v1/history`, `/v1/rollback`:
//! what agents run. A profile is validated as the agents will get it (its OMA group resolved)
//! before it is stored; every change is durable before the answer and pushed right after.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::ProfileSpec;

use super::Admin;
use super::error::ApiError;
use crate::store::{Assignment, Selector, StoreError};

/// The routes of this resource.
pub(super) fn routes() -> Router<Admin> {
    Router::new()
        .route("/v1/profiles", get(profiles))
        .route(
            "/v1/profiles/{name}",
            get(profile).put(put_profile).delete(delete_profile),
        )
        .route("/v1/assignments", get(assignments).post(assign))
        .route("/v1/rollout", get(rollout))
        .route("/v1/plan", post(plan))
        .route("/v1/history", get(history))
        .route("/v1/history/{version}", get(revision))
        .route("/v1/rollback", post(rollback))
}

async fn profiles(State(a): State<Admin>) -> Result<Json<Vec<ProfileSpec>>, ApiError> {
    Ok(Json(a.fleet.store.profiles()?))
}

async fn profile(
    State(a): State<Admin>,
    Path(name): Path<String>,
) -> Result<Json<ProfileSpec>, ApiError> {
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
    Path(name): Path<String>,
    Json(spec): Json<ProfileSpec>,
) -> Result<Json<Changed>, ApiError> {
    if spec.name != name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body names profile {:?}, the URL {name:?}", spec.name),
        ));
    }
    runnable(&a, &spec)?;
    let version = a.fleet.store.put_profile(&spec).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

/// A profile checked as the agents will get it: a group profile with the group's endpoints.
pub(super) fn runnable(a: &Admin, spec: &ProfileSpec) -> Result<(), ApiError> {
    let name = &spec.name;
    let resolved = match &spec.group {
        Some(g) => {
            let group = a
                .fleet
                .store
                .group(g)?
                .ok_or_else(|| StoreError::UnknownGroup {
                    profile: name.clone(),
                    group: g.clone(),
                })?;
            spec.resolved(&group.ordered())
        }
        None => spec.clone(),
    };
    resolved.validate_runnable().map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            e.within(&format!("profile.{name}")).to_string(),
        )
    })
}

async fn delete_profile(
    State(a): State<Admin>,
    Path(name): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    let version = a.fleet.store.delete_profile(&name).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

async fn assignments(State(a): State<Admin>) -> Result<Json<Vec<Assignment>>, ApiError> {
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
    Json(req): Json<AssignRequest>,
) -> Result<Json<Changed>, ApiError> {
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

async fn rollout(State(a): State<Admin>) -> Result<Json<Rollout>, ApiError> {
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

async fn plan(
    State(a): State<Admin>,
    Json(proposed): Json<Vec<ProfileSpec>>,
) -> Result<Json<crate::plan::Plan>, ApiError> {
    let store = &a.fleet.store;
    let agents = store.agent_labels()?;
    Ok(Json(crate::plan::plan(
        store.fleet_version()?,
        &store.profiles()?,
        &store.assignments()?,
        &agents,
        &proposed,
    )))
}

/// `?limit=` of `profiles history`.
#[derive(Debug, Deserialize)]
struct HistoryQuery {
    #[serde(default = "default_history")]
    limit: usize,
}

fn default_history() -> usize {
    20
}

async fn history(
    State(a): State<Admin>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Vec<crate::store::RevisionSummary>>, ApiError> {
    Ok(Json(a.fleet.store.history(q.limit)?))
}

async fn revision(
    State(a): State<Admin>,
    Path(version): Path<u64>,
) -> Result<Json<crate::store::Revision>, ApiError> {
    Ok(Json(a.fleet.store.revision(version)?))
}

/// Body of `profiles rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The version whose profiles and assignments to restore.
    pub version: u64,
}

async fn rollback(
    State(a): State<Admin>,
    Json(r): Json<RollbackRequest>,
) -> Result<Json<Changed>, ApiError> {
    let version = a.fleet.store.rollback(r.version).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}
