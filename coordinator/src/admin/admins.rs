//! `/v1/admin-tokens`, `/v1/audit`: who may use this API, with which role, and what they did.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tunnelfleet_runtime::clock::now_unix_ms;

use super::Admin;
use super::auth::{Caller, FILE_TOKEN_NAME};
use super::error::ApiError;
use crate::store::{AdminToken, AuditEntry, Role};

/// The routes of this resource.
pub(super) fn routes() -> Router<Admin> {
    Router::new()
        .route("/v1/admin-tokens", get(list).post(create))
        .route("/v1/admin-tokens/{name}", delete(revoke))
        .route("/v1/audit", get(audit))
}

/// Body of `admin-token create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminTokenRequest {
    /// Who holds it.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// Answer of `admin-token create`: the secret, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminTokenCreated {
    /// The secret (only its hash is stored).
    pub token: String,
    /// The token as stored.
    #[serde(flatten)]
    pub info: AdminToken,
}

/// Prefix of admin token secrets (join tokens have `tfj_`): a leaked one is recognisable.
pub const ADMIN_TOKEN_PREFIX: &str = "tfa_";

/// A token name: what the audit log shows, so short and plain.
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        && name != FILE_TOKEN_NAME;
    if ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "admin token name {name:?}: 1 to 64 of letters, digits, '-', '_', '.', '@' (and not {FILE_TOKEN_NAME:?})"
            ),
        ))
    }
}

async fn create(
    State(a): State<Admin>,
    Extension(by): Extension<Caller>,
    Json(r): Json<AdminTokenRequest>,
) -> Result<Json<AdminTokenCreated>, ApiError> {
    check_name(&r.name)?;
    let (secret, hash, _) = crate::enroll::new_secret(ADMIN_TOKEN_PREFIX);
    let info = AdminToken {
        name: r.name,
        role: r.role,
        created_unix_ms: now_unix_ms(),
        created_by: by.name,
    };
    a.fleet.store.put_admin_token(&hash, &info).await?;
    Ok(Json(AdminTokenCreated {
        token: secret,
        info,
    }))
}

async fn list(State(a): State<Admin>) -> Result<Json<Vec<AdminToken>>, ApiError> {
    Ok(Json(a.fleet.store.admin_tokens()?))
}

async fn revoke(
    State(a): State<Admin>,
    Path(name): Path<String>,
) -> Result<Json<AdminToken>, ApiError> {
    Ok(Json(a.fleet.store.delete_admin_token(&name).await?))
}

/// `?since_unix_ms=&limit=` of `audit-log`.
#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    since_unix_ms: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    1000
}

/// Most entries one answer carries.
const MAX_AUDIT_ANSWER: usize = 10_000;

async fn audit(
    State(a): State<Admin>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    Ok(Json(a.fleet.store.audit_entries(
        q.since_unix_ms,
        q.limit.min(MAX_AUDIT_ANSWER),
    )?))
}
