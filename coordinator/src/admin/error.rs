//! The admin API's errors: a status code chosen by the error's variant (never by its text) and
//! the message as `{"error": "…"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::fleet::CommandError;
use crate::store::StoreError;
use crate::watch::OmaCommandError;

/// An error as JSON with a status code.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl ApiError {
    /// 421: another coordinator does this (the leader an OMA move, the one an agent is linked
    /// to a command on it). The message names it and, when it is registered, its admin API.
    /// Nothing was done here, so a client that knows several coordinators sends it on to the
    /// next.
    pub fn elsewhere(store: &crate::store::Store, coordinator: &str, what: &str) -> ApiError {
        let admin = store
            .coordinators()
            .ok()
            .and_then(|cs| cs.into_iter().find(|c| c.name == coordinator))
            .map(|c| c.admin);
        let message = match admin {
            Some(addr) => format!("{what}: send this to its admin API at {addr}"),
            None => what.to_string(),
        };
        ApiError(StatusCode::MISDIRECTED_REQUEST, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NoProfile(_)
            | StoreError::NoGroup(_)
            | StoreError::NoAlert(_)
            | StoreError::NoEndpoint(_)
            | StoreError::NoToken(_)
            | StoreError::NoRevision(_)
            | StoreError::NoAdminToken(_)
            | StoreError::NoRolloutInProgress => StatusCode::NOT_FOUND,
            StoreError::UnknownGroup { .. }
            | StoreError::GroupInUse { .. }
            | StoreError::AdminTokenExists(_)
            | StoreError::RolloutInProgress(_)
            | StoreError::FleetChanged { .. } => StatusCode::CONFLICT,
            // etcd without quorum or out of reach: nothing was changed; try again later.
            StoreError::Etcd { .. } | StoreError::NotLeader => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::TokenRefused(_)
            | StoreError::Disk(_)
            | StoreError::ForeignTree
            | StoreError::Corrupt { .. }
            | StoreError::NewerSchema { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<OmaCommandError> for ApiError {
    fn from(e: OmaCommandError) -> Self {
        use crate::monitor::Refusal;
        match e {
            OmaCommandError::Refused(r @ Refusal::NoGroup(_)) => {
                ApiError(StatusCode::NOT_FOUND, r.to_string())
            }
            OmaCommandError::Refused(r) => ApiError(StatusCode::CONFLICT, r.to_string()),
            OmaCommandError::Store(e) => e.into(),
            OmaCommandError::NotLeader | OmaCommandError::ShuttingDown => {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
    }
}

impl From<CommandError> for ApiError {
    /// Not connected, gone or silent: the agent is in no state to answer (409).
    fn from(e: CommandError) -> Self {
        let status = match e {
            CommandError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::CONFLICT,
        };
        ApiError(status, e.to_string())
    }
}
