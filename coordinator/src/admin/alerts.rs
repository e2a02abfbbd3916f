//! `/v1/alerts`, `/v1/silences`, `/v1/hooks`, `/v1/events`: alerts and their delivery, and the
//! event log.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tunnelfleet_runtime::clock::now_unix_ms;

use super::Admin;
use super::error::ApiError;
use crate::hooks::HookStats;
use crate::store::{Alert, Event, Silence, StoreError};

/// The routes of this resource.
pub(super) fn routes() -> Router<Admin> {
    Router::new()
        .route("/v1/alerts", get(alerts))
        .route("/v1/alerts/{id}", get(alert))
        .route("/v1/alerts/{id}/ack", post(ack))
        .route("/v1/silences", get(silences).post(silence))
        .route("/v1/hooks", get(hooks))
        .route("/v1/events", get(events))
}

/// `?all=true` includes resolved alerts.
#[derive(Debug, Deserialize)]
struct AlertsQuery {
    #[serde(default)]
    all: bool,
}

async fn alerts(
    State(a): State<Admin>,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<Vec<Alert>>, ApiError> {
    Ok(Json(a.fleet.store.alerts(q.all)?))
}

async fn alert(State(a): State<Admin>, Path(id): Path<u64>) -> Result<Json<Alert>, ApiError> {
    a.fleet
        .store
        .alert(id)?
        .map(Json)
        .ok_or_else(|| StoreError::NoAlert(id).into())
}

/// Body of `alerts ack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckRequest {
    /// Who acknowledges it (recorded with the alert).
    pub by: String,
}

async fn ack(
    State(a): State<Admin>,
    Path(id): Path<u64>,
    Json(r): Json<AckRequest>,
) -> Result<Json<Alert>, ApiError> {
    Ok(Json(a.fleet.store.ack_alert(id, &r.by).await?))
}

async fn silences(State(a): State<Admin>) -> Result<Json<Vec<Silence>>, ApiError> {
    Ok(Json(a.fleet.store.silences(now_unix_ms())?))
}

/// Body of `alerts silence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SilenceRequest {
    /// Glob on `kind:subject`.
    pub matcher: String,
    /// For how many seconds.
    pub for_s: u64,
    /// Why, for whoever sees the silence later.
    #[serde(default)]
    pub comment: String,
}

async fn silence(
    State(a): State<Admin>,
    Json(r): Json<SilenceRequest>,
) -> Result<Json<Silence>, ApiError> {
    if r.matcher.is_empty() || r.for_s == 0 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a silence needs a matcher and a duration".into(),
        ));
    }
    Ok(Json(
        a.fleet
            .store
            .add_silence(Silence {
                id: 0,
                matcher: r.matcher,
                until_unix_ms: now_unix_ms() + r.for_s.saturating_mul(1000),
                comment: r.comment,
            })
            .await?,
    ))
}

async fn hooks(State(a): State<Admin>) -> Result<Json<Vec<HookStats>>, ApiError> {
    Ok(Json(a.watch.outbox.stats()))
}

async fn events(State(a): State<Admin>) -> Result<Json<Vec<Event>>, ApiError> {
    Ok(Json(a.fleet.store.events(200)?))
}
