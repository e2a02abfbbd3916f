//! `/v1/rollouts`: staged rollouts of profile changes — start one, see it, resume or abort it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::Admin;
use super::auth::Caller;
use super::error::ApiError;
use crate::rollout::{StartError, StartRequest};
use crate::store::Rollout;

/// The routes of this resource.
pub(super) fn routes() -> Router<Admin> {
    Router::new()
        .route("/v1/rollouts", post(start))
        .route("/v1/rollouts/current", get(current))
        .route("/v1/rollouts/current/resume", post(resume))
        .route("/v1/rollouts/current/abort", post(abort))
}

/// The rollout in progress, or the last one; without its copy of the previous profiles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    /// The rollout.
    #[serde(flatten)]
    pub rollout: Rollout,
    /// The fleet version now (an abort makes a new one).
    pub fleet_version: u64,
}

/// The answer to an abort.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Aborted {
    /// The version that restored the previous profiles.
    pub version: u64,
    /// The rollout as closed.
    pub rollout: Rollout,
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            StartError::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
            StartError::Store(e) => e.into(),
        }
    }
}

fn trimmed(mut r: Rollout) -> Rollout {
    r.base_profiles.clear();
    r.base_assignments.clear();
    r
}

async fn start(
    State(a): State<Admin>,
    Extension(by): Extension<Caller>,
    Json(req): Json<StartRequest>,
) -> Result<Json<Rollout>, ApiError> {
    if req.profiles.len() > tunnelfleet_protocol::limits::MAX_PROFILES {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{} profiles: at most {} in one rollout",
                req.profiles.len(),
                tunnelfleet_protocol::limits::MAX_PROFILES
            ),
        ));
    }
    for spec in &req.profiles {
        super::profiles::runnable(&a, spec)?;
    }
    Ok(Json(trimmed(a.rollouts.start(&req, &by.name).await?)))
}

async fn current(State(a): State<Admin>) -> Result<Json<Option<RolloutView>>, ApiError> {
    let fleet_version = a.fleet.store.fleet_version()?;
    Ok(Json(a.fleet.store.last_rollout()?.map(|r| RolloutView {
        rollout: trimmed(r),
        fleet_version,
    })))
}

async fn resume(
    State(a): State<Admin>,
    Extension(by): Extension<Caller>,
) -> Result<Json<Rollout>, ApiError> {
    Ok(Json(trimmed(a.rollouts.resume(&by.name).await?)))
}

async fn abort(
    State(a): State<Admin>,
    Extension(by): Extension<Caller>,
) -> Result<Json<Aborted>, ApiError> {
    let (version, r) = a.rollouts.abort(&by.name).await?;
    Ok(Json(Aborted {
        version,
        rollout: trimmed(r),
    }))
}
