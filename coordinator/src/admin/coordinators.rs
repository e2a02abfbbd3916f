//! `GET /v1/coordinators`: the coordinators sharing the store, who leads, and where this one
//! stands (`tunnelfleet coordinators`).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::Admin;
use super::error::ApiError;
use crate::store::{CoordinatorRecord, Standing};

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordinatorsView {
    /// The store: `sled` (one coordinator) or `etcd`.
    pub store: String,
    /// The coordinator that answered.
    pub this: String,
    /// Where it stands: `leader`, `follower` or `cut` (etcd out of reach).
    pub standing: String,
    /// Since when it leads, or is cut off (Unix ms).
    #[serde(default)]
    pub since_unix_ms: Option<u64>,
    /// Who leads, as it sees it.
    #[serde(default)]
    pub leader: Option<String>,
    /// Every coordinator up, by name.
    pub coordinators: Vec<CoordinatorRecord>,
    /// Agents linked to each (by name), as the coordinator asked knows them.
    #[serde(default)]
    pub agents: std::collections::BTreeMap<String, usize>,
}

/// Its routes.
pub fn routes() -> Router<Admin> {
    Router::new().route("/v1/coordinators", get(coordinators))
}

async fn coordinators(State(a): State<Admin>) -> Result<Json<CoordinatorsView>, ApiError> {
    Ok(Json(view(&a)?))
}

/// The coordinators as `a` sees them (the API and the fleet page).
pub(crate) fn view(a: &Admin) -> Result<CoordinatorsView, ApiError> {
    let standing = a.standing.borrow().clone();
    let (name, since) = match &standing {
        Standing::Leader { since_unix_ms } => ("leader", Some(*since_unix_ms)),
        Standing::Follower { .. } => ("follower", None),
        Standing::Cut { since_unix_ms } => ("cut", Some(*since_unix_ms)),
    };
    let leader = match standing {
        Standing::Follower { leader } => leader,
        Standing::Leader { .. } => Some(a.name.to_string()),
        Standing::Cut { .. } => a.fleet.store.leader()?,
    };
    let mut agents = std::collections::BTreeMap::new();
    agents.insert(a.name.to_string(), a.fleet.links.connected().len());
    for r in a.fleet.store.latest_live(&a.name)?.into_values() {
        if r.connected && !a.fleet.links.get(&r.agent).is_some_and(|l| l.connected) {
            *agents.entry(r.coordinator).or_default() += 1;
        }
    }
    Ok(CoordinatorsView {
        store: if a.fleet.store.shared() {
            "etcd"
        } else {
            "sled"
        }
        .into(),
        this: a.name.to_string(),
        standing: name.into(),
        since_unix_ms: since,
        leader,
        coordinators: a.fleet.store.coordinators()?,
        agents,
    })
}
