//! `/v1/tokens`, `/v1/agents/{id}/revoke`, `/v1/revocations`: who may join the fleet.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tunnelfleet_runtime::clock::now_unix_ms;

use super::Admin;
use super::error::ApiError;
use super::oma::Done;
use crate::store::{JoinToken, Revocation};

/// The routes of this resource.
pub(super) fn routes() -> Router<Admin> {
    Router::new()
        .route("/v1/tokens", get(tokens).post(create_token))
        .route("/v1/tokens/{id}", delete(delete_token))
        .route("/v1/agents/{id}/revoke", post(revoke).delete(unrevoke))
        .route("/v1/revocations", get(revocations))
}

/// Body of `token create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Labels the enrolled agent gets.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Lifetime in seconds.
    pub ttl_s: u64,
    /// Restrict the token to one agent id (needed to re-enroll a known agent).
    #[serde(default)]
    pub agent: Option<String>,
}

/// Answer of `token create`: the secret, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The secret to give the agent (not stored by the coordinator).
    pub token: String,
    /// The token as stored.
    #[serde(flatten)]
    pub info: JoinToken,
}

/// Longest a join token may live: a week.
const MAX_TOKEN_TTL_S: u64 = 7 * 24 * 3600;

async fn create_token(
    State(a): State<Admin>,
    Json(r): Json<TokenRequest>,
) -> Result<Json<TokenCreated>, ApiError> {
    if r.ttl_s == 0 || r.ttl_s > MAX_TOKEN_TTL_S {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("ttl: between 1 s and {MAX_TOKEN_TTL_S} s (a week)"),
        ));
    }
    if let Some(agent) = &r.agent {
        crate::pki::check_agent_id(agent)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    }
    if !a.enrollment {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "enrollment is not enabled on this coordinator: its PKI directory holds no CA key"
                .into(),
        ));
    }
    let (secret, hash, id) = crate::enroll::new_token();
    let now = now_unix_ms();
    let info = JoinToken {
        id,
        labels: r.labels,
        agent: r.agent,
        created_unix_ms: now,
        expires_unix_ms: now + r.ttl_s * 1000,
        used_by: None,
        used_unix_ms: None,
    };
    a.fleet.store.put_token(&hash, &info).await?;
    Ok(Json(TokenCreated {
        token: secret,
        info,
    }))
}

async fn tokens(State(a): State<Admin>) -> Result<Json<Vec<JoinToken>>, ApiError> {
    Ok(Json(a.fleet.store.tokens()?))
}

async fn delete_token(
    State(a): State<Admin>,
    Path(id): Path<String>,
) -> Result<Json<Done>, ApiError> {
    a.fleet.store.delete_token(&id).await?;
    Ok(Json(Done {
        message: format!("join token {id} deleted"),
    }))
}

/// Body of `agents revoke`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// Why (kept with the revocation, shown to the agent).
    #[serde(default)]
    pub reason: String,
}

async fn revoke(
    State(a): State<Admin>,
    Path(id): Path<String>,
    Json(r): Json<RevokeRequest>,
) -> Result<Json<Revocation>, ApiError> {
    crate::pki::check_agent_id(&id)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let reason = if r.reason.is_empty() {
        "revoked by an operator".to_string()
    } else {
        r.reason
    };
    Ok(Json(a.fleet.revoke(&id, &reason).await?))
}

async fn unrevoke(State(a): State<Admin>, Path(id): Path<String>) -> Result<Json<Done>, ApiError> {
    if a.fleet.store.unrevoke(&id).await? {
        Ok(Json(Done {
            message: format!("agent {id} may connect again"),
        }))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("agent {id} is not revoked"),
        ))
    }
}

async fn revocations(State(a): State<Admin>) -> Result<Json<Vec<Revocation>>, ApiError> {
    Ok(Json(a.fleet.store.revocations()?))
}
